"""The Gemma 3 vision tower (SigLIP), in forward order, smallest piece first.

Module and parameter names equal transformers' ``SiglipVisionTransformer`` (``embeddings.patch_embedding``,
``encoder.layers.{i}.self_attn.q_proj``, ``mlp.fc1``, ``post_layernorm``, ...), so a Hugging Face checkpoint loads
with a prefix strip and every other format maps onto these names.

Input is pixels NHWC ``(B, H, W, C)`` in [-1, 1]; output is ``(B, num_patches, hidden)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .errors import ConfigError


def interpolate_position_embedding(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resample a square ``(N, D)`` position table to ``(grid_h * grid_w, D)``.

    As transformers' ``SiglipVisionEmbeddings.interpolate_pos_encoding``: bicubic, ``align_corners=False``, no
    antialias, in the table's dtype.
    """
    N, D = table.shape
    side = int(round(N**0.5))
    if side * side != N:
        raise ConfigError(f"position table must hold a square number of positions, got {N}")
    if (grid_h, grid_w) == (side, side):
        return table
    grid = table.reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, side, side)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, D)  # (h*w, D), row-major


class Embeddings(nn.Module):
    """Patch embedding (a stride-14 conv, computed as patchify + one matmul) plus learned positions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        # Kept as a Conv2d so the parameter has the checkpoint's name and (O, C, P, P) shape; forward() does not
        # call the conv: a patchify + matmul is the same sum and faster on CPU.
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, H, W, C = pixels.shape
        P = self.patch_size
        gh, gw = H // P, W // P
        pixels = pixels[:, : gh * P, : gw * P]  # a valid-padding conv ignores a remainder (SigLIP 384 / 14)
        patches = pixels.reshape(B, gh, P, gw, P, C).permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, P, P, C)
        patches = patches.reshape(B, gh * gw, P * P * C)  # (B, N, P*P*C)
        weight = self.patch_embedding.weight  # (D, C, P, P)
        weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (D, P*P*C), same order as patches
        x = F.linear(patches, weight, self.patch_embedding.bias)  # (B, N, D)
        positions = self.position_embedding.weight
        if (gh, gw) != (self.grid_size, self.grid_size):
            positions = interpolate_position_embedding(positions, gh, gw)
        return x + positions  # (B, N, D)


class Attention(nn.Module):
    """Bidirectional multi-head attention with biases on q/k/v/out and scale ``head_dim ** -0.5``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.fused = True  # scaled_dot_product_attention; False runs the plain softmax path below
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        k = self.k_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        v = self.v_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, Dh)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
            out = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # the model was trained with tanh GELU


class EncoderLayer(nn.Module):
    """Pre-norm: ``x + attn(LN1(x))``, then ``x + mlp(LN2(x))``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


@dataclass
class TowerOutput:
    """The tower's output plus, on request, every hidden state (index 0 = embeddings, i = after layer i)."""

    last_hidden_state: torch.Tensor  # (B, N, D), after post_layernorm
    hidden_states: tuple[torch.Tensor, ...]  # num_hidden_layers + 1 tensors of (B, N, D), before post_layernorm


class VisionTower(nn.Module):
    """SigLIP vision tower: NHWC pixels in [-1, 1] → ``(B, num_patches, hidden)``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        c, P = self.config, self.config.patch_size
        ok = (pixels.dim() == 4 and pixels.shape[-1] == c.num_channels
              and pixels.shape[1] >= P and pixels.shape[2] >= P)
        if not ok:
            raise ConfigError(
                f"pixels must be NHWC (B, H, W, {c.num_channels}) with H and W at least {P}, "
                f"e.g. (B, {c.image_size}, {c.image_size}, {c.num_channels}); got {tuple(pixels.shape)}"
            )

    def forward(self, pixels: torch.Tensor, *, output_hidden_states: bool = False) -> torch.Tensor | TowerOutput:
        self.check_pixels(pixels)
        x = self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype))  # (B, N, D)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.post_layernorm(x)  # (B, N, D)
        if output_hidden_states:
            return TowerOutput(last_hidden_state=x, hidden_states=tuple(hidden_states))
        return x
