"""Hugging Face safetensors checkpoints: every key layout, sharding, text tensors left unread, strict errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma3_vision as g3
from conftest import TINY_PROJECTOR, TINY_VISION
from gemma3_vision.checkpoints.resolve import resolve

LAYOUTS = {
    "released": ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model."),
    "transformers-4.52": ("model.vision_tower.vision_model.", "model.multi_modal_projector.",
                          "model.language_model."),
    "transformers-5": ("vision_tower.", "multi_modal_projector.", "language_model.model."),
}


def gemma3_config_json(vision=TINY_VISION, projector=TINY_PROJECTOR) -> dict:
    return {
        "model_type": "gemma3", "mm_tokens_per_image": projector.mm_tokens_per_image,
        "text_config": {"model_type": "gemma3_text", "hidden_size": projector.text_hidden_size},
        "vision_config": {"model_type": "siglip_vision_model", **vision.to_dict()},
    }


def file_state(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    tower, projector, text = LAYOUTS[layout]
    out = {}
    for name, t in state.items():
        if name.startswith("vision_tower."):
            out[tower + name[len("vision_tower."):]] = t
        else:
            out[projector + name[len("multi_modal_projector."):]] = t
    out[text + "embed_tokens.weight"] = torch.ones(7, TINY_PROJECTOR.text_hidden_size)
    return out


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
                     config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or gemma3_config_json()))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 112, "width": 112}}))
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    return g3.load(folder, dtype="float32", device="cpu").model.state_dict()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shards", [1, 3])
def test_layouts_and_shards_load_exactly(tmp_path, tiny_state, layout, shards):
    folder = write_checkpoint(tmp_path / "ckpt", file_state(tiny_state, layout), shards=shards)
    state = loaded_state(folder)
    assert set(state) == set(tiny_state)
    for name, t in tiny_state.items():
        assert torch.equal(state[name], t), name


def test_bf16_storage_kept_exactly(tmp_path, tiny_state):
    bf16 = {k: v.to(torch.bfloat16) for k, v in tiny_state.items()}
    folder = write_checkpoint(tmp_path / "ckpt", file_state(bf16, "released"))
    model = g3.load(folder, dtype="bfloat16", device="cpu").model
    for name, t in model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, bf16[name]), name


def test_only_vision_shards_are_opened(tmp_path, tiny_state, monkeypatch):
    tensors = file_state(tiny_state, "released")
    folder = write_checkpoint(tmp_path / "ckpt", {k: v for k, v in tensors.items()
                                                  if not k.startswith("language_model.")}, shards=2)
    save_file({"language_model.model.embed_tokens.weight": torch.ones(7, 96)}, str(folder / "text.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.embed_tokens.weight"] = "text.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    opened: list[str] = []
    import gemma3_vision.checkpoints.format_safetensors as fs

    real = fs.open_shard
    monkeypatch.setattr(fs, "open_shard", lambda shard: (opened.append(shard.path.name), real(shard))[1])
    loaded_state(folder)
    assert opened and "text.safetensors" not in opened


def test_strict_load_lists_every_problem(tmp_path, tiny_state):
    tensors = file_state(tiny_state, "released")
    del tensors["vision_tower.vision_model.post_layernorm.bias"]
    del tensors["multi_modal_projector.mm_soft_emb_norm.weight"]
    fc1 = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    tensors[fc1] = tensors[fc1].t().contiguous()  # the wrong way round
    tensors["vision_tower.vision_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(3)
    tensors["mystery.weight"] = torch.zeros(3)
    folder = write_checkpoint(tmp_path / "ckpt", tensors)
    with pytest.raises(g3.WeightsError) as e:
        g3.load(folder, dtype="float32", device="cpu")
    msg = str(e.value)
    for fragment in (
        "missing (2): multi_modal_projector.mm_soft_emb_norm.weight, vision_tower.post_layernorm.bias",
        "unexpected (2): mystery.weight, vision_tower.encoder.layers.9.mlp.fc1.weight",
        "wrong shape (1): vision_tower.encoder.layers.1.mlp.fc1.weight: expected (128, 64), got (64, 128)",
    ):
        assert fragment in msg, msg


def test_pickle_only_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(gemma3_config_json()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(g3.WeightsError, match="only pickle weights found .*never unpickles"):
        resolve(folder)


def test_random_models_warn_and_are_deterministic():
    with pytest.warns(g3.RandomWeightsWarning, match="RANDOM weights"):
        a = g3.load("random:tiny", dtype="float32", device="cpu")
    with pytest.warns(g3.RandomWeightsWarning):
        b = g3.load("random:tiny", dtype="float32", device="cpu")
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    with pytest.raises(g3.ModelNotFoundError, match="random:nope"):
        g3.load("random:nope")


def assert_state(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(want)
    for name, t in want.items():
        assert torch.equal(state[name], t), f"{name}: max abs diff {(state[name] - t).abs().max().item():.3g}"


def test_a_named_weights_file_is_the_one_loaded(tmp_path, tiny_state):
    """A fine-tune saved beside the original: naming it loads its weights, with the folder's config files."""
    folder = write_checkpoint(tmp_path / "ckpt", file_state(tiny_state, "released"))
    finetuned = {k: v + 1 for k, v in tiny_state.items()}
    save_file({k: v.contiguous() for k, v in file_state(finetuned, "released").items()},
              str(folder / "finetuned.safetensors"))
    ck = resolve(folder / "finetuned.safetensors")
    assert ck.description == str(folder / "finetuned.safetensors")
    assert [p.name for p in ck.files] == ["config.json", "finetuned.safetensors"]
    assert_state(loaded_state(folder / "finetuned.safetensors"), finetuned)
    assert_state(loaded_state(folder / "model.safetensors"), tiny_state)
    assert_state(loaded_state(folder), tiny_state)
    # the folder's own weights, named: the same checkpoint as the folder, down to the description an output
    # folder's job key holds (folders encoded with --model ckpt/model.safetensors must still resume)
    assert resolve(folder / "model.safetensors").description == resolve(folder).description == str(folder)


