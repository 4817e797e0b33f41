"""The tower on its own: attention paths agree, shapes, batch independence, dtypes, the compute-dtype policy, fp16."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VISION, TOL, cosine, max_abs, states_alive_at_the_last_norm
from gemma3_vision import api
from gemma3_vision.errors import ConfigError
from gemma3_vision.model import cpu_kernels
from gemma3_vision.model import tower as model
from gemma3_vision.model.tower import Attention, VisionTower

CPU = torch.device("cpu")


def tower(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, compute: torch.dtype | None = None,
          scale_mlp: float = 1.0) -> VisionTower:
    """The tiny tower with the tiny random weights (fc1/fc2 weights times ``scale_mlp``), stored in ``dtype``."""
    sd = {}
    for k, v in state.items():
        if not k.startswith("vision_tower."):
            continue
        k = k[len("vision_tower."):]
        sd[k] = (v * scale_mlp if ".mlp.fc" in k and k.endswith("weight") else v).to(dtype)
    with torch.device("meta"):
        t = VisionTower(TINY_VISION)
    t.load_state_dict(sd, strict=True, assign=True)
    t.compute_dtype = compute
    return t.eval()


def pixels(n: int, size: int = TINY_VISION.image_size, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g) * 2 - 1  # NHWC in [-1, 1]


@torch.inference_mode()
def test_sdpa_and_blocked_attention_agree(tiny_state):
    t = tower(tiny_state)
    x = pixels(2)
    t.attention = "sdpa"
    sdpa = t(x)
    t.attention = "blocked"
    blocked = t(x)
    d = max_abs(sdpa, blocked)
    assert d <= 1e-5, f"sdpa vs blocked attention: max abs diff {d:.3g} > 1e-5"


# float64 takes torch.mm (the exact check of the blocking), float32 oneDNN's products where torch has them
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tokens", [7, 300])  # fewer rows than one block; several blocks and a short last one
def test_blocked_attention_in_blocks_equals_one_softmax(monkeypatch, tokens, dtype, tolerance):
    """Blocks of queries (here 64 at a time) give the textbook softmax(q·kᵀ·scale)·v, over batch and heads."""
    g = torch.Generator().manual_seed(5)
    # q, k and v as the tower passes them: strided views of one fused qkv product
    qkv = torch.randn(2, tokens, 3, 3, 8, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    q, k, v = qkv.unbind(0)
    expected = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v  # (2, 3, tokens, 8)
    expected = expected.transpose(1, 2).reshape(2, tokens, 3 * 8)  # heads merged, as the op returns them
    monkeypatch.setattr(cpu_kernels, "SCORE_BLOCK_ELEMENTS", 64 * tokens)
    out = cpu_kernels.blocked_attention(q.to(dtype), k.to(dtype), v.to(dtype), 0.3)
    assert out.shape == (2, tokens, 3 * 8)
    assert out.dtype == dtype
    d = max_abs(out, expected)
    assert d <= tolerance, f"blocked attention vs one softmax: max abs diff {d:.3g} > {tolerance:g} ({dtype})"


def rows_by_path(monkeypatch) -> Counter:
    """Counts the query rows blocked_attention sends through each path: {shifted (bool): rows}."""
    rows: Counter = Counter()
    real = cpu_kernels._scores_times_v

    def counted(q_rows, k_h, v_ones, shifted):
        rows[shifted] += q_rows.shape[0]
        return real(q_rows, k_h, v_ones, shifted)

    monkeypatch.setattr(cpu_kernels, "_scores_times_v", counted)
    return rows


# float32 and bf16 take oneDNN, float64 torch.mm, whose range holds these rows (so none is redone). In bf16 scores
# near 300 round by a whole unit: there only the routing is checked, and that the output is finite.
@pytest.mark.parametrize(("dtype", "tolerance", "extreme_rows_redone"),
                         [(torch.float32, 1e-4, True), (torch.bfloat16, None, True), (torch.float64, 1e-12, False)])
def test_blocked_attention_redoes_only_the_rows_out_of_the_fast_paths_range(monkeypatch, dtype, tolerance,
                                                                            extreme_rows_redone):
    """The fast path leaves out the softmax's max subtraction. Rows whose largest score is near 300 (2**s would
    overflow float32) or whose scores all lie near -300 (2**s would underflow it) sit in blocks beside ordinary rows:
    those rows alone go again with their maximum subtracted, and every row gives the textbook softmax."""
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(3, 1, 2, 40, 8, generator=g, dtype=torch.float64).unbind(0)  # (B, H, N, Dh) each
    k[..., 0] += 10.0  # every key shares a component, so a query against it scores low on every key
    high, low = [3, 17, 30], [5, 31]
    q[:, :, high] *= 150.0  # scores of a few hundred, of both signs
    q[:, :, low, 0] = -100.0  # about -300 against every key
    expected = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v  # (1, 2, 40, 8)
    expected = expected.transpose(1, 2).reshape(1, 40, 2 * 8)
    redone = rows_by_path(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "SCORE_BLOCK_ELEMENTS", 16 * 40)  # blocks of 16 queries: 3 a head
    out = cpu_kernels.blocked_attention(q.to(dtype), k.to(dtype), v.to(dtype), 0.3)
    if tolerance is None:
        assert out.isfinite().all()
    else:
        d = max_abs(out, expected)
        assert d <= tolerance, f"blocked attention, extreme rows, vs one softmax: max abs diff {d:.3g} > {tolerance:g}"
    extreme = 2 * len(high + low) if extreme_rows_redone else 0
    assert redone == Counter({False: 2 * 40, True: extreme}), redone  # every row once, the extreme ones again


def test_blocked_attention_redoes_a_row_whose_sum_fits_but_whose_products_overflow(monkeypatch):
    """float32, one query scoring 62 (2**90 in log2 units) on each of 40 keys: the row sums to 2**95, in range, but
    with v = 2**40 its products reach 2**135 and overflow. Only that row goes again, and it gives v's mean."""
    q, k = torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 40, 4)  # (B, H, N, Dh)
    k[..., 0] = 1.0
    q[0, 0, 1, 0] = 62.4 / 0.3  # every key scores 62.4 for query 1 (0 for the others)
    v = torch.full((1, 1, 40, 4), 2.0**40)
    v[0, 0, ::2] *= 0.5  # even keys 2**39: the mean is 0.75 * 2**40
    rows = rows_by_path(monkeypatch)
    out = cpu_kernels.blocked_attention(q, k, v, 0.3)  # (1, 3, 4)
    d = max_abs(out / 2.0**40, torch.full((1, 3, 4), 0.75))
    assert d <= 1e-6, f"a row with overflowing products, in units of 2**40: max abs diff {d:.3g} > 1e-6"
    assert rows == Counter({False: 3, True: 1}), rows


