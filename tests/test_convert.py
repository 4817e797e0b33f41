"""convert: HF folder ↔ llama.cpp mmproj round trips, Ollama blob → mmproj, dtypes, refusals, and the CLI."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from conftest import TINY_PROJECTOR, TINY_VISION
from format_fixtures import NORM, PROJECTION, write_hf_folder, write_ollama_blob, write_siglip_folder
from gemma3_vision.checkpoints.convert import convert
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.cli import main
from gemma3_vision.errors import ConfigError

PLUS_ONE_TOL = 2.0**-24  # fp32 (1 + w) keeps w to half an ulp of [1, 2)


def tensors(model) -> dict[str, torch.Tensor]:
    ck = resolve(model)
    return {name: src.read() for name, src in ck.tensors.items()}


def assert_equal(a: dict, b: dict, norm_tol: float = 0.0, same_dtype: bool = True):
    assert a.keys() == b.keys()
    if not same_dtype:  # equal values, possibly held in a wider type (F16 → F32 embeddings)
        a, b = {k: v.float() for k, v in a.items()}, {k: v.float() for k, v in b.items()}
    for name in a:
        if name == NORM and norm_tol:
            d = (a[name].float() - b[name].float()).abs().max().item()
            assert d <= norm_tol, f"{name}: max abs diff {d:.3g} > {norm_tol:.3g}"
            continue
        assert a[name].dtype == b[name].dtype, f"{name}: {a[name].dtype} vs {b[name].dtype}"
        assert torch.equal(a[name], b[name]), f"{name}: max abs diff {(a[name] - b[name]).abs().max().item():.3g}"


def test_safetensors_to_mmproj_to_safetensors(tmp_path, tiny_state):
    hf = write_hf_folder(tmp_path / "hf", tiny_state, TINY_VISION, TINY_PROJECTOR)
    convert(resolve(hf), tmp_path / "m.gguf", "mmproj")
    convert(resolve(tmp_path / "m.gguf"), tmp_path / "back", "hf")
    assert_equal(tensors(hf), tensors(tmp_path / "back"), norm_tol=PLUS_ONE_TOL)
    # Once through the + 1, the round trip is exact: mmproj → hf → mmproj gives the same tensors, bit for bit.
    convert(resolve(tmp_path / "back"), tmp_path / "m2.gguf", "mmproj")
    a, b = gguf.GGUFReader(tmp_path / "m.gguf"), gguf.GGUFReader(tmp_path / "m2.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.tensor_type == y.tensor_type and bytes(x.data) == bytes(y.data), x.name


def test_mmproj_is_what_llama_cpp_expects(tmp_path, tiny_state):
    hf = write_hf_folder(tmp_path / "hf", tiny_state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)
    convert(resolve(hf), tmp_path / "m.gguf", "mmproj")  # stored bf16 → default dtype bf16
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    field = lambda key: r.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "clip" and field("clip.projector_type") == "gemma3"
    assert field("clip.has_vision_encoder") and field("clip.use_gelu")
    assert field("clip.vision.embedding_length") == TINY_VISION.hidden_size
    assert field("clip.vision.projection_dim") == TINY_PROJECTOR.text_hidden_size
    assert field("clip.vision.projector.scale_factor") == 2  # tiny: 8x8 grid → 4x4 tokens
    types = {t.name: (t.tensor_type, [int(d) for d in t.shape]) for t in r.tensors}
    D, F, T = TINY_VISION.hidden_size, TINY_VISION.intermediate_size, TINY_PROJECTOR.text_hidden_size
    assert types["v.patch_embd.weight"] == (Q.F32, [14, 14, 3, D])  # embeddings always F32
    assert types["v.position_embd.weight"] == (Q.F32, [D, 64])
    assert types["v.blk.0.ffn_up.weight"] == (Q.BF16, [D, F])  # current names: fc1 = ffn_up
    assert types["v.blk.0.ffn_down.weight"] == (Q.BF16, [F, D])
    assert types["v.blk.1.ln2.bias"] == (Q.F32, [D])
    # F32, not the converter's F16: llama.cpp cannot copy a BF16 projection, and F16 would round bf16
    assert types["mm.input_projection.weight"] == (Q.F32, [T, D])
    assert types["mm.soft_emb_norm.weight"] == (Q.F32, [D])
    norm = torch.from_numpy(r.get_tensor([t.name for t in r.tensors].index("mm.soft_emb_norm.weight")).data.copy())
    assert torch.equal(norm, tiny_state[NORM].bfloat16().float() + 1)  # + 1 folded in


def test_ollama_blob_to_mmproj(tmp_path, tiny_state):
    blob = write_ollama_blob(tmp_path / ("sha256-" + "c" * 64), tiny_state, TINY_VISION, TINY_PROJECTOR)
    convert(resolve(blob), tmp_path / "mmproj.gguf", "mmproj")
    ck = resolve(tmp_path / "mmproj.gguf")
    assert ck.format == "gguf-mmproj"
    # F16 matrices stay F16, embeddings widen to F32 as llama.cpp's converter stores them: values are unchanged
    assert_equal(tensors(blob), tensors(tmp_path / "mmproj.gguf"), same_dtype=False)
    r = gguf.GGUFReader(tmp_path / "mmproj.gguf")
    assert {t.name: t.tensor_type for t in r.tensors}["v.blk.0.attn_q.weight"] == Q.F16


def bf16_state_with_extremes(tiny_state) -> dict[str, torch.Tensor]:
    """tiny_state in bf16 with projection values F16 cannot hold: below its normal range and above its largest."""
    state = {k: v.bfloat16() for k, v in tiny_state.items()}
    proj = state[PROJECTION].clone()
    proj.view(-1)[:4] = torch.tensor([3.3e-7, -1.1e-6, 2.2e-5, 1e5]).bfloat16()  # 1e5 > 65504, F16's largest
    state[PROJECTION] = proj
    return state


def test_bf16_round_trip_through_mmproj_is_bit_exact(tmp_path, tiny_state):
    state = bf16_state_with_extremes(tiny_state)
    hf = write_hf_folder(tmp_path / "hf", state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)
    convert(resolve(hf), tmp_path / "m.gguf", "mmproj")  # default: lossless
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["v.blk.0.attn_q.weight"] == Q.BF16 and types["mm.input_projection.weight"] == Q.F32
    convert(resolve(tmp_path / "m.gguf"), tmp_path / "back", "hf", "bf16")
    assert_equal(tensors(hf), tensors(tmp_path / "back"), norm_tol=PLUS_ONE_TOL)
    # Without --dtype the way back is lossless too: blocks stay BF16, what the GGUF holds in F32 stays F32.
    convert(resolve(tmp_path / "m.gguf"), tmp_path / "back-default", "hf")
    back = resolve(tmp_path / "back-default").tensors
    assert back[PROJECTION].stored_dtype == "F32" and back[NORM].stored_dtype == "F32"
    assert back["vision_tower.encoder.layers.0.mlp.fc1.weight"].stored_dtype == "BF16"
    assert_equal(tensors(hf), tensors(tmp_path / "back-default"), norm_tol=PLUS_ONE_TOL, same_dtype=False)


@pytest.mark.parametrize("to, name", [("mmproj", PROJECTION), ("hf", PROJECTION),
                                      ("mmproj", "vision_tower.encoder.layers.1.self_attn.q_proj.weight")])
def test_overflow_is_refused(tmp_path, tiny_state, to, name):
    state = {k: v.bfloat16() for k, v in tiny_state.items()}
    state[name] = state[name].clone()
    state[name].view(-1)[7] = -1e5
    hf = write_hf_folder(tmp_path / "hf", state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match=rf"{name} holds \|value\| up to 99840, beyond f16's largest 65504"):
        convert(resolve(hf), tmp_path / "out", to, "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, no partial file
    result = CliRunner().invoke(main, ["convert", str(hf), str(tmp_path / "out"), "--to", to, "--dtype", "f16"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "65504" in result.output, result.output


def test_f16_keeps_values_that_round_to_its_largest_and_refuses_those_that_round_to_inf(tmp_path, tiny_state):
    # f16's largest is 65504 and the next step up would be 65536, so an f32 value below the midpoint 65520 rounds
    # to 65504 (kept), and one at 65520 or above rounds to inf (refused).
    state = {k: v.clone() for k, v in tiny_state.items()}
    state[PROJECTION].view(-1)[:2] = torch.tensor([65519.0, -65510.0])
    hf = write_hf_folder(tmp_path / "hf", state, TINY_VISION, TINY_PROJECTOR)
    convert(resolve(hf), tmp_path / "kept", "hf", "f16")
    kept = resolve(tmp_path / "kept").tensors[PROJECTION].read()
    assert kept.view(-1)[:2].tolist() == [65504.0, -65504.0]
    state[PROJECTION].view(-1)[0] = 65520.0
    hf = write_hf_folder(tmp_path / "hf2", state, TINY_VISION, TINY_PROJECTOR)
    with pytest.raises(ConfigError, match=rf"{PROJECTION} holds \|value\| up to 65520, beyond f16's largest 65504"):
        convert(resolve(hf), tmp_path / "refused", "hf", "f16")


def test_explicit_bf16_is_honoured_where_llama_cpp_takes_it(tmp_path, tiny_state):
    convert(resolve("random:tiny"), tmp_path / "m.gguf", "mmproj", "bf16")  # an f32 source
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in r.tensors}
    matrices = [n for n in types if n.startswith("v.blk.") and n.endswith(("attn_q.weight", "attn_k.weight",
                "attn_v.weight", "attn_out.weight", "ffn_up.weight", "ffn_down.weight"))]
    assert len(matrices) == 6 * TINY_VISION.num_hidden_layers
    assert all(types[n] == Q.BF16 for n in matrices)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert types["mm.input_projection.weight"] == Q.F32  # BF16 there breaks llama.cpp's CUDA copy: F32, unrounded
    assert types["v.patch_embd.weight"] == types["v.blk.0.ln1.weight"] == Q.F32
    back = tensors(tmp_path / "m.gguf")
    assert torch.equal(back[PROJECTION], tiny_state[PROJECTION])
    q = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(back[q], tiny_state[q].bfloat16())


@pytest.mark.parametrize("dtype, torch_dtype", [("f32", torch.float32), ("f16", torch.float16),
                                                ("bf16", torch.bfloat16)])
def test_hf_output_in_each_dtype(tmp_path, tiny_state, dtype, torch_dtype):
    convert(resolve("random:tiny"), tmp_path / "out", "hf", dtype)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "preprocessor_config.json",
                                                              "model.safetensors"}
    raw = load_file(str(tmp_path / "out" / "model.safetensors"))  # the safetensors library reads our writer
    assert all(t.dtype == torch_dtype for t in raw.values())
    assert "vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight" in raw
    for name, want in tiny_state.items():
        assert torch.equal(resolve(tmp_path / "out").tensors[name].read(), want.to(torch_dtype)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["mm_tokens_per_image"] == 16


def test_siglip_converts_to_hf_but_not_to_mmproj(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if k.startswith("vision_tower.")}
    folder = write_siglip_folder(tmp_path / "siglip", state, TINY_VISION)
    with pytest.raises(ConfigError, match="no multimodal projector"):
        convert(resolve(folder), tmp_path / "m.gguf", "mmproj")
    convert(resolve(folder), tmp_path / "out", "hf")
    assert_equal(tensors(folder), tensors(tmp_path / "out"))
    assert resolve(tmp_path / "out").format == "siglip-safetensors"
    # SiglipImageProcessor resizes bicubic (3), not Gemma 3's bilinear (2): the written config must say so
    written = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert (written["image_processor_type"], written["resample"]) == ("SiglipImageProcessor", 3)
    assert resolve(tmp_path / "out").preprocess == resolve(folder).preprocess


def test_refusals_leave_nothing_behind(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        convert(resolve("random:tiny"), tmp_path / "exists", "hf")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        convert(resolve("random:tiny"), tmp_path / "x", "hf", "q4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_cli_convert(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "random:tiny", str(tmp_path / "m.gguf"), "--to", "mmproj",
                                  "--dtype", "f16"])
    assert result.exit_code == 0, result.output
    assert resolve(tmp_path / "m.gguf").tensors["vision_tower.encoder.layers.0.mlp.fc1.weight"].stored_dtype == "F16"
    result = runner.invoke(main, ["convert", "random:tiny", str(tmp_path / "m.gguf"), "--to", "mmproj"])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(main, ["convert", "random:tiny", str(tmp_path / "no" / "m.gguf"), "--to", "mmproj"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'no' / 'm.gguf'}: the folder {tmp_path / 'no'} does not exist; create it first")
