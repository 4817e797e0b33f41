"""Attention, linears and the MLP for a CPU that computes bf16 natively (AVX512-BF16 or AMX).

Why not the obvious calls. Measured on 2 vCPUs of an AMD EPYC (Zen 5, AVX512-BF16), torch 2.13, one full-size
Gemma 3 layer (4096 tokens, 16 heads of 72):

- ``scaled_dot_product_attention``'s CPU flash kernel runs bf16 at 0.19 TFLOP/s, no faster than fp32: 0.42 s, two
  thirds of the layer. ``torch.bmm`` on the attention's shapes in bf16 is as slow (0.22 TFLOP/s for q·kᵀ).
- A 2-D bf16 ``torch.mm`` (oneDNN) on the same shapes reaches 0.7-0.9 TFLOP/s, and torch's bf16 softmax over a block
  of rows that stays in cache takes 0.06 s for the layer. So ``blocked_attention`` works one head and one block of
  queries at a time: 0.15-0.16 s for the layer, with the same cosine to the fp32 tower as the flash kernel.
- oneDNN's linear with the bias (and fc1's tanh GELU) fused saves ``addmm``'s copy of the bias into its output and
  the separate GELU pass: fc1 + GELU 52 ms against 63 ms.
- glibc maps every allocation above 32 MB afresh, so its pages fault in on each use; fc1's output for 4096 tokens
  (35 MB) did. ``mlp`` runs 2048 tokens at a time. The last two gained 2-5% each, near this machine's noise.

Full-tower figures against transformers: README, Performance.
"""

from __future__ import annotations

import torch

# Scores held at once: 2M elements, 4 MB in bf16, so a block and its softmax stay in cache (512 queries at 4096 keys).
SCORE_BLOCK_ELEMENTS = 1 << 21
# Tokens per chunk of the MLP: fc1's output for them (2048 x 4304 in bf16, 18 MB) stays under glibc's 32 MB.
MLP_ROWS = 2048

# Whether these paths can run here: oneDNN's fused linear (torch.ops.mkldnn._linear_pointwise, which inductor uses)
# exists, and oneDNN runs bf16 on this CPU (AVX-512 or AMX; on an AVX2-only CPU its bf16 ops refuse to run). Read once
# here, not in the forward, where torch.compile would trace it.
ONEDNN_BF16 = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
               and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


# A custom op, so that torch.compile keeps it whole: dynamo would unroll the loops (27 layers x 16 heads x 8 blocks),
# and a graph break per layer left most layers uncompiled (one recompile per layer's parameters, limit 8).
@torch.library.custom_op("gemma3_vision::blocked_attention", mutates_args=())
def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, H, N, Dh)`` each → ``(B, N, H·Dh)``: ``softmax(q·kᵀ·scale)·v``, one head and block of queries at a time.

    The scores are rounded to q's dtype before the softmax (so is q once scaled), much as transformers' eager
    attention rounds them, and the softmax itself runs in float32 inside torch's kernel. No more than one block of
    scores ever exists. There is no backward: the tower takes this path only when no gradient is wanted.
    """
    B, H, N, Dh = q.shape
    rows = max(1, min(N, SCORE_BLOCK_ELEMENTS // k.shape[2]))
    q = q * scale  # (B, H, N, Dh): once here rather than on every block of scores
    out = q.new_empty(B, H, N, Dh)
    for b in range(B):
        for h in range(H):
            k_t, v_h = k[b, h].T, v[b, h]  # (Dh, Nk), (Nk, Dh): views, oneDNN reads the strides
            for start in range(0, N, rows):
                scores = torch.mm(q[b, h, start:start + rows], k_t)  # (rows, Nk)
                # softmax(dtype=torch.float32) would return fp32 probabilities, but from bf16 input it takes a slow
                # path (10x here); the bf16 softmax computes in fp32 too and rounds only its result.
                torch.mm(scores.softmax(dim=-1), v_h, out=out[b, h, start:start + rows])  # (rows, Dh)
    return out.transpose(1, 2).reshape(B, N, H * Dh)  # a contiguous copy, as the fake below promises


@blocked_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, N, Dh = q.shape
    return q.new_empty(B, N, H * Dh)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``x·Wᵀ + b`` as one oneDNN call, ``(..., in)`` → ``(..., out)``; ``activation="gelu"``: then tanh GELU.

    The bias and the GELU apply to the fp32 accumulator, before the result is rounded to x's dtype. No backward.
    """
    algorithm = "tanh" if activation == "gelu" else ""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, activation, [], algorithm)
    return y.view(*x.shape[:-1], weight.shape[0])


def mlp(x: torch.Tensor, fc1: tuple[torch.Tensor, torch.Tensor], fc2: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``fc2(gelu_tanh(fc1(x)))`` for ``(..., D)``, ``MLP_ROWS`` tokens at a time; ``fc1``, ``fc2``: (weight, bias)."""
    rows = x.reshape(-1, x.shape[-1])  # (T, D): every token of the batch, so a chunk is MLP_ROWS tokens whatever B
    out = rows.new_empty(rows.shape[0], fc2[0].shape[0])  # (T, D)
    for start in range(0, rows.shape[0], MLP_ROWS):
        h = linear(rows[start:start + MLP_ROWS], *fc1, activation="gelu")  # (rows, I)
        out[start:start + MLP_ROWS] = linear(h, *fc2)
    return out.view(*x.shape[:-1], out.shape[-1])
