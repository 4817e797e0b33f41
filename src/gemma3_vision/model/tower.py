"""The Gemma 3 vision tower (SigLIP), in forward order, smallest piece first.

Module and parameter names equal transformers' ``SiglipVisionTransformer`` (``embeddings.patch_embedding``,
``encoder.layers.{i}.self_attn.q_proj``, ``mlp.fc1``, ``post_layernorm``, ...), so a Hugging Face checkpoint loads
with a prefix strip and every other format maps onto these names.

Input is pixels NHWC ``(B, H, W, C)`` in [-1, 1]; output is ``(B, num_patches, hidden)`` in
``VisionTower.output_dtype`` (default: the parameters' dtype).

Precision: the residual stream and every LayerNorm run in float32 (``VisionTower.residual_dtype``), whatever the
stored dtype; the matmuls and the attention run in ``VisionTower.compute_dtype`` (default: the parameters' dtype).
Stored weights are cast to it one layer at a time, so bf16 weights can be computed in fp32 on a CPU without native
bf16 (8x faster there than emulated bf16) while memory stays at the bf16 size. A float32 run on a CPU keeps a bf16
checkpoint's weights as stored the same way, with the same results as widening them all at load. In float16 a
product that overflows (SigLIP activations can pass 65504) is redone in float32: see ``fp16_safe``. float32 products
on a CPU, and bf16 ones where oneDNN runs bf16, take ``cpu_kernels``' paths when no gradient is wanted: blocked
attention (a softmax as 2**x normalised after the product with v; in bf16 the scores and probabilities rounded to
bf16) and oneDNN linears (bias and GELU applied to the fp32 accumulator).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError, OptionError
from . import cpu_kernels
from .config import VisionConfig

# How attention is computed: torch's scaled_dot_product_attention (flash / cuDNN / ... kernels), or
# cpu_kernels.blocked_attention (2-D oneDNN matmuls, one head and block of queries at a time: faster on a CPU).
ATTENTION_PATHS = ("sdpa", "blocked")


# On a CPU the tower runs a batch in chunks of about this many tokens (one 896-px image, sixteen 224-px ones). A whole
# batch's activations (75 MB for the fp32 stream of 4 images) are fresh pages on every allocation, which glibc maps
# and unmaps above 32 MB: batch 4 ran 17% slower per image than batch 1, with LayerNorms and adds 7x slower.
CPU_CHUNK_TOKENS = 4096


def cpu_onednn_kernels(device: torch.device, dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether products on ``tensors`` take ``cpu_kernels``' paths: a CPU where oneDNN runs ``dtype`` (float32, or
    bf16 on AVX-512 or AMX), and no gradient wanted (those paths have no backward)."""
    if device.type != "cpu" or not cpu_kernels.onednn_runs(dtype):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def onednn_linears(device: torch.device, dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """``cpu_onednn_kernels`` for the linears, except while torch.compile traces: inductor lowers torch's own linears
    itself, and fails on oneDNN's unless freezing is on. (The blocked attention is an op it keeps whole.)"""
    return cpu_onednn_kernels(device, dtype, *tensors) and not torch.compiler.is_compiling()


# Tokens per image below which torch's flash kernel beats the blocked attention, in either dtype
# (benchmarks/cpu_attention.py; benchmarks/results/zen5-2vcpu/attention.json): at 256 tokens (224 px) it took 1.9 ms
# a layer against 3.1 (fp32) and 2.6 (bf16); at 576 the blocked attention was 1.2x (fp32) and 1.8x (bf16) faster.
BLOCKED_MIN_TOKENS = 576


def default_attention(device: torch.device, dtype: torch.dtype, tokens: int, *tensors: torch.Tensor) -> str:
    """``blocked`` where ``cpu_onednn_kernels`` holds from ``BLOCKED_MIN_TOKENS`` tokens an image (faster than the
    flash kernel there: 3.1x in bf16 and 1.9x in fp32 at Gemma 3's 4096 tokens; docs/performance.md), except fp32
    without AVX-512 (``cpu_kernels.AVX512``); else ``sdpa``."""
    fp32_slower = dtype == torch.float32 and not cpu_kernels.AVX512
    blocked = cpu_onednn_kernels(device, dtype, *tensors) and tokens >= BLOCKED_MIN_TOKENS and not fp32_slower
    return "blocked" if blocked else "sdpa"


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear`` in x's dtype, the weights cast per call (bf16 → fp32, say); oneDNN's on a CPU, the bias fused."""
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    fused = onednn_linears(x.device, x.dtype, x, weight, bias)
    return cpu_kernels.linear(x, weight, bias) if fused else F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computing in its input's dtype: stored weights are cast per call (bf16 → fp32, say)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in the residual stream's dtype (float32 by default), whatever the stored dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# Set while VisionTower.forward redoes a float16 pass that overflowed: fp16_safe then checks every product.
_CHECK_EACH_PRODUCT = contextvars.ContextVar("check_each_fp16_product", default=False)


def fp16_safe(fn: Callable[..., torch.Tensor], dtype: torch.dtype, *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)`` with the inputs cast to ``dtype``.

    In float16, during the tower's second pass after an overflow (fp16 ends at 65504), a result holding inf/NaN is
    computed again from the uncast inputs in float32, and returned in float32. That check costs one reduction and
    a host sync per product, so the first pass skips it and the tower checks its output once instead.
    """
    y = fn(*(t.to(dtype) for t in inputs))
    if dtype == torch.float16 and _CHECK_EACH_PRODUCT.get() and not bool(torch.isfinite(y).all()):
        y = fn(*(t.float() for t in inputs))
    return y


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

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` → ``(B, N, D)``: the conv as one matmul."""
        B, H, W, C = pixels.shape
        P = self.patch_size
        gh, gw = H // P, W // P
        pixels = pixels[:, : gh * P, : gw * P]  # a valid-padding conv ignores a remainder (SigLIP 384 / 14)
        patches = pixels.reshape(B, gh, P, gw, P, C).permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, P, P, C)
        patches = patches.reshape(B, gh * gw, P * P * C)  # (B, N, P*P*C)
        weight = self.patch_embedding.weight  # (D, C, P, P)
        weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (D, P*P*C), same order as patches
        bias = self.patch_embedding.bias
        assert bias is not None  # built with bias=True
        return F.linear(patches, weight.to(patches.dtype), bias.to(patches.dtype))

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """NHWC pixels → ``(B, N, D)`` float32; the patch matmul runs in ``dtype`` (default: the weights')."""
        _, H, W, _ = pixels.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        x = fp16_safe(self.patchify, dtype or self.patch_embedding.weight.dtype, pixels).float()  # (B, N, D)
        positions = self.position_embedding.weight.float()  # (N, D)
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
        self.q_proj = Linear(D, D)
        self.k_proj = Linear(D, D)
        self.v_proj = Linear(D, D)
        self.out_proj = Linear(D, D)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` → ``(B, N, 3D)``: q, k and v as one matmul (one pass over x; the concat is ~0.3% of it)."""
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        weight = torch.cat([q.weight, k.weight, v.weight])  # (3D, D)
        bias = torch.cat([q.bias, k.bias, v.bias])  # (3D,)
        return linear(x, weight, bias)

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, Dh)`` each → ``(B, N, H·Dh)``; flash and the other kernels never build the (N, N) scores."""
        B, H, N, Dh = q.shape
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, Dh)
        return out.transpose(1, 2).reshape(B, N, H * Dh)

    def blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, Dh)`` each → ``(B, N, H·Dh)``, one block of (rows, N) scores at a time."""
        return cpu_kernels.blocked_attention(q, k, v, self.scale)

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None, attention: str = "sdpa") -> torch.Tensor:
        """``(B, N, D)`` → ``(B, N, D)``, the products in ``dtype`` (default: x's), ``attention`` one of
        ``ATTENTION_PATHS``."""
        B, N, D = x.shape
        dtype = dtype or x.dtype
        qkv = fp16_safe(self.qkv, dtype, x)  # (B, N, 3D)
        qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        attend = {"sdpa": self.sdpa, "blocked": self.blocked}[attention]
        out = fp16_safe(attend, qkv.dtype, *qkv.unbind(0))  # (B, N, D)
        return fp16_safe(self.out_proj, dtype, out)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(B, N, D)`` → ``(B, N, D)``, the products in ``dtype`` (default: x's)."""
        dtype = dtype or x.dtype
        if onednn_linears(x.device, dtype, x, *self.parameters()):
            # fc1 + GELU fused, in chunks of tokens (cpu_kernels); like qkv(), this reads fc1 and fc2's parameters
            # rather than calling the modules
            fc1, fc2 = ((fc.weight.to(dtype), fc.bias.to(dtype)) for fc in (self.fc1, self.fc2))
            return cpu_kernels.mlp(x.to(dtype), fc1, fc2)
        h = fp16_safe(self.fc1, dtype, x)  # (B, N, I), a fresh tensor, so the GELU can run in place
        h = torch.ops.aten.gelu_(h, approximate="tanh")  # the model was trained with tanh GELU
        return fp16_safe(self.fc2, dtype, h)


class EncoderLayer(nn.Module):
    """Pre-norm: ``x + attn(LN1(x))``, then ``x + mlp(LN2(x))``; x is the residual stream (float32 by default)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None, attention: str = "sdpa") -> torch.Tensor:
        # (a + b).to(a.dtype): one kernel that also casts back where the products ran wider than the stream
        x = (x + self.self_attn(self.layer_norm1(x), dtype, attention)).to(x.dtype)
        return (x + self.mlp(self.layer_norm2(x), dtype)).to(x.dtype)


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


@dataclass
class TowerOutput:
    """The tower's output plus, on request, hidden states (index 0 = embeddings, i = after layer i).

    Each hidden state is ``(B, N, D)``, before post_layernorm, in the output dtype, except that float16 runs keep
    float32 here: the residual stream may exceed fp16's range.
    """

    last_hidden_state: torch.Tensor  # (B, N, D), after post_layernorm
    # output_hidden_states=True: all num_hidden_layers + 1 of them; otherwise ().
    hidden_states: tuple[torch.Tensor, ...]
    # hidden_layers=[i, ...]: those states alone, by index; the others are never kept. Otherwise {}.
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


def concat_outputs(parts: Sequence[torch.Tensor | TowerOutput]) -> torch.Tensor | TowerOutput:
    """The outputs of consecutive chunks of a batch, as one output for the whole batch."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(cast(list[torch.Tensor], list(parts)))  # every part is of one kind
    outputs = cast(Sequence[TowerOutput], parts)
    layers = zip(*(o.hidden_states for o in outputs), strict=True)  # ((chunk 0's, chunk 1's, ...) per layer)
    return TowerOutput(last_hidden_state=torch.cat([o.last_hidden_state for o in outputs]),
                       hidden_states=tuple(torch.cat(states) for states in layers),
                       layers={i: torch.cat([o.layers[i] for o in outputs]) for i in outputs[0].layers})


class VisionTower(nn.Module):
    """SigLIP vision tower: NHWC pixels in [-1, 1] → ``(B, num_patches, hidden)``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # dtype of the matmuls and attention; None: the parameters' dtype. load() sets float32 for bf16/fp16
        # weights on a CPU without native support for them.
        self.compute_dtype: torch.dtype | None = None
        # dtype of the output and the hidden states; None: the parameters' dtype. load() sets the run dtype, which
        # differs from the stored one when a float32 CPU run keeps 16-bit weights as stored.
        self.output_dtype: torch.dtype | None = None
        # dtype of the residual stream and the LayerNorms: float32 keeps the sum of 27 layers close to the fp32
        # reference; bfloat16 (what transformers does in a bf16 run) moves half the bytes between the matmuls.
        self.residual_dtype = torch.float32
        # One of ATTENTION_PATHS; None: default_attention() for the device, the products' dtype and the image size.
        self.attention: str | None = None
        # scaled_dot_product_attention kernels allowed (torch picks among them in its own order); None: all.
        # On Hopper and Blackwell torch already puts cuDNN first, the fastest at head_dim 72 (docs/performance.md: H200).
        self.attention_backends: Sequence[SDPBackend] | None = None

    def attention_kernels(self) -> contextlib.AbstractContextManager[object]:
        if self.attention_backends is None:
            return contextlib.nullcontext()
        # No set_priority: on exit, torch restores a priority order read before its own lazy first-call set-up,
        # which drops the cuDNN-first order it gives Hopper GPUs, for every later caller in the process.
        return sdpa_kernel(list(self.attention_backends))

    def check_pixels(self, pixels: torch.Tensor) -> None:
        c, P = self.config, self.config.patch_size
        ok = (pixels.dim() == 4 and pixels.shape[-1] == c.num_channels
              and pixels.shape[1] >= P and pixels.shape[2] >= P)
        if not ok:
            raise ConfigError(
                f"pixels must be NHWC (B, H, W, {c.num_channels}) with H and W at least {P}, "
                f"e.g. (B, {c.image_size}, {c.image_size}, {c.num_channels}); got {tuple(pixels.shape)}"
            )

    def tokens_per_image(self, pixels: torch.Tensor) -> int:
        """Patches in one image of NHWC ``pixels`` (a remainder under one patch is dropped, as the conv drops it)."""
        P = self.config.patch_size
        return (pixels.shape[1] // P) * (pixels.shape[2] // P)

    def forward(self, pixels: torch.Tensor, *, output_hidden_states: bool = False,
                hidden_layers: Collection[int] | None = None) -> torch.Tensor | TowerOutput:
        """NHWC pixels ``(B, H, W, 3)`` → ``(B, N, D)``; a ``TowerOutput`` with ``output_hidden_states=True`` (every
        hidden state, in ``hidden_states``) or ``hidden_layers`` (only those, in ``layers``: one 896 px image's
        28 states take 0.5 GB in fp32)."""
        self.check_pixels(pixels)
        keep = self.check_hidden_layers(hidden_layers)
        per_chunk = max(1, CPU_CHUNK_TOKENS // self.tokens_per_image(pixels))
        if pixels.device.type == "cpu" and pixels.shape[0] > per_chunk:
            parts = [self.forward_chunk(chunk, output_hidden_states, keep) for chunk in pixels.split(per_chunk)]
            return concat_outputs(parts)
        return self.forward_chunk(pixels, output_hidden_states, keep)

    def check_hidden_layers(self, hidden_layers: Collection[int] | None) -> tuple[int, ...] | None:
        """``hidden_layers`` as a tuple of distinct indices in 0..depth, or None."""
        if hidden_layers is None:
            return None
        depth = self.config.num_hidden_layers
        bad = [i for i in hidden_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= depth]
        if bad:
            raise OptionError(f"hidden_layers must be integers in 0..{depth}, got {bad}")
        return tuple(dict.fromkeys(hidden_layers))

    def forward_chunk(self, pixels: torch.Tensor, output_hidden_states: bool,
                      hidden_layers: tuple[int, ...] | None = None) -> torch.Tensor | TowerOutput:
        """The forward of one chunk of a batch (all of it on a GPU)."""
        dtype = self.compute_dtype or self.embeddings.patch_embedding.weight.dtype
        result = self.run(pixels, dtype, output_hidden_states, hidden_layers)
        if dtype == torch.float16 and not _CHECK_EACH_PRODUCT.get():
            # An overflow anywhere leaves inf/NaN in the output (the float32 residual stream carries it to the
            # last LayerNorm), so one check here stands in for one per product. Then every product is redone
            # with its own check, and those that overflow run in float32.
            last = result.last_hidden_state if isinstance(result, TowerOutput) else result
            if not bool(torch.isfinite(last).all()):
                token = _CHECK_EACH_PRODUCT.set(True)
                try:
                    result = self.run(pixels, dtype, output_hidden_states, hidden_layers)
                finally:
                    _CHECK_EACH_PRODUCT.reset(token)
        return result

    def run(self, pixels: torch.Tensor, dtype: torch.dtype, output_hidden_states: bool,
            hidden_layers: tuple[int, ...] | None = None) -> torch.Tensor | TowerOutput:
        """One pass, the products in ``dtype``."""
        out_dtype = self.output_dtype or self.embeddings.patch_embedding.weight.dtype
        hidden_dtype = torch.float32 if out_dtype == torch.float16 else out_dtype
        if self.residual_dtype not in (torch.float32, torch.bfloat16):  # fp16 cannot hold SigLIP's residuals
            raise OptionError(f"residual_dtype must be float32 or bfloat16, got {self.residual_dtype}")
        inputs = (pixels, *self.parameters())  # what a gradient could be wanted for
        tokens = self.tokens_per_image(pixels)
        attention = self.attention or default_attention(pixels.device, dtype, tokens, *inputs)
        if attention not in ATTENTION_PATHS:
            raise OptionError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {attention!r}")
        if attention == "blocked" and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            raise OptionError("the blocked attention has no backward: use attention='sdpa' to take gradients")
        # The states to keep, by index: a state not kept is freed as soon as the next layer has read it.
        keep = set(range(len(self.encoder.layers) + 1)) if output_hidden_states else set(hidden_layers or ())
        x = self.embeddings(pixels, dtype).to(self.residual_dtype)  # (B, N, D)
        kept = {0: x.to(hidden_dtype)} if 0 in keep else {}
        with self.attention_kernels():
            for i, layer in enumerate(self.encoder.layers, start=1):
                x = layer(x, dtype, attention)  # (B, N, D) residual_dtype
                if i in keep:
                    kept[i] = x.to(hidden_dtype)
        x = self.post_layernorm(x).to(out_dtype)  # (B, N, D)
        if output_hidden_states or hidden_layers is not None:
            return TowerOutput(last_hidden_state=x,
                               hidden_states=tuple(kept.values()) if output_hidden_states else (),
                               layers={i: kept[i] for i in hidden_layers or ()})
        return x
