"""The ``random`` models: deterministic, finite, scaled by role, different per tensor, made in the run dtype as
windows of shared pools (loading them copies nothing)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gemma3_vision as g3
from gemma3_vision.checkpoints.random_model import _ALIGN, _role, random_checkpoint, window_starts
from gemma3_vision.checkpoints.weights import expected_shapes
from gemma3_vision.model.config import PRESETS


def read_all(name: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {key: source.read() for key, source in random_checkpoint(name, dtype).tensors.items()}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_tensor_has_its_own_aligned_window(preset):
    shapes = expected_shapes(*PRESETS[preset])
    starts, lengths = window_starts(shapes)
    assert set(starts) == set(shapes)
    assert len(set(starts.values())) == len(starts), "two tensors share a window start in one pool"
    for name, (role, start) in starts.items():
        assert start % _ALIGN == 0, name
        assert start + math.prod(shapes[name]) <= lengths[role], f"{name} runs past its pool"


@pytest.mark.parametrize("name", ["random:tiny", "random"])
def test_weights_are_finite_distinct_and_scaled_by_role(name):
    checkpoint = random_checkpoint(name)
    tensors = {key: source.read() for key, source in checkpoint.tensors.items()}
    heads = set()
    for key, t in tensors.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == tuple(checkpoint.tensors[key].shape), key
        heads.add(tuple(t.flatten()[:16].tolist()))  # windows at different starts of random values differ here
        got_std, got_mean = (x.item() for x in torch.std_mean(t))  # NaN if any value is not finite
        assert math.isfinite(got_std), f"{key} holds NaN or Inf"
        mean, std = _role(key, tuple(t.shape))
        if t.numel() >= 4096:  # enough values for the sample statistics to be tight
            assert abs(got_std / std - 1) < 0.1, f"{key}: std {got_std:.4g}, expected {std:.4g}"
            assert abs(got_mean - mean) < 5 * std / math.sqrt(t.numel()), f"{key}: mean {got_mean:.4g}, expected {mean}"
    assert len(heads) == len(tensors), "two tensors hold the same values"


def test_same_name_same_weights_across_checkpoints():
    a, b = read_all("random:tiny"), read_all("random:tiny")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_are_the_float32_weights_rounded(dtype):
    fp32, half = read_all("random:tiny"), read_all("random:tiny", dtype)
    for key, t in half.items():
        assert t.dtype == dtype, key
        assert torch.equal(t, fp32[key].to(dtype)), key
    assert {s.stored_dtype for s in random_checkpoint("random:tiny", dtype).tensors.values()} == {
        {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_in_the_run_dtype_copies_nothing(dtype):
    """Every parameter is a view of one buffer: nothing was cast or copied on the way into the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", g3.RandomWeightsWarning)
        encoder = g3.load("random:tiny", dtype=dtype, device="cpu")
    params = list(encoder.model.parameters())
    assert {p.dtype for p in params} == {getattr(torch, dtype)}
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1


def test_unknown_preset_or_dtype_is_refused():
    with pytest.raises(g3.ModelNotFoundError, match="random:nope.*tiny"):
        random_checkpoint("random:nope")
    with pytest.raises(g3.ConfigError, match="float32, bfloat16 or float16, got torch.float64"):
        random_checkpoint("random:tiny", torch.float64)