def test_a_named_shard_loads_its_indexed_checkpoint(tmp_path, tiny_state):
    """One shard holds part of the model: naming it means the checkpoint it belongs to."""
    folder = write_checkpoint(tmp_path / "ckpt", file_state(tiny_state, "released"), shards=3)
    assert_state(loaded_state(folder / "model-00002-of-00003.safetensors"), tiny_state)
    assert resolve(folder / "model-00002-of-00003.safetensors").description == str(folder)
    # A released Gemma 3 checkpoint: the whole tower and projector in one shard, text in the others. Naming either
    # shard means the checkpoint, whose description the folder is (an output folder's job key holds it).
    two = write_checkpoint(tmp_path / "two", file_state(tiny_state, "released"))
    state = load_file(str(two / "model.safetensors"))
    (two / "model.safetensors").unlink()
    text = {k for k in state if k.startswith("language_model.")}
    parts = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if k not in text},
             "model-00002-of-00002.safetensors": {k: state[k] for k in text}}
    for fname, part in parts.items():
        save_file(part, str(two / fname))
    (two / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: fname for fname, part in parts.items() for k in part}}))
    for fname in parts:
        assert resolve(two / fname).description == resolve(two).description == str(two), fname
    assert_state(loaded_state(two / "model-00001-of-00002.safetensors"), tiny_state)
    # A file the index does not list is read alone, even beside an index.
    save_file({k: v.contiguous() + 2 for k, v in file_state(tiny_state, "released").items()},
              str(folder / "other.safetensors"))
    assert_state(loaded_state(folder / "other.safetensors"), {k: v + 2 for k, v in tiny_state.items()})


@pytest.mark.parametrize("shards", [1, 3])
def test_info_lists_every_file_read(tmp_path, tiny_state, shards):
    """The preprocessor config and the shard index are read too, so `info` lists them."""
    from gemma3_vision.checkpoints.info import checkpoint_info

    folder = write_checkpoint(tmp_path / "ckpt", file_state(tiny_state, "released"), shards=shards)
    listed = {Path(f).name for f in checkpoint_info(resolve(folder))["files"]}
    assert listed == {p.name for p in folder.iterdir()}, listed
    (folder / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json" not in {Path(f).name for f in checkpoint_info(resolve(folder))["files"]}
