"""llama.cpp mmproj and Ollama blob GGUFs, written with gguf.GGUFWriter in each converter's real layout: every tensor
read back exactly (stored precision, or bit-exact against gguf.quants.dequantize), conventions undone, clear errors."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gemma3_vision as g3
from conftest import TINY_PROJECTOR, TINY_VISION
from format_fixtures import NORM, PROJECTION, storage_type, stored, write_mmproj, write_ollama_blob
from gemma3_vision.checkpoints.format_gguf import FFN_SWAPPED, PLUS_ONE, load_gguf, read_tensor
from gemma3_vision.checkpoints.gguf_header import TensorInfo
from gemma3_vision.checkpoints.weights import load_model
from gemma3_vision.errors import ConfigError, WeightsError

# Recovering w from a stored fp32 (1 + w) costs at most half an ulp of values in [1, 2): 2**-24 ≈ 6e-8.
PLUS_ONE_TOL = 2.0**-24


def check_tensors(checkpoint, state, qtype_of):
    for name, want in state.items():
        got = checkpoint.tensors[name].read()
        if name == NORM:
            d = (got.float() - want).abs().max().item()
            assert d <= PLUS_ONE_TOL, f"{name}: max abs diff {d:.3g} > {PLUS_ONE_TOL:.3g} after undoing + 1"
            want = (want.float() + 1) - 1  # exactly what a reader can recover from the fp32 (1 + w)
        else:
            want = stored(want, qtype_of(name, want))
        assert got.dtype == want.dtype, f"{name}: read as {got.dtype}, stored as {want.dtype}"
        assert torch.equal(got, want), f"{name}: max abs diff {(got.float() - want.float()).abs().max().item():.3g}"


@pytest.mark.parametrize("legacy_ffn", [False, True], ids=["current-ffn", "legacy-swapped-ffn"])
@pytest.mark.parametrize("matrices", [Q.F32, Q.F16, Q.BF16, Q.Q8_0], ids=lambda q: q.name)
def test_mmproj_reads_every_tensor_exactly(tmp_path, tiny_state, matrices, legacy_ffn):
    projection = Q.Q8_0 if matrices == Q.Q8_0 else Q.F16  # legacy Q8_0 files quantized the projection too
    path = write_mmproj(tmp_path / "mmproj.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, matrices=matrices,
                        projection=projection, legacy_ffn=legacy_ffn)
    ck = load_gguf(path)
    assert ck.format == "gguf-mmproj"
    assert (ck.vision, ck.projector) == (TINY_VISION, TINY_PROJECTOR)
    assert PLUS_ONE in ck.conventions
    assert (FFN_SWAPPED in ck.conventions) == legacy_ffn
    assert ck.tensors[PROJECTION].shape == (TINY_VISION.hidden_size, TINY_PROJECTOR.text_hidden_size)
    check_tensors(ck, tiny_state, lambda name, t: storage_type(name, t, matrices, projection))
    load_model(ck, dtype=torch.float32)  # strict: nothing missing, unexpected or misshapen


@pytest.mark.parametrize("matrices", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_ollama_blob_reads_only_vision_tensors(tmp_path, tiny_state, matrices):
    path = write_ollama_blob(tmp_path / "blob", tiny_state, TINY_VISION, TINY_PROJECTOR, matrices=matrices)
    ck = load_gguf(path)
    assert ck.format == "gguf-ollama" and ck.unexpected == []
    assert (ck.vision, ck.projector) == (TINY_VISION, TINY_PROJECTOR)
    assert set(ck.tensors) == set(tiny_state)  # token_embd, blk.0.*, output_norm: not mapped, not read
    check_tensors(ck, tiny_state, lambda name, t: Q.F32 if t.dim() < 2 else matrices)


def test_quantized_reads_match_gguf_reader_and_dequantize_bit_for_bit(tmp_path, tiny_state):
    path = write_mmproj(tmp_path / "q.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, matrices=Q.Q8_0,
                        projection=Q.Q8_0)
    ck = load_gguf(path)
    reader = gguf.GGUFReader(path)  # an independent parse of the same file
    by_file_name = {s.source_name: s for s in ck.tensors.values()}
    n = 0
    for t in reader.tensors:
        if t.tensor_type != Q.Q8_0:
            continue
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        got = by_file_name[t.name].read().numpy()
        np.testing.assert_array_equal(got, ref, err_msg=t.name)
        n += 1
    assert n == 6 * TINY_VISION.num_hidden_layers + 1


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # random scales include NaN and Inf
@pytest.mark.parametrize("qtype", sorted(gguf.quants._type_traits, key=int), ids=lambda q: q.name)
def test_every_dequantizable_type_reads_like_gguf_quants(qtype):
    # Random blocks of each type the gguf package can dequantize; the reader must give exactly what it gives.
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * block
    raw = np.random.default_rng(int(qtype)).integers(0, 256, rows * cols // block * size, dtype=np.uint8)
    info = TensorInfo("x", (cols, rows), qtype, 0, raw.size)
    got = read_tensor(raw, info)
    ref = gguf.quants.dequantize(raw.reshape(rows, cols // block * size), qtype)
    assert got.shape == (rows, cols)
    np.testing.assert_array_equal(got.float().numpy(), ref.astype(np.float32))  # random bits: NaN == NaN here


def test_type_gguf_cannot_dequantize_is_a_clear_error(tmp_path, tiny_state):
    path = write_mmproj(tmp_path / "m.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR)
    raw = bytearray(path.read_bytes())
    # Retype v.blk.0.attn_q.weight (F32, 64 x 64) as I32: same byte size, but not a float or quant type.
    name = b"v.blk.0.attn_q.weight"
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 4 + 2 * 8
    raw[at:at + 4] = int(Q.I32).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="unsupported GGUF tensor type I32 for v.blk.0.attn_q.weight"):
        load_gguf(path)


def test_text_only_gguf_says_so(tmp_path):
    # gemma3:1b, or the text GGUF passed instead of the mmproj: no v.* / mm.* tensors at all.
    path = write_ollama_blob(tmp_path / "gemma3-1b", None, TINY_VISION, TINY_PROJECTOR)
    with pytest.raises(WeightsError, match="no vision tensors .* text-only"):
        load_gguf(path)


def test_other_projector_type_and_architecture_are_refused(tmp_path, tiny_state):
    path = write_mmproj(tmp_path / "mlp.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, projector_type="mlp")
    with pytest.raises(WeightsError, match="projector type 'mlp', not gemma3"):
        load_gguf(path)
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match="architecture is 'llama'"):
        load_gguf(tmp_path / "llama.gguf")


def test_missing_and_unknown_tensors_fail_the_strict_load(tmp_path, tiny_state):
    path = write_mmproj(tmp_path / "m.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR,
                        omit=("vision_tower.encoder.layers.1.mlp.fc2.bias",))
    ck = load_gguf(path)
    with pytest.raises(WeightsError, match=r"missing \(1\): vision_tower.encoder.layers.1.mlp.fc2.bias"):
        load_model(ck, dtype=torch.float32)
    state = {**tiny_state, "vision_tower.encoder.layers.5.layer_norm1.weight": torch.ones(64)}  # layer 5 of 2
    ck = load_gguf(write_mmproj(tmp_path / "x.gguf", state, TINY_VISION, TINY_PROJECTOR))
    with pytest.raises(WeightsError, match=r"unexpected \(1\): vision_tower.encoder.layers.5.layer_norm1.weight"):
        load_model(ck, dtype=torch.float32)


def test_wrong_way_ffn_in_an_ollama_blob_is_caught_by_shape(tmp_path, tiny_state):
    # Ollama names fc1/fc2 unambiguously: a blob with them swapped is broken and must not load silently.
    state = dict(tiny_state)
    for i in range(TINY_VISION.num_hidden_layers):
        a, b = f"vision_tower.encoder.layers.{i}.mlp.fc1.weight", f"vision_tower.encoder.layers.{i}.mlp.fc2.weight"
        state[a], state[b] = state[b], state[a]
    ck = load_gguf(write_ollama_blob(tmp_path / "blob", state, TINY_VISION, TINY_PROJECTOR))
    with pytest.raises(WeightsError, match=r"wrong shape .*mlp.fc1.weight: expected \(128, 64\), got \(64, 128\)"):
        load_model(ck, dtype=torch.float32)


@pytest.mark.slow
def test_full_size_gemma3_mmproj_f16_loads_exactly(tmp_path):
    """The real Gemma 3 config (27 layers, width 1152, 896 px, D = 2560) as the llama.cpp converter writes it."""
    from conftest import random_state
    from gemma3_vision.model.config import PRESETS

    vision, projector = PRESETS["gemma3-4b"]
    state = random_state("gemma3-4b")
    path = write_mmproj(tmp_path / "mmproj-f16.gguf", state, vision, projector, matrices=Q.F16)
    ck = load_gguf(path)
    assert (ck.vision, ck.projector) == (vision, projector)
    assert len(ck.tensors) == 439 and ck.unexpected == []
    check_tensors(ck, state, lambda name, t: storage_type(name, t, Q.F16, Q.F16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", g3.RandomWeightsWarning)
        model = load_model(ck, dtype=torch.float16)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in state.values())


@pytest.mark.parametrize("mean, std, fragment", [
    (0.5, [0.5] * 3, "image_mean must be a list of 3 numbers, found 0.5"),  # a scalar, not an array
    ([0.5] * 3, 0.5, "image_std must be a list of 3 numbers, found 0.5"),
    ([0.5] * 2000, [0.5] * 3, r"image_mean must be a list of 3 numbers, found ArraySummary\(item_type='float32', "
                              r"count=2000\)"),  # too long to keep: the header summarises it
    ([0.5] * 2, [0.5] * 3, r"image_mean must be a list of 3 numbers, found \[0.5, 0.5\]"),
    (["a", "b", "c"], [0.5] * 3, "image_mean must be a list of 3 numbers"),
    ([0.5] * 3, [0.5, float("nan"), 0.5], "image_std must be 3 finite numbers > 0"),
    ([0.5] * 3, [0.5, 0.0, 0.5], "image_std must be 3 finite numbers > 0"),
    ([float("inf"), 0.5, 0.5], [0.5] * 3, "image_mean must be 3 finite numbers"),
])
def test_bad_image_mean_or_std_is_a_config_error(tmp_path, tiny_state, mean, std, fragment):
    path = write_mmproj(tmp_path / "m.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, image_mean=mean, image_std=std)
    with pytest.raises(ConfigError, match=f"{path}: clip.vision.{fragment}"):
        load_gguf(path)


def test_image_mean_and_std_are_read(tmp_path, tiny_state):
    path = write_mmproj(tmp_path / "m.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, image_mean=[0.25, 0.5, 0.75],
                        image_std=[0.5, 1.0, 2.0])
    p = load_gguf(path).preprocess
    assert (p.image_mean, p.image_std, p.resample) == ((0.25, 0.5, 0.75), (0.5, 1.0, 2.0), "bilinear")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
@pytest.mark.parametrize("flavour", ["mmproj", "ollama"])
def test_a_loaded_model_keeps_no_mapping_of_the_file(tmp_path, tiny_state, flavour):
    """Every tensor is copied out of the file, so once loaded the model needs none of it: an Ollama blob is often
    17 GB, and ``encoder.checkpoint`` lives as long as the encoder."""
    write = write_mmproj if flavour == "mmproj" else write_ollama_blob
    path = write(tmp_path / "model.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR).resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = g3.load(path, dtype="float32", device="cpu")
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text(), "the GGUF is still memory-mapped after loading"
    # Released, not broken: a later read (convert, say) maps the file again.
    name = "vision_tower.post_layernorm.weight"
    assert torch.equal(encoder.checkpoint.tensors[name].read(), tiny_state[name])
