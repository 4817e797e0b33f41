"""Attention, linears and the MLP on a CPU, in float32 and in bf16 where the CPU computes it natively.

Every product here is a oneDNN call where oneDNN runs the dtype (``torch.mm`` otherwise, as for the tests' float64).
Why not the obvious calls. Measured on 2 vCPUs of an AMD EPYC (Zen 5,
AVX-512 and AVX512-BF16), torch 2.13, one full-size Gemma 3 layer (4096 tokens, 16 heads of 72):

- torch's float32 matmuls (``F.linear``, ``torch.mm``) go to MKL: 0.19-0.21 TFLOP/s on the tower's shapes, its rate
  when held to AVX2 too (it does not use AVX-512 on this AMD CPU) and the rate transformers' float32 tower ran at.
  oneDNN's own kernels run the same shapes at 0.37-0.45; held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``), at 0.22-0.24.
- ``scaled_dot_product_attention``'s CPU flash kernel runs bf16 at 0.19 TFLOP/s, no faster than fp32: 0.42 s, two
  thirds of the layer. ``torch.bmm`` on the attention's shapes in bf16 is as slow (0.22 TFLOP/s for q·kᵀ).
- A 2-D bf16 product in oneDNN on the same shapes reaches 0.7-0.9 TFLOP/s, and torch's bf16 softmax over a block
  of rows that stays in cache takes 0.06 s for the layer. So ``blocked_attention`` works one head and one block of
  queries at a time: 0.15-0.18 s for the layer with torch's softmax, with the same cosine to the fp32 tower as the
  flash kernel. In float32 it took 0.27-0.28 s against the flash kernel's 0.43 s.
- That softmax is bound by its exp, and torch's exp2 runs 1.3x (bf16) to 5x (float32) faster than its exp. So the
  softmax is 2**x, unnormalised and without the usual subtraction of each row's maximum where that changes nothing,
  and v's product also sums each row: the layer's attention ran 15% faster in bf16 (0.146-0.150 s against
  0.168-0.173) and 10-19% faster in float32, timed in alternation (see LOG2_E and row_sum_bounds).
- oneDNN's linear with the bias (and fc1's tanh GELU) fused saves ``addmm``'s copy of the bias into its output and
  the separate GELU pass: fc1 + GELU 52 ms against 63 ms.
- glibc maps every allocation above 32 MB afresh, so its pages fault in on each use; fc1's output for 4096 tokens
  (35 MB in bf16) did. ``mlp`` runs 2048 tokens at a time in bf16, 1024 in float32. The last two gained 2-5% each, near
  this machine's noise.

Full-tower figures against transformers: docs/performance.md.
"""

from __future__ import annotations

import math

import torch

# Scores held at once: 2M elements (512 queries at 4096 keys), 4 MB in bf16 and 8 MB in float32, so a block and its
# softmax stay in cache. Tuned in bf16: 256 or 1024 queries took as long, in either dtype.
SCORE_BLOCK_ELEMENTS = 1 << 21
# Bytes of fc1's output per chunk of the MLP (2048 tokens x 4304 in bf16, 1024 in float32): under glibc's 32 MB.
MLP_CHUNK_BYTES = 18 << 20

# Whether these paths can run here: oneDNN's fused linear (torch.ops.mkldnn._linear_pointwise, which inductor uses)
# exists, and for bf16 whether oneDNN runs it on this CPU (AVX-512 or AMX; on an AVX2-only CPU its bf16 ops refuse to
# run). Read once here, not in the forward, where torch.compile would trace it.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_BF16 = ONEDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
# Whether torch's own kernels (exp2 among them) run AVX-512 here. On AVX2 only (simulated on the Zen 5 with
# ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2) the float32 blocked attention tied with the flash kernel at
# 4096 tokens and was 11% slower at 1024, while oneDNN's linears stayed about 6% faster than MKL's.
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether this module's oneDNN calls run ``dtype`` here: float32 wherever oneDNN exists, bf16 per ONEDNN_BF16."""
    return (dtype == torch.float32 and ONEDNN) or (dtype == torch.bfloat16 and ONEDNN_BF16)


