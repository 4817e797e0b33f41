"""The Gemma 3 multimodal projector: tower output → soft tokens in the text model's space.

``(B, 4096, 1152) → 4×4 avg-pool → (B, 256, 1152) → RMSNorm(1 + w) → @ W → (B, 256, D)``, as transformers'
``Gemma3MultiModalProjector``. There is no sqrt(D) scaling: Gemma's embedding scale applies to token embeddings only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import ProjectorConfig, VisionConfig


def pool_grid_side(num_patches: int, kernel_size: int) -> int:
    """The side of the square patch grid the projector's ``kernel_size``-square pool takes.

    Raises:
        ConfigError: the patches do not make a square grid that the pool divides.
    """
    side = math.isqrt(num_patches)
    if side * side != num_patches or side % kernel_size:
        raise ConfigError(f"projector needs a square patch grid divisible by its {kernel_size}x{kernel_size} "
                          f"pool, got {num_patches} patches")
    return side


class GemmaRMSNorm(nn.Module):
    """``x * rsqrt(mean(x²) + eps) * (1 + w)``, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Multiply by (1 + w) before casting back, as Gemma does (not Llama's cast-then-scale).
        return (y * (1.0 + self.weight.float())).type_as(x)


class MultiModalProjector(nn.Module):
    def __init__(self, vision: VisionConfig, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.kernel_size = config.pool_kernel(vision)
        # A raw (in, out) parameter used as x @ W, exactly as the checkpoints store it; not an nn.Linear.
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision.hidden_size, config.text_hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        # dtype of the pooling, norm and product; None: the input's. load() sets the tower's compute dtype, so fp16
        # weights on a CPU without native fp16 are computed in fp32 here too (emulated fp16 is slower and coarser).
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` tower output → ``(B, T, text_hidden)``, in x's dtype."""
        # On a CPU one image at a time: torch splits a reduction (the norm's mean) and a BLAS a product by the row
        # count, so in a batch of 8 an image got other values than alone (1 bf16 ulp). The tower runs a CPU batch
        # one 896-px image at a time too, so there an image's tokens do not depend on its batch. A GPU runs the
        # tower's batch as one: there it would only add launches.
        if x.device.type != "cpu" or x.shape[0] <= 1:
            return self.project(x).to(x.dtype)
        return torch.cat([self.project(image[None]) for image in x]).to(x.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` → ``(B, T, text_hidden)``, in the compute dtype."""
        x = x.to(self.compute_dtype or x.dtype)
        B, N, D = x.shape
        side = pool_grid_side(N, self.kernel_size)
        grid = x.transpose(1, 2).reshape(B, D, side, side)  # (B, D, side, side)
        pooled = F.avg_pool2d(grid, self.kernel_size)  # (B, D, side/k, side/k)
        tokens = pooled.flatten(2).transpose(1, 2)  # (B, T, D), row-major over the token grid
        tokens = self.mm_soft_emb_norm(tokens)
        # In the compute dtype: a float32 run may keep the weight stored in bf16 (model.py, Precision).
        weight = self.mm_input_projection_weight.to(tokens.dtype)  # (D, text_hidden)
        return tokens @ weight  # (B, T, text_hidden)