def test_blocked_attention_in_float16_normalises_before_v(monkeypatch):
    """float16 (largest 65504) over 4096 keys with v = 20: unnormalised, Σ p·v would reach 4096 x 20 and overflow.
    Every row takes the shifted path, which normalises p first, and gives 20."""
    g = torch.Generator().manual_seed(8)
    q, k = (0.01 * torch.randn(1, 1, n, 8, generator=g) for n in (4, 4096))  # scores near 0: nearly uniform
    q, k = q.half(), k.half()
    v = torch.full((1, 1, 4096, 8), 20.0, dtype=torch.float16)
    rows = rows_by_path(monkeypatch)
    out = cpu_kernels.blocked_attention(q, k, v, 0.3)
    d = max_abs(out, torch.full((1, 4, 8), 20.0))
    assert d <= 2e-2, f"float16 blocked attention on 4096 keys of v = 20: max abs diff {d:.3g} > 2e-2"
    assert rows == Counter({True: 4}), rows


def test_blocked_attention_in_float16_always_subtracts_the_maximum(monkeypatch):
    """float16's exponent range is too narrow for the unshifted 2**x (2**16 already overflows): every row is shifted,
    none goes through the fast path first, and the result is the textbook softmax."""
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(3, 1, 2, 40, 8, generator=g, dtype=torch.float64).unbind(0)  # (B, H, N, Dh) each
    q *= 10.0  # scores of tens: 2**s would overflow float16
    expected = torch.softmax(q.half().double() @ k.half().double().transpose(-2, -1) * 0.3, dim=-1) @ v.half().double()
    expected = expected.transpose(1, 2).reshape(1, 40, 2 * 8)
    rows = rows_by_path(monkeypatch)
    out = cpu_kernels.blocked_attention(q.half(), k.half(), v.half(), 0.3)
    d = max_abs(out, expected)
    assert d <= 2e-2, f"float16 blocked attention vs one softmax: max abs diff {d:.3g} > 2e-2"
    assert rows == Counter({True: 2 * 40}), rows


