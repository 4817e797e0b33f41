"""Loading mechanics: the finite check, the model built on the meta device, what a load keeps of the file."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from format_fixtures import write_hf_folder
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.checkpoints.weights import (
    VisionModel,
    _one_thread,
    all_finite,
    empty_model,
    expected_shapes,
    load_model,
)
from gemma3_vision.errors import WeightsError
from gemma3_vision.model.config import PRESETS

TINY_VISION, TINY_PROJECTOR = PRESETS["tiny"]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
BAD = [math.nan, math.inf, -math.inf]


# ------------------------------------------------------------------------------------------------ finite check

@pytest.mark.parametrize("dtype", FLOATS)
def test_all_finite_sees_one_bad_value_at_every_position(dtype):
    # Sizes around SIMD widths: a bad value in a vectorized reduction's head, body or scalar tail must be seen.
    for n in [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257]:
        base = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        assert all_finite(base), f"{dtype}, {n} finite values refused"
        for bad in BAD:
            for i in range(n):
                t = base.clone()
                t[i] = bad
                assert not all_finite(t), f"{dtype}, n={n}: {bad} at index {i} missed"


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_finite_in_a_multithreaded_reduction(dtype):
    # A full-size fc1 weight: torch splits its reduction across threads in 32768-element chunks; a bad value at a
    # chunk's first or last element, or at either end of the tensor, must survive the combine step.
    base = torch.randn(4304, 1152, generator=torch.Generator().manual_seed(0)).to(dtype)
    n = base.numel()
    positions = [0, 1, 32767, 32768, 65535, 65536, n // 2, n - 32768, n - 1,
                 *torch.randint(0, n, (8,), generator=torch.Generator().manual_seed(1)).tolist()]
    assert all_finite(base)
    flat = base.view(-1)
    for bad in BAD:
        for i in positions:
            old = flat[i].item()
            flat[i] = bad
            assert not all_finite(base), f"{dtype}: {bad} at flat index {i} of {n} missed"
            flat[i] = old
    assert all_finite(base)


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_finite_accepts_extreme_finite_values(dtype):
    info = torch.finfo(dtype)
    t = torch.tensor([info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal / 4, 0.0, -0.0], dtype=dtype)
    assert all_finite(t), f"{t.tolist()} refused"
    assert all_finite(torch.empty(0, 5, dtype=dtype))  # nothing to check


def test_all_finite_on_a_strided_view():
    t = torch.randn(64, 48)
    t[5, 40] = math.nan
    assert not all_finite(t.T) and not all_finite(t[:, 40]) and all_finite(t[:, :40])


# ------------------------------------------------------------------------------------------------ meta build

def test_the_full_model_builds_on_meta_without_importing_dynamo():
    # torch sends a meta normal_ (nn.Embedding's init) through a decomposition whose first call imports
    # torch._dynamo: about 3 s of every first load. A fresh interpreter, since other tests may import it.
    code = ("import sys; from gemma3_vision.model.config import PRESETS; from gemma3_vision.checkpoints.weights import empty_model; "
            "m = empty_model(*PRESETS['gemma3-4b']); assert all(p.is_meta for p in m.parameters()); "
            "print(sum(p.numel() for p in m.parameters()), 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(416_866_032 + 1152 * 2560 + 1152), "False"], out  # So400m tower + projector


def test_meta_shapes_match_a_real_build_and_real_builds_still_initialise():
    torch.manual_seed(0)
    real = VisionModel(TINY_VISION, TINY_PROJECTOR)  # after the meta builds above and below: init must run here
    assert expected_shapes(TINY_VISION, TINY_PROJECTOR) == {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert all(p.is_meta for p in empty_model(TINY_VISION, TINY_PROJECTOR).parameters())
    fc1 = VisionModel(TINY_VISION, TINY_PROJECTOR).vision_tower.encoder.layers[0].mlp.fc1.weight
    assert not fc1.is_meta and fc1.std().item() > 0, "random init skipped outside the meta build"


# ------------------------------------------------------------------------------------------------ what a load keeps

def _mapped_ranges(name: str) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            if line.rstrip().endswith(" " + name):
                begin, end = line.split()[0].split("-")
                ranges.append((int(begin, 16), int(end, 16)))
    return ranges


def _load(folder: Path, dtype: torch.dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(resolve(folder), dtype=dtype)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_weights_in_the_stored_dtype_stay_views_of_one_mapping_of_the_file(tiny_state, tmp_path):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)
    shard = os.path.realpath(folder / "model.safetensors")
    model = _load(folder, torch.bfloat16)
    mapped = _mapped_ranges(shard)
    assert mapped, "the shard is not memory-mapped"
    for name, p in model.state_dict().items():
        assert torch.equal(p, tiny_state[name].bfloat16()), name
        assert any(b <= p.data_ptr() < e for b, e in mapped), f"{name} was copied out of the file"
    assert len(mapped) == 1, f"the shard is mapped {len(mapped)} times, expected once for all its tensors"
    del model, p
    gc.collect()
    assert not _mapped_ranges(shard), "the file stays mapped after the model is gone"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_cast_weights_leave_nothing_mapped(tiny_state, tmp_path):
    # Cast on load, the model owns fresh memory: the file's pages must not stay mapped (and resident) beside it.
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)
    model = _load(folder, torch.float32)
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, tiny_state[name].bfloat16().float()), name
    gc.collect()
    assert not _mapped_ranges(os.path.realpath(folder / "model.safetensors")), "the file is still mapped"


def test_loading_restores_the_thread_count_even_when_it_fails(tiny_state, tmp_path):
    before = torch.get_num_threads()
    _load(write_hf_folder(tmp_path / "good", tiny_state, TINY_VISION, TINY_PROJECTOR), torch.float32)
    assert torch.get_num_threads() == before
    state = dict(tiny_state)
    state["vision_tower.post_layernorm.weight"] = torch.full_like(state["vision_tower.post_layernorm.weight"], math.nan)
    with pytest.raises(WeightsError, match=r"post_layernorm\.weight\) holds NaN or Inf"):
        _load(write_hf_folder(tmp_path / "bad", state, TINY_VISION, TINY_PROJECTOR), torch.float32)
    assert torch.get_num_threads() == before


def test_overlapping_single_thread_sections_restore_the_thread_count():
    # Two fresh threads inside at once, the first leaving first. set_num_threads also sets the default a thread
    # takes at its first torch op, so the second starts inside the first's section with 1: a per-use save and
    # restore would leave 1 as the default for good, and every thread started later would run on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def a() -> None:
        with _one_thread():
            seen["a inside"] = torch.get_num_threads()
            a_inside.set()
            b_inside.wait(10)
        a_left.set()
        seen["a after"] = torch.get_num_threads()

    def b() -> None:
        a_inside.wait(10)
        with _one_thread():
            seen["b inside"] = torch.get_num_threads()
            b_inside.set()
            a_left.wait(10)
        seen["b after"] = torch.get_num_threads()

    def later() -> None:
        seen["a thread started after both"] = torch.get_num_threads()

    try:
        for targets in ([a, b], [later]):
            threads = [threading.Thread(target=target) for target in targets]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
        assert a_left.is_set() and len(seen) == 5, f"the sections did not run as planned: {seen}"
        expected = {"a inside": 1, "b inside": 1, "a after": 3, "b after": 3, "a thread started after both": 3}
        assert seen == expected, f"thread counts {seen}, expected {expected}"
        assert torch.get_num_threads() == 3, f"the main thread's count is {torch.get_num_threads()}, expected 3"
    finally:
        torch.set_num_threads(before)
