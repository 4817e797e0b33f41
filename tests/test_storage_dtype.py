"""A float32 run on a CPU keeps 16-bit checkpoint weights as stored and widens them as it computes: its outputs must
equal, bit for bit, those of the same checkpoint widened to float32 at load. Also: the job key tells apart runs
whose products ran in different dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gemma3_vision as g3
from conftest import TINY_PROJECTOR, TINY_VISION, make_rgb
from format_fixtures import write_hf_folder, write_mmproj
from gemma3_vision import api
from gemma3_vision.jobs.job import EncodeOptions, job_key

CPU = torch.device("cpu")


def hf_bf16(tmp_path, state):
    return write_hf_folder(tmp_path / "hf", state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)


def mmproj_f16(tmp_path, state):  # llama.cpp's layout: F16 matrices and projection, F32 norms, biases, embeddings
    return write_mmproj(tmp_path / "mmproj.gguf", state, TINY_VISION, TINY_PROJECTOR, matrices=Q.F16)


def load_cpu(path, **kw) -> g3.Gemma3Vision:
    return g3.load(path, device="cpu", **kw)


@pytest.mark.parametrize("write", [hf_bf16, mmproj_f16], ids=["hf-bf16", "mmproj-f16"])
def test_float32_run_keeps_16bit_storage_with_equal_outputs(tmp_path, tiny_state, write, monkeypatch):
    path = write(tmp_path, tiny_state)
    kept = load_cpu(path, dtype="float32")
    monkeypatch.setattr(api, "kept_storage_dtypes", lambda dtype, device: ())  # widen everything at load
    widened = load_cpu(path, dtype="float32")

    stored = {t.dtype for t in kept.model.state_dict().values()}
    assert stored & {torch.bfloat16, torch.float16}, f"16-bit weights were widened at load: {stored}"
    assert {t.dtype for t in widened.model.state_dict().values()} == {torch.float32}
    for name, t in kept.model.state_dict().items():  # the same values, only narrower
        assert torch.equal(t.float(), widened.model.state_dict()[name]), name

    images = [make_rgb(40, 52, seed=1), make_rgb(33, 30, seed=2)]
    for project in (True, False):
        a = kept.encode(images, project=project, layers=[0, 1], pool="mean")
        b = widened.encode(images, project=project, layers=[0, 1], pool="mean")
        for x, y in zip(a, b, strict=True):
            for name, got in x.views[0].arrays().items():
                want = y.views[0].arrays()[name]
                assert got.dtype == torch.float32, f"{name}: {got.dtype}"
                # exact: widening bf16/fp16 is exact and the products then see the same fp32 values
                d = (got - want).abs().max().item()
                assert torch.equal(got, want), f"project={project} {name!r}: max abs diff {d:.3g}, expected 0"


def test_kept_storage_policy():
    assert api.kept_storage_dtypes(torch.float32, CPU) == (torch.bfloat16, torch.float16)
    assert api.kept_storage_dtypes(torch.bfloat16, CPU) == ()  # stored as the run dtype: cast at load
    assert api.kept_storage_dtypes(torch.float32, torch.device("cuda")) == ()


def test_bf16_run_still_casts_fp32_storage(tmp_path, tiny_state):
    path = write_hf_folder(tmp_path / "hf", tiny_state, TINY_VISION, TINY_PROJECTOR, dtype=torch.float32)
    encoder = load_cpu(path, dtype="bfloat16")
    assert {t.dtype for t in encoder.model.state_dict().values()} == {torch.bfloat16}
    out = encoder.encode([make_rgb(40, 52)])[0]
    assert out.dtype == torch.bfloat16


def test_job_key_tells_apart_compute_dtypes(tmp_path, tiny_state, monkeypatch):
    path = hf_bf16(tmp_path, tiny_state)
    options = EncodeOptions()
    monkeypatch.setattr(api, "_cpu_flags", lambda: frozenset({"avx2"}))
    emulated = load_cpu(path, dtype="bfloat16")  # products in float32
    monkeypatch.setattr(api, "_cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    native = load_cpu(path, dtype="bfloat16")  # products in bfloat16
    assert emulated.model.vision_tower.compute_dtype == torch.float32
    assert native.model.vision_tower.compute_dtype == torch.bfloat16
    assert job_key(emulated, options) != job_key(native, options)

    # The outputs do differ: a folder resumed on the other kind of machine would mix them.
    pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 56, 56, 3)).astype(np.float32))
    assert not torch.equal(emulated.encode_pixels(pixels), native.encode_pixels(pixels))


@pytest.mark.parametrize("write", [hf_bf16, mmproj_f16], ids=["hf-bf16", "mmproj-f16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ray_actors_reserve_what_their_weights_take(tmp_path, tiny_state, write, dtype):
    from gemma3_vision.checkpoints.resolve import resolve
    from gemma3_vision.jobs.ray_encode import actor_weight_bytes

    path = write(tmp_path, tiny_state)
    loaded = load_cpu(path, dtype=dtype)
    held = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    assert actor_weight_bytes(resolve(str(path)), dtype, CPU) == held
