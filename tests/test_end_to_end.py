"""The issue's acceptance check: a checkpoint saved by transformers, encoded by our CLI, equals get_image_features."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_PROJECTOR, TINY_VISION, TOL, hf_gemma3_config, make_rgb

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random tiny Gemma3ForConditionalGeneration saved by transformers itself, with its image processor."""
    folder = tmp_path_factory.mktemp("hf_gemma3")
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(hf_gemma3_config(TINY_VISION, TINY_PROJECTOR)).eval()
    with torch.no_grad():  # the default init leaves the norm weight at 0 and biases at 0: perturb them
        for p in model.model.vision_tower.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.model.multi_modal_projector.mm_soft_emb_norm.weight.normal_(0, 0.1)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.1)
    model.save_pretrained(folder)
    processor = transformers.Gemma3ImageProcessorPil(
        size={"height": TINY_VISION.image_size, "width": TINY_VISION.image_size},
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    Image.fromarray(make_rgb(300, 400, 1)).save(folder / "a.png")
    Image.fromarray(make_rgb(64, 48, 2)).save(folder / "sub" / "b.png")
    Image.fromarray(make_rgb(90, 90, 3)).save(folder / "sub" / "a.png")
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma3_vision", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("project", [True, False])
def test_cli_encode_equals_get_image_features(hf_checkpoint, images, tmp_path, project):
    folder, model, processor = hf_checkpoint
    out = tmp_path / "out"
    args = ["encode", str(images), "--model", str(folder), "--out", str(out), "--dtype", "float32",
            "--batch-size", "2"]
    result = run_cli(*args, *([] if project else ["--no-project"]))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 3
    assert sorted(r["output"] for r in records) == ["a.png.npy", "sub/a.png.npy", "sub/b.png.npy"]
    for r in records:
        ours = np.load(out / r["output"])
        with Image.open(r["input"]) as im:
            pixels = processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels)
        theirs = (features.pooler_output if project else features.last_hidden_state)[0].numpy()
        assert list(ours.shape) == r["shape"] == list(theirs.shape)
        d = float(np.abs(ours - theirs).max())
        assert d <= TOL["fp32_max_abs"], f"{r['input']}: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"


def test_cli_matches_python_api(hf_checkpoint, images, tmp_path):
    import gemma3_vision as g3

    folder, _, _ = hf_checkpoint
    out = tmp_path / "out"
    result = run_cli("encode", str(images / "a.png"), str(images / "sub"), "-m", str(folder), "-o", str(out),
                     "--dtype", "float32", "--batch-size", "3")  # the API call below is one batch of 3 too
    assert result.returncode == 0, result.stderr
    assert "encoded 3, failed 0" in result.stderr
    encoder = g3.load(folder, dtype="float32", device="cpu")
    api = encoder.encode([images / "a.png", images / "sub" / "a.png", images / "sub" / "b.png"])
    # a.png given as a file and sub/a.png found in a folder would both be "a.png.npy": the second is renamed.
    for i, name in enumerate(["a.png.npy", "a.png~2.npy", "b.png.npy"]):
        ours = np.load(out / name)
        d = float(np.abs(ours - api[i].numpy()).max())
        assert d == 0.0, f"{name}: CLI and Python API differ by {d:.3g}"