def mlp_chunk(tokens: int, width: int, element_size: int) -> int:
    """Tokens per chunk of ``mlp``: equal chunks of at most ``MLP_CHUNK_BYTES`` of fc1's ``(tokens, width)`` output
    (2048 + 2048 tokens ran 3% faster than 2192 + 1904 in bf16)."""
    chunks = max(1, -(-tokens * width * element_size // MLP_CHUNK_BYTES))  # ceil division; one for no tokens
    return max(1, -(-tokens // chunks))


def dense(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a row- or column-major matrix, copied only if it is neither. oneDNN took 1.6 s, against 0.7 ms,
    for one (512, 72)·(72, 4096) product whose ``(4096, 72)`` operand had rows 3456 elements apart (k sliced out of
    the fused qkv)."""
    return weight if weight.is_contiguous() or weight.T.is_contiguous() else weight.contiguous()


def matmul_transposed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·bᵀ`` for 2-D ``(M, K)`` and ``(N, K)`` → ``(M, N)``: oneDNN's linear on a CPU where it runs the dtype, else
    ``torch.mm``."""
    if a.device.type == "cpu" and onednn_runs(a.dtype):
        return torch.ops.mkldnn._linear_pointwise(a, dense(b), None, "none", [], "")
    return torch.mm(a, b.T)  # float64 (the tests' exact reference), CUDA, and bf16 where oneDNN refuses it


# The softmax as 2**x: torch's exp2 ran a (512, 4096) block in 0.23 ms in bf16 and 0.16 ms in float32, its exp in
# 0.29 and 0.84 ms, its whole softmax in 0.45 and 0.41 ms. log2(e) folds into q's scale.
LOG2_E = math.log2(math.e)


def row_sum_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """The range a row's sum of ``2**score`` must lie in for the unshifted fast path in ``dtype``: 2**-80 to 2**100
    in float32 and bf16. Above it a term, the sum or a sum of terms times v could overflow (a product that overflows
    all the same, from a huge v, is caught as non-finite). Below it terms would underflow: oneDNN may flush
    subnormals to zero, which with a sum of at least 2**-80 costs the output at most Nk·2**-126 / 2**-80 = Nk·2**-46
    in absolute terms (2**-34 for Gemma 3's 4096 keys), far below rounding. That admits a row whose largest score (in
    natural units) lies between about -60 and +60. float16 has too few exponent bits: its range is empty, so every
    row takes the shifted path."""
    info = torch.finfo(dtype)
    return info.tiny * 2.0**46, info.max * 2.0**-28


def _scores_times_v(q_rows: torch.Tensor, k: torch.Tensor, v_ones: torch.Tensor, shifted: bool) -> torch.Tensor:
    """``(rows, Dh)``, ``(Nk, Dh)``, ``(Dh + 1, Nk)`` → ``(rows, Dh + 1)``: ``[Σ p·v, Σ p]``. ``v_ones`` is vᵀ with a
    row of ones, so the one product that weights v also sums p, in float32 inside oneDNN.

    Unshifted, ``p = 2**(q·kᵀ)``. Shifted, the textbook softmax: each row's largest score is subtracted in float32
    (at least) and p normalised before the product, so that no sum can overflow, even float16's (4096 keys of v = 20
    would); the division after it is then by a sum near 1."""
    scores = matmul_transposed(q_rows, k)  # (rows, Nk), in log2 units
    if not shifted:
        return matmul_transposed(scores.exp2_(), v_ones)  # (rows, Dh + 1)
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))
    p = (wide - wide.amax(dim=-1, keepdim=True)).exp2_()  # (rows, Nk), each in (0, 1]
    p /= p.sum(dim=-1, keepdim=True)
    return matmul_transposed(p.to(scores.dtype), v_ones)  # (rows, Dh + 1)


# A custom op, so that torch.compile keeps it whole: dynamo would unroll the loops (27 layers x 16 heads x 8 blocks),
# and a graph break per layer left most layers uncompiled (one recompile per layer's parameters, limit 8).
@torch.library.custom_op("gemma3_vision::blocked_attention", mutates_args=())
def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, H, N, Dh)`` each → ``(B, N, H·Dh)``: ``softmax(q·kᵀ·scale)·v``, one head and block of queries at a time.

    The softmax is ``2**s / Σ 2**s`` with ``s = q·kᵀ·scale·log2(e)``, normalised after the product with v. The usual
    subtraction of each row's largest score, a pass of its own over the scores, is left out where the row's sum shows
    it changes nothing (see row_sum_bounds). The scores and p are rounded to q's dtype (so is q once scaled), much as
    transformers' eager attention rounds them; the products and the row sums accumulate in float32 and are rounded
    to q's dtype before the division. No more than one block of scores ever exists. There is no backward: the tower
    takes this path only when no gradient is wanted.
    """
    B, H, N, Dh = q.shape
    rows = max(1, min(N, SCORE_BLOCK_ELEMENTS // k.shape[2]))
    least_sum, most_sum = row_sum_bounds(q.dtype)
    unshifted_first = least_sum < most_sum  # float16: never
    out = q.new_empty(B, H, N, Dh)
    for b in range(B):
        for h in range(H):
            # one head's operands, contiguous once here (see dense), and q scaled once rather than on every block
            q_h, k_h = q[b, h] * (scale * LOG2_E), k[b, h].contiguous()  # (N, Dh), (Nk, Dh)
            v_ones = torch.cat([v[b, h].T, v.new_ones(1, v.shape[2])])  # (Dh + 1, Nk)
            for start in range(0, N, rows):
                q_rows = q_h[start:start + rows]
                pv = _scores_times_v(q_rows, k_h, v_ones, shifted=not unshifted_first)  # (rows, Dh + 1)
                if unshifted_first:
                    # the whole block tested at once first: building the per-row mask on every block made the
                    # attention 1-2% slower
                    least, most = (float(x) for x in torch.aminmax(pv[:, Dh]))  # NaN fails the test below
                    if not (least_sum <= least and most <= most_sum and pv.isfinite().all()):
                        total = pv[:, Dh]
                        redo = ~((total >= least_sum) & (total <= most_sum) & pv.isfinite().all(dim=1))  # (rows,)
                        pv[redo] = _scores_times_v(q_rows[redo], k_h, v_ones, shifted=True)
                torch.div(pv[:, :Dh], pv[:, Dh:], out=out[b, h, start:start + rows])  # (rows, Dh)
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
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), dense(weight), bias, activation, [], algorithm)
    return y.view(*x.shape[:-1], weight.shape[0])


def mlp(x: torch.Tensor, fc1: tuple[torch.Tensor, torch.Tensor], fc2: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``fc2(gelu_tanh(fc1(x)))`` for ``(..., D)``, ``mlp_chunk`` tokens at a time; ``fc1``, ``fc2``: (weight, bias)."""
    rows = x.reshape(-1, x.shape[-1])  # (T, D): every token of the batch, so a chunk crosses images
    chunk = mlp_chunk(rows.shape[0], fc1[0].shape[0], x.element_size())
    out = rows.new_empty(rows.shape[0], fc2[0].shape[0])  # (T, D)
    for start in range(0, rows.shape[0], chunk):
        h = linear(rows[start:start + chunk], *fc1, activation="gelu")  # (chunk, I)
        out[start:start + chunk] = linear(h, *fc2)
    return out.view(*x.shape[:-1], out.shape[-1])