def test_blocked_attention_is_a_well_formed_custom_op():
    """torch.library.opcheck: the fake (shape and strides, what torch.compile plans with) matches the real op."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, dtype=torch.bfloat16) for _ in range(3))
    torch.library.opcheck(cpu_kernels.blocked_attention, (q, k, v, 0.3), test_utils=("test_schema", "test_faketensor"))


def test_attention_path_by_device_dtype_and_gradients(tiny_state):
    from gemma3_vision.model.tower import BLOCKED_MIN_TOKENS, default_attention

    # blocked: a CPU where oneDNN runs the dtype (float32; bf16 on AVX-512 or AMX), no gradient wanted, and from
    # BLOCKED_MIN_TOKENS tokens an image (Gemma 3's 896 px: 4096); in float32 only with AVX-512
    assert default_attention(CPU, torch.bfloat16, 4096) == ("blocked" if cpu_kernels.ONEDNN_BF16 else "sdpa")
    assert default_attention(CPU, torch.bfloat16, BLOCKED_MIN_TOKENS) == default_attention(CPU, torch.bfloat16, 4096)
    assert default_attention(CPU, torch.bfloat16, BLOCKED_MIN_TOKENS - 1) == "sdpa"
    assert default_attention(CPU, torch.float32, 4096) == ("blocked" if cpu_kernels.ONEDNN and cpu_kernels.AVX512
                                                           else "sdpa")
    assert default_attention(CPU, torch.float32, BLOCKED_MIN_TOKENS - 1) == "sdpa"
    assert default_attention(CPU, torch.float16, 4096) == "sdpa"
    wanting_grad = torch.ones(1, requires_grad=True)
    assert default_attention(CPU, torch.float32, 4096, wanting_grad) == "sdpa"
    assert default_attention(CPU, torch.bfloat16, 4096, wanting_grad) == "sdpa"
    with torch.no_grad():
        assert default_attention(CPU, torch.bfloat16, 4096, wanting_grad) == default_attention(
            CPU, torch.bfloat16, 4096)
    assert default_attention(torch.device("cuda"), torch.bfloat16, 4096) == "sdpa"
    assert default_attention(torch.device("cuda"), torch.float32, 4096) == "sdpa"
    t = tower(tiny_state)
    t.attention = "flash"
    with pytest.raises(ConfigError, match="attention must be one of sdpa, blocked, got 'flash'"):
        t(pixels(1))


@torch.inference_mode()
def test_attention_matches_a_plain_softmax_written_out(tiny_state):
    """One attention block against q, k, v from the three separate projections and a textbook softmax."""
    t = tower(tiny_state)
    attn: Attention = t.encoder.layers[0].self_attn
    B, N, D, H = 2, TINY_VISION.num_patches, TINY_VISION.hidden_size, TINY_VISION.num_attention_heads
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(3))
    heads = [proj(x).view(B, N, H, D // H).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
    q, k, v = heads  # (B, H, N, Dh) each
    w = torch.exp(q @ k.transpose(-2, -1) / (D // H) ** 0.5)
    expected = F.linear(((w / w.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(B, N, D),
                        attn.out_proj.weight, attn.out_proj.bias)
    for path in ("sdpa", "blocked"):
        d = max_abs(attn(x, attention=path), expected)
        assert d <= 1e-5, f"{path} attention: max abs diff to the written-out softmax {d:.3g} > 1e-5"


@torch.inference_mode()
def test_shapes_and_hidden_states(tiny_state):
    t = tower(tiny_state)
    c = TINY_VISION
    out = t(pixels(3), output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, c.num_patches, c.hidden_size)
    assert len(out.hidden_states) == c.num_hidden_layers + 1
    assert all(h.shape == (3, c.num_patches, c.hidden_size) for h in out.hidden_states)
    assert t(pixels(1, size=56)).shape == (1, 16, c.hidden_size)  # a 4x4 grid, positions interpolated


@torch.inference_mode()
def test_batch_independence(tiny_state):
    t = tower(tiny_state)
    x = pixels(3, seed=5)
    batched = t(x)
    for i in range(3):
        d = max_abs(batched[i], t(x[i:i + 1])[0])
        assert d <= 1e-5, f"image {i} alone vs in a batch of 3: max abs diff {d:.3g} > 1e-5"


@torch.inference_mode()
def test_cpu_batch_in_chunks_equals_one_pass(tiny_state, monkeypatch):
    """A CPU batch runs in chunks of CPU_CHUNK_TOKENS tokens: outputs and hidden states as one pass over the batch."""
    t = tower(tiny_state)
    x = pixels(5, seed=6)
    whole = t(x, output_hidden_states=True)
    monkeypatch.setattr(model, "CPU_CHUNK_TOKENS", 2 * TINY_VISION.num_patches)  # chunks of 2, 2 and 1 images
    chunked = t(x, output_hidden_states=True)
    assert chunked.last_hidden_state.shape == whole.last_hidden_state.shape
    assert len(chunked.hidden_states) == len(whole.hidden_states)
    pairs = zip((whole.last_hidden_state, *whole.hidden_states), (chunked.last_hidden_state, *chunked.hidden_states),
                strict=True)
    for a, b in pairs:
        assert torch.equal(a, b), f"chunked vs one pass: max abs diff {max_abs(a, b):.3g}, expected bit-identical"


@torch.inference_mode()
def test_hidden_layers_keeps_only_the_states_asked_for(monkeypatch):
    torch.manual_seed(0)
    t = VisionTower(replace(TINY_VISION, num_hidden_layers=4)).eval()
    x = pixels(3, seed=7)
    every = t(x, output_hidden_states=True)
    some = t(x, hidden_layers=[3, 0, 3])
    assert some.hidden_states == () and list(some.layers) == [3, 0]  # asked order, duplicates dropped
    assert torch.equal(some.last_hidden_state, every.last_hidden_state)
    for i, state in some.layers.items():
        assert torch.equal(state, every.hidden_states[i]), f"state {i}: max abs diff {max_abs(state, every.hidden_states[i]):.3g}"
    # What matters for memory: while the tower runs, the states not asked for are freed as it goes.
    assert states_alive_at_the_last_norm(t, lambda: t(x, output_hidden_states=True)) == [0, 1, 2, 3, 4]
    assert states_alive_at_the_last_norm(t, lambda: t(x, hidden_layers=[2])) == [2, 4]
    assert states_alive_at_the_last_norm(t, lambda: t(x)) == [4]
    monkeypatch.setattr(model, "CPU_CHUNK_TOKENS", 2 * TINY_VISION.num_patches)  # chunks of 2 and 1 images
    chunked = t(x, hidden_layers=[3, 0])
    for i, state in chunked.layers.items():
        assert torch.equal(state, every.hidden_states[i]), f"chunked state {i}: max abs diff {max_abs(state, every.hidden_states[i]):.3g}"
    with pytest.raises(ConfigError, match=r"^hidden_layers must be integers in 0..4, got \[5, -1\]$"):
        t(x, hidden_layers=[1, 5, -1])


needs_onednn_linear = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this torch build has no oneDNN fused linear, so the tower never takes that path")


@needs_onednn_linear
def test_fused_linear_gelu_equals_linear_then_gelu():
    """oneDNN's linear + tanh GELU (fc1 on a CPU), checked in float32 where it must match to rounding."""
    g = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(2, 5, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    out = cpu_kernels.linear(x, w, b, activation="gelu")
    d = max_abs(out, F.gelu(F.linear(x, w, b), approximate="tanh"))
    assert out.shape == (2, 5, 24)
    assert d <= 1e-5, f"fused vs separate linear + tanh GELU: max abs diff {d:.3g} > 1e-5"


@needs_onednn_linear
def test_chunked_mlp_equals_one_pass(monkeypatch):
    """cpu_kernels.mlp over chunks of tokens that cross images (B = 2, 64 tokens each, 24 at a time), in float32."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 64, 16, generator=g)
    fc1 = (torch.randn(40, 16, generator=g), torch.randn(40, generator=g))
    fc2 = (torch.randn(16, 40, generator=g), torch.randn(16, generator=g))
    monkeypatch.setattr(cpu_kernels, "MLP_CHUNK_BYTES", 24 * 40 * 4)  # 24 tokens of fc1's float32 output
    out = cpu_kernels.mlp(x, fc1, fc2)
    expected = F.linear(F.gelu(F.linear(x, *fc1), approximate="tanh"), *fc2)
    d = max_abs(out, expected)
    assert out.shape == (2, 64, 16)
    assert d <= 1e-4, f"chunked vs one-pass MLP: max abs diff {d:.3g} > 1e-4"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_cpu_tower_takes_the_onednn_paths(tiny_state, monkeypatch, dtype):
    if not cpu_kernels.onednn_runs(dtype):
        pytest.skip(f"oneDNN does not run {dtype} here (bf16 needs AVX-512 or AMX), so there is no fast path to test")
    calls: Counter[str] = Counter()

    def counted(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(model, "BLOCKED_MIN_TOKENS", TINY_VISION.num_patches)  # the tiny tower's image size
    monkeypatch.setattr(cpu_kernels, "AVX512", True)  # fp32 runs the same on AVX2, only slower than the flash kernel
    monkeypatch.setattr(cpu_kernels, "blocked_attention", counted("attention", cpu_kernels.blocked_attention))
    monkeypatch.setattr(cpu_kernels, "linear", counted("linear", cpu_kernels.linear))
    tower(tiny_state, dtype, compute=dtype)(pixels(1))
    layers = TINY_VISION.num_hidden_layers
    assert calls["attention"] == layers
    assert calls["linear"] == 4 * layers  # qkv, out_proj, fc1 and fc2 (one MLP chunk at this size)


def test_mlp_chunks_are_equal_and_within_the_byte_budget():
    assert cpu_kernels.mlp_chunk(4096, 4304, 2) == 2048  # Gemma 3, bf16: 2 x 17.6 MB
    assert cpu_kernels.mlp_chunk(4096, 4304, 4) == 1024  # float32: 4 x 17.6 MB
    assert cpu_kernels.mlp_chunk(64, 40, 4) == 64  # one chunk
    assert cpu_kernels.mlp_chunk(1, 4304, 4) == 1
    assert cpu_kernels.mlp_chunk(0, 4304, 4) == 1  # an empty batch: one empty chunk, no division by zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_attention_products_run_in_onednn(dtype):
    """Not torch.mm (MKL for fp32, half oneDNN's rate on AMD CPUs): the profiler sees oneDNN's linear."""
    if not cpu_kernels.onednn_runs(dtype):
        pytest.skip(f"oneDNN does not run {dtype} here, so the products fall back to torch.mm")
    q, k, v = torch.randn(3, 1, 2, 40, 8, dtype=dtype).unbind(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cpu_kernels.blocked_attention(q, k, v, 0.3)
    names = {event.name for event in prof.events()}
    assert "mkldnn::_linear_pointwise" in names and "aten::mm" not in names, sorted(names)


@needs_onednn_linear
def test_matmul_transposed_copies_an_operand_with_gapped_rows():
    """k sliced out of a fused qkv has rows 3 widths apart; dense() copies it (oneDNN took 2000x longer on it)."""
    g = torch.Generator().manual_seed(11)
    a, fused = torch.randn(5, 8, generator=g), torch.randn(7, 3 * 8, generator=g)
    b = fused[:, 8:16]  # (7, 8), rows 24 elements apart
    assert not (b.is_contiguous() or b.T.is_contiguous())
    d = max_abs(cpu_kernels.matmul_transposed(a, b), a @ b.T)
    assert d <= 1e-5, f"a·bᵀ on a gapped b: max abs diff {d:.3g} > 1e-5"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_empty_batch(tiny_state, dtype):
    t = tower(tiny_state, dtype, compute=dtype)
    assert t(pixels(0)).shape == (0, TINY_VISION.num_patches, TINY_VISION.hidden_size)


def test_compiles_without_freezing(tiny_state, monkeypatch):
    """Under torch.compile the linears are torch's (inductor fails on oneDNN's unless freezing is on); the blocked
    attention, an op inductor keeps whole, is still the default choice."""
    t = tower(tiny_state, torch.bfloat16, compute=torch.bfloat16) if cpu_kernels.ONEDNN_BF16 else tower(tiny_state)
    calls: Counter[str] = Counter()
    real = cpu_kernels.blocked_attention
    monkeypatch.setattr(cpu_kernels, "blocked_attention", lambda *a: calls.update(["attention"]) or real(*a))
    monkeypatch.setattr(model, "BLOCKED_MIN_TOKENS", TINY_VISION.num_patches)  # the tiny tower's image size
    x = pixels(1)
    with torch.no_grad():
        expected = t(x)
        compiled = torch.compile(t)(x)
    d = max_abs(compiled, expected)
    assert d <= 0.05, f"compiled vs eager tower: max abs diff {d:.3g} > 0.05 (bf16 where oneDNN runs it)"
    if cpu_kernels.ONEDNN_BF16:
        assert calls["attention"] == 2 * TINY_VISION.num_hidden_layers  # eager, then the compiled run


def test_bias_gradients_alone(tiny_state):
    """A bias that wants a gradient is enough to keep the MLP off oneDNN's path, which has no backward."""
    t = tower(tiny_state).requires_grad_(False)
    t.encoder.layers[0].mlp.fc1.bias.requires_grad_(True)
    t(pixels(1)).square().sum().backward()
    grad = t.encoder.layers[0].mlp.fc1.bias.grad
    assert grad is not None and bool(grad.abs().sum() > 0), "fc1.bias: no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tower_gives_gradients(tiny_state, dtype):
    """The oneDNN and blocked paths have no backward: with gradients wanted the tower takes torch's own ops."""
    t = tower(tiny_state, dtype, compute=dtype).requires_grad_(True)
    t(pixels(1)).float().square().sum().backward()
    for name in ("encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.self_attn.q_proj.weight"):
        grad = t.get_parameter(name).grad
        assert grad is not None and bool(grad.abs().sum() > 0), f"{name}: no gradient"
    t.attention = "blocked"
    with pytest.raises(ConfigError, match="the blocked attention has no backward"):
        t(pixels(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_dtype_kept_and_state_dict_untouched(tiny_state, dtype):
    t = tower(tiny_state, dtype)
    names = {k: (v.shape, v.dtype) for k, v in t.state_dict().items()}
    out = t(pixels(1))
    assert out.dtype == dtype
    assert {k: (v.shape, v.dtype) for k, v in t.state_dict().items()} == names  # nothing fused or cast in place
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_half_weights_computed_in_fp32_equal_fp32_model_with_rounded_weights(tiny_state, dtype):
    """Stored bf16/fp16, computed fp32: exactly the fp32 tower holding the rounded weights, cast at the end."""
    rounded = {k: v.to(dtype).float() for k, v in tiny_state.items()}
    x = pixels(2, seed=7)
    ours = tower(tiny_state, dtype, compute=torch.float32)(x)
    expected = tower(rounded)(x).to(dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, expected), f"max abs diff {max_abs(ours, expected):.3g}, expected bit-identical"


@torch.inference_mode()
def test_bf16_compute_paths_close_to_fp32(tiny_state):
    x = pixels(2, seed=8)
    ref = tower(tiny_state)(x)
    for compute in (torch.float32, torch.bfloat16):  # this CPU's policy, and native bf16 as on AMX or CUDA
        out = tower(tiny_state, torch.bfloat16, compute=compute)(x)
        c = cosine(out, ref)
        assert c >= TOL["bf16_cosine"], f"bf16 weights, {compute} compute: cosine {c:.6f} < {TOL['bf16_cosine']}"


def test_compute_dtype_policy(monkeypatch):
    monkeypatch.setattr(api, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert api.compute_dtype_for(torch.bfloat16, CPU) == torch.float32
    assert api.compute_dtype_for(torch.float16, CPU) == torch.float32
    assert api.compute_dtype_for(torch.float32, CPU) == torch.float32
    monkeypatch.setattr(api, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    assert api.compute_dtype_for(torch.bfloat16, CPU) == torch.bfloat16
    assert api.compute_dtype_for(torch.float16, CPU) == torch.float32
    assert api.compute_dtype_for(torch.float16, torch.device("cuda")) == torch.float16
    assert api.compute_dtype_for(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_load_sets_the_compute_dtype(monkeypatch):
    monkeypatch.setattr(api, "_cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(api.RandomWeightsWarning):
        encoder = api.load("random:tiny", dtype="bfloat16", device="cpu")
    assert encoder.model.vision_tower.compute_dtype == torch.float32
    assert encoder.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16  # stored bf16
    assert encoder.encode_pixels(pixels(1), project=False).dtype == torch.bfloat16


@torch.inference_mode()
def test_fp16_does_not_overflow_where_a_naive_fp16_tower_does(tiny_state):
    """MLP weights x200 push the residual stream past 65504 (fp16's largest value), as in SigLIP fp16 reports.

    transformers' tower run in fp16 (every tensor fp16) returns inf/NaN here; ours, computing the products in native
    fp16 (as on a GPU), keeps the residual stream and norms in fp32 and redoes overflowing products in fp32.
    """
    transformers = pytest.importorskip("transformers")
    x = pixels(2, seed=9)
    ref = tower(tiny_state, scale_mlp=200.0)(x, output_hidden_states=True)
    peak = max(h.abs().max().item() for h in ref.hidden_states)
    assert peak > 65504, f"the scaled weights must overflow fp16: residual peak {peak:.0f}"

    config = transformers.SiglipVisionConfig(
        hidden_size=TINY_VISION.hidden_size, image_size=TINY_VISION.image_size,
        intermediate_size=TINY_VISION.intermediate_size, num_attention_heads=TINY_VISION.num_attention_heads,
        num_hidden_layers=TINY_VISION.num_hidden_layers, patch_size=TINY_VISION.patch_size,
        layer_norm_eps=TINY_VISION.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    naive = transformers.SiglipVisionModel(config).eval()
    naive.load_state_dict(tower(tiny_state, scale_mlp=200.0).state_dict(), strict=True)
    naive_out = naive.half()(pixel_values=x.permute(0, 3, 1, 2).half()).last_hidden_state
    assert not torch.isfinite(naive_out).all(), "transformers in fp16 was expected to overflow on these weights"

    out = tower(tiny_state, torch.float16, compute=torch.float16, scale_mlp=200.0)(x, output_hidden_states=True)
    assert out.last_hidden_state.dtype == torch.float16
    assert torch.isfinite(out.last_hidden_state).all(), "fp16 tower output holds inf/NaN"
    assert all(torch.isfinite(h).all() for h in out.hidden_states), "fp16 hidden states hold inf/NaN"
    assert out.hidden_states[-1].dtype == torch.float32  # the residual stream does not fit fp16 here
    c = cosine(out.last_hidden_state, ref.last_hidden_state)
    assert c >= 0.999, f"fp16 vs fp32 cosine {c:.6f} < 0.999"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU dtype checks not run")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_gpu_half_precision_finite_and_close(tiny_state, dtype):
    x = pixels(4, seed=10)
    for scale in (1.0, 200.0):
        ref = tower(tiny_state, scale_mlp=scale)(x)
        t = tower(tiny_state, dtype, scale_mlp=scale).to("cuda")
        out = t(x.cuda()).float().cpu()
        assert torch.isfinite(out).all(), f"{dtype} on CUDA, MLP x{scale}: inf/NaN"
        c = cosine(out, ref)
        assert c >= 0.999, f"{dtype} on CUDA, MLP x{scale}: cosine {c:.6f} < 0.999"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", ["default", "flash", "efficient", "cudnn"])
@torch.inference_mode()
def test_gpu_attention_kernels_match_fp32(kernel):
    """Each SDPA kernel on the real head width (72), bf16 on CUDA, against the fp32 CPU tower."""
    from dataclasses import replace

    from gemma3_vision.model.config import VisionConfig
    from gemma3_vision.tools.bench import SDPA_KERNELS

    config = replace(VisionConfig(), num_hidden_layers=2, image_size=224)  # 256 tokens, 16 heads of 72
    torch.manual_seed(0)
    ref_tower = VisionTower(config).eval()
    x = pixels(2, size=224, seed=11)
    ref = ref_tower(x)
    t = VisionTower(config).eval()
    t.load_state_dict(ref_tower.state_dict())
    t = t.to("cuda", torch.bfloat16)
    t.attention_backends = None if kernel == "default" else (SDPA_KERNELS[kernel],)
    try:
        out = t(x.cuda()).float().cpu()
    except RuntimeError as e:
        if kernel == "default":
            raise
        pytest.skip(f"the {kernel} attention kernel cannot run on this GPU / torch build: {str(e)[:160]}")
    c = cosine(out, ref)
    assert torch.isfinite(out).all(), f"{kernel}: inf/NaN"
    assert c >= 0.999, f"{kernel} attention, bf16 on CUDA: cosine {c:.6f} to the fp32 tower < 0.999"


@torch.inference_mode()
def test_bf16_residual_stream_stays_bf16_and_close(tiny_state):
    """``residual_dtype = bfloat16`` (the bench's transformers-like variant) keeps the stream in bf16, fp32 products."""
    ref = tower(tiny_state)
    t = tower(tiny_state, torch.bfloat16, compute=torch.float32)
    t.residual_dtype = torch.bfloat16
    x = pixels(2, seed=12)
    out = t(x, output_hidden_states=True)
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)
    c = cosine(out.last_hidden_state, ref(x))
    assert c >= 0.999, f"bf16 residual vs fp32 tower: cosine {c:.6f} < 0.999"
    t.residual_dtype = torch.float16
    with pytest.raises(ConfigError, match="residual_dtype must be float32 or bfloat16"):
        t(x)


@torch.inference_mode()
def test_fp16_checks_once_per_forward_and_per_product_only_after_an_overflow(tiny_state, monkeypatch):
    """The per-product overflow check costs a host sync each; it runs only in the pass redone after an overflow."""
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(1) or real(t))
    x = pixels(2, seed=13)
    tower(tiny_state, torch.float16, compute=torch.float16)(x)
    assert len(calls) == 1, f"{len(calls)} finite checks for a forward that does not overflow, expected 1"
    calls.clear()
    tower(tiny_state, torch.float16, compute=torch.float16, scale_mlp=200.0)(x)
    products = 1 + TINY_VISION.num_hidden_layers * 5  # patchify; qkv, attention, out, fc1, fc2 per layer
    assert len(calls) == 1 + products, f"{len(calls)} finite checks after an overflow, expected 1 + {products}"


@torch.inference_mode()
def test_choosing_attention_kernels_leaves_torch_global_order_alone(tiny_state, monkeypatch):
    """Setting a priority order, even inside torch's context manager, loses the cuDNN-first order that torch sets
    up lazily on Hopper for every later caller in the process (seen on an H200: transformers fell back to flash)."""
    from torch.nn.attention import SDPBackend

    calls = []
    monkeypatch.setattr(torch._C, "_set_sdp_priority_order", lambda order: calls.append(order))
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    t = tower(tiny_state)
    t.attention_backends = (SDPBackend.MATH,)
    t(pixels(1))
    assert not calls, f"the tower changed torch's SDPA priority order: {calls}"
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags
