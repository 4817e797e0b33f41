"""The MLX backend: the tower and projector written with ``mlx.core``, on Apple silicon's GPU (or MLX's CPU build).

Same model as ``model/tower.py`` and ``model/projector.py``, in forward order: a stride-14 conv on NHWC pixels
(MLX's own conv layout) plus learned positions, then per layer ``x + attn(LN1(x))`` and ``x + mlp(LN2(x))`` with
tanh GELU and ``mx.fast.scaled_dot_product_attention``, then ``post_layernorm``; the projector's 4×4 mean pool,
Gemma RMSNorm ``(1 + w)`` in float32, and ``x @ W``.

Precision, as the torch path: the residual stream and the LayerNorms run in ``VisionTower.residual_dtype`` (float32
by default), the products in the run dtype; weights stored in another dtype (bf16 weights in a float32 run) are cast
per product, never all at once. A float16 pass whose output holds inf/NaN (SigLIP activations can pass 65504) is run
again with the products in float32 and its output cast to float16.

Weights are held once: each torch parameter is copied into an MLX array, then pointed at that array's memory (the
torch modules in ``Gemma3Vision.model`` stay usable, reading the same bytes). Results come back as torch tensors on
the CPU, which on Apple silicon is the same memory as the GPU's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as mnn
import torch

from ..checkpoints.weights import VisionModel
from ..model.projector import pool_grid_side
from ..model.tower import interpolate_position_embedding

# Tokens run at once: a batch goes through the tower in chunks of about this many (one 896-px image, sixteen at
# 224 px), which bounds the activations, as on the torch path's CPU chunks.
CHUNK_TOKENS = 4096

TO_MX = {torch.float32: mx.float32, torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}
TO_TORCH = {v: k for k, v in TO_MX.items()}


def from_torch(t: torch.Tensor) -> mx.array:
    """A CPU tensor's values as an MLX array of the same dtype (numpy has no bfloat16: its bits travel as int16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def to_torch(a: mx.array) -> torch.Tensor:
    """An MLX array as a CPU tensor on the array's own memory (no copy; the tensor keeps the array alive)."""
    a = mx.contiguous(a)
    mx.eval(a)
    if a.size == 0:
        return torch.empty(a.shape, dtype=TO_TORCH[a.dtype])
    buffer = memoryview(a)  # type: ignore[arg-type]  # mlx arrays implement the buffer protocol; stubs omit it
    return torch.frombuffer(buffer, dtype=TO_TORCH[a.dtype]).view(a.shape)


def share(param: torch.nn.Parameter) -> mx.array:
    """``param``'s values as an MLX array, ``param`` then re-pointed at that array's memory: one copy for both."""
    a = from_torch(param)
    mx.eval(a)
    param.data = to_torch(a)  # the old storage is freed here, unless it is also a view of something else
    return a


_thread = threading.local()


@contextlib.contextmanager
def thread_stream() -> Iterator[None]:
    """MLX work on a stream of the calling thread's own: from MLX 0.31.2 streams are per thread, and only the
    main thread has a default GPU stream, so a call from a worker thread (a server's, say) needs one made there."""
    if threading.current_thread() is threading.main_thread():
        yield
        return
    if not hasattr(_thread, "stream"):
        _thread.stream = mx.new_stream(mx.default_device())
    with mx.stream(_thread.stream):
        yield


def default_dtype(cpu_choice: torch.dtype) -> torch.dtype:
    """The run dtype when none is asked for: bfloat16 on MLX's GPU (Apple silicon runs it at full rate), else what
    the torch CPU path would pick (``cpu_choice``: bfloat16 on CPUs with native bf16, else float32)."""
    return torch.bfloat16 if mx.default_device() == mx.gpu else cpu_choice


def linear(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """``x @ weightᵀ + bias`` in x's dtype, the stored weights cast per call (bf16 → fp32, say)."""
    return mx.addmm(bias.astype(x.dtype), x, weight.astype(x.dtype).T)


class MLXBackend:
    """Runs the tower and projector of a loaded ``VisionModel`` with MLX; the weights are shared with its modules."""

    name = "mlx"

    def __init__(self, model: VisionModel, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype  # the run dtype: products and outputs
        self.device = torch.device("cpu")  # where results come back; MLX computes on its default device
        self.config = model.vision_tower.config
        # every parameter by its module path, e.g. "vision_tower.encoder.layers.0.mlp.fc1.weight"
        self.weights = {name: share(p) for name, p in model.named_parameters()}
        self.positions: dict[tuple[int, int], mx.array] = {}  # (gh, gw) → (gh*gw, D) float32 table

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as the torch modules it was built from; unpickling converts them again."""
        return (MLXBackend, (self.model, self.dtype))

    def w(self, name: str) -> mx.array:
        return self.weights[f"vision_tower.{name}"]

    # -- the tower, smallest piece first

    def position_table(self, gh: int, gw: int) -> mx.array:
        """The learned positions for a ``gh × gw`` grid, float32 ``(gh*gw, D)``: resampled once per grid size by
        the torch path's own ``interpolate_position_embedding`` (bicubic, as transformers)."""
        if (gh, gw) not in self.positions:
            table = self.model.vision_tower.embeddings.position_embedding.weight.detach().float()  # (N, D)
            self.positions[(gh, gw)] = from_torch(interpolate_position_embedding(table, gh, gw))
        return self.positions[(gh, gw)]

    def embeddings(self, pixels: mx.array, dtype: mx.Dtype) -> mx.array:
        """NHWC ``(B, H, W, C)`` → ``(B, N, D)`` float32; the conv (valid padding, a remainder dropped) in dtype."""
        P = self.config.patch_size
        weight = self.w("embeddings.patch_embedding.weight").transpose(0, 2, 3, 1).astype(dtype)  # (D, P, P, C)
        x = mx.conv2d(pixels.astype(dtype), weight, stride=P)  # (B, gh, gw, D)
        x = (x + self.w("embeddings.patch_embedding.bias").astype(dtype)).astype(mx.float32)
        B, gh, gw, D = x.shape
        return x.reshape(B, gh * gw, D) + self.position_table(gh, gw)  # (B, N, D)

    def layer_norm(self, x: mx.array, name: str) -> mx.array:
        """LayerNorm in x's dtype (the residual stream's), whatever the stored dtype."""
        w, b = self.w(f"{name}.weight").astype(x.dtype), self.w(f"{name}.bias").astype(x.dtype)
        return mx.fast.layer_norm(x, w, b, self.config.layer_norm_eps)

    def attention(self, x: mx.array, prefix: str) -> mx.array:
        """``(B, N, D)`` → ``(B, N, D)`` in x's dtype: bidirectional, biases on q/k/v/out, scale ``head_dim ** -0.5``."""
        B, N, D = x.shape
        H, Dh = self.config.num_attention_heads, self.config.head_dim
        q, k, v = (linear(x, self.w(f"{prefix}.{p}_proj.weight"), self.w(f"{prefix}.{p}_proj.bias"))
                   .reshape(B, N, H, Dh).transpose(0, 2, 1, 3) for p in "qkv")  # (B, H, N, Dh) each
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=Dh**-0.5)  # (B, H, N, Dh)
        out = out.transpose(0, 2, 1, 3).reshape(B, N, D)  # (B, N, H·Dh)
        return linear(out, self.w(f"{prefix}.out_proj.weight"), self.w(f"{prefix}.out_proj.bias"))

    def mlp(self, x: mx.array, prefix: str) -> mx.array:
        """``(B, N, D)`` → ``(B, N, D)`` in x's dtype; tanh GELU, as the model was trained."""
        h = mnn.gelu_approx(linear(x, self.w(f"{prefix}.fc1.weight"), self.w(f"{prefix}.fc1.bias")))  # (B, N, I)
        return linear(h, self.w(f"{prefix}.fc2.weight"), self.w(f"{prefix}.fc2.bias"))

    def encoder_layer(self, x: mx.array, i: int, dtype: mx.Dtype) -> mx.array:
        """Pre-norm layer ``i`` (from 0); x is the residual stream, the products run in ``dtype``."""
        prefix = f"encoder.layers.{i}"
        x = x + self.attention(self.layer_norm(x, f"{prefix}.layer_norm1").astype(dtype), f"{prefix}.self_attn")
        return x + self.mlp(self.layer_norm(x, f"{prefix}.layer_norm2").astype(dtype), f"{prefix}.mlp")

    def run(self, pixels: mx.array, dtype: mx.Dtype, keep: Sequence[int]) -> tuple[mx.array, dict[int, mx.array]]:
        """One pass: NHWC pixels → the output ``(B, N, D)`` in the run dtype and the kept states by index."""
        out_dtype = TO_MX[self.dtype]
        hidden_dtype = mx.float32 if out_dtype == mx.float16 else out_dtype  # fp16 cannot hold every residual
        residual = TO_MX[self.model.vision_tower.residual_dtype]
        x = self.embeddings(pixels, dtype).astype(residual)  # (B, N, D)
        kept = {0: x.astype(hidden_dtype)} if 0 in keep else {}
        for i in range(self.config.num_hidden_layers):
            x = self.encoder_layer(x, i, dtype).astype(residual)  # fp32 + bf16 products is fp32: a no-op there
            if i + 1 in keep:
                kept[i + 1] = x.astype(hidden_dtype)
        x = self.layer_norm(x, "post_layernorm").astype(out_dtype)  # (B, N, D)
        mx.eval(x, kept)
        return x, kept

    def run_checked(self, pixels: mx.array, keep: Sequence[int]) -> tuple[mx.array, dict[int, mx.array]]:
        """``run`` in the run dtype; a float16 pass whose output holds inf/NaN again with float32 products."""
        dtype = TO_MX[self.dtype]
        out, kept = self.run(pixels, dtype, keep)
        if dtype == mx.float16 and not mx.isfinite(out).all().item():
            out, kept = self.run(pixels, mx.float32, keep)
        return out, kept

    def tower(self, pixels: torch.Tensor, layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        with thread_stream():
            return self.tower_here(pixels, layers)

    def tower_here(self, pixels: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``tower`` on the current stream."""
        tower = self.model.vision_tower
        tower.check_pixels(pixels)
        keep = tower.check_hidden_layers(layers) or ()
        x = from_torch(pixels.float())  # (B, H, W, C)
        # Chunks of about CHUNK_TOKENS tokens (one 896-px image): attention at head_dim 72 may build the
        # (H, N, N) scores, 1 GB in float32 for one 896-px image
        per_chunk = max(1, CHUNK_TOKENS // tower.tokens_per_image(pixels))
        parts = [self.run_checked(x[i:i + per_chunk], keep) for i in range(0, max(x.shape[0], 1), per_chunk)]
        out = mx.concatenate([p[0] for p in parts])  # (B, N, D)
        return to_torch(out), {i: to_torch(mx.concatenate([p[1][i] for p in parts])) for i in keep}

    # -- the projector

    def project(self, x: torch.Tensor) -> torch.Tensor:
        with thread_stream():
            return self.project_here(x)

    def project_here(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` → ``(B, T, text_hidden)`` in x's dtype, one image at a time (tokens independent of the
        batch, as on the torch path)."""
        projector = self.model.multi_modal_projector
        assert projector is not None  # callers check has_projector first
        k = projector.kernel_size
        side = pool_grid_side(x.shape[1], k)
        norm = self.weights["multi_modal_projector.mm_soft_emb_norm.weight"].astype(mx.float32)
        weight = self.weights["multi_modal_projector.mm_input_projection_weight"]  # (D, text_hidden)
        images = []
        for image in from_torch(x):  # (N, D) each
            D = image.shape[-1]
            grid = image.astype(mx.float32).reshape(side // k, k, side // k, k, D)
            tokens = grid.mean(axis=(1, 3)).reshape(-1, D).astype(image.dtype)  # (T, D), row-major, in x's dtype
            # Gemma's RMSNorm: in float32, times (1 + w) before casting back
            tokens = mx.fast.rms_norm(tokens.astype(mx.float32), 1.0 + norm, projector.mm_soft_emb_norm.eps)
            tokens = tokens.astype(image.dtype)
            images.append(tokens @ weight.astype(image.dtype))  # (T, text_hidden)
        if not images:
            return torch.empty(0, (side // k) ** 2, weight.shape[1], dtype=x.dtype)
        return to_torch(mx.stack(images))
