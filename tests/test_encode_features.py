"""``gemma3-vision encode`` with --pan-and-scan, --image-size, --layers, --pool: the extra .npy files and the
index records, equal to the Python API's arrays; the API's ``encode`` on edge inputs (empty, zero-size)."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TOL, make_rgb, states_alive_at_the_last_norm
from gemma3_vision import ImageError, RandomWeightsWarning
from gemma3_vision.cli import main
from gemma3_vision.model.pan_and_scan import crop_boxes


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(make_rgb(300, 900, seed=1)).save(folder / "wide.png")
    Image.fromarray(make_rgb(280, 280, seed=2)).save(folder / "square.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def run(*args: str) -> tuple[int, str]:
    # float32 as the tiny_model fixture, not the CLI's default: on a CPU with fast bf16 that default is bfloat16,
    # and the arrays are compared with the fp32 tolerance.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = CliRunner().invoke(main, ["encode", *args, "--model", "random:tiny", "--device", "cpu",
                                           "--dtype", "float32"])
    return result.exit_code, result.output


def records(out: Path) -> dict[str, dict]:
    lines = (out / "index.jsonl").read_text().splitlines()
    return {Path(r["input"]).name: r for r in map(json.loads, lines)}


def test_pan_and_scan_layers_and_pool(tiny_model, inputs, tmp_path):
    out = tmp_path / "out"
    code, output = run(str(inputs), "--out", str(out), "--pan-and-scan", "--layers", "2,0", "--pool", "mean",
                       "--normalize", "-b", "2")
    assert code == 3, output  # the broken input fails; the others are written
    index = records(out)
    assert index["broken.jpg"]["status"] == "error"

    wide = index["wide.png"]
    assert wide["output"] == "wide.png.npy" and wide["shape"] == [16, 96]
    assert wide["crops"] == [[0, 0, 300, 300], [300, 0, 600, 300], [600, 0, 900, 300]]
    [expected] = tiny_model.encode([str(inputs / "wide.png")], pan_and_scan=True, layers=[2, 0], pool="mean",
                                   normalize=True)
    arrays = expected.arrays()
    assert set(wide["outputs"]) == set(arrays) - {""}
    assert wide["outputs"]["crop2.layer0"] == "wide.png.crop2.layer0.npy"
    for name, tensor in arrays.items():
        saved = np.load(out / (wide["outputs"][name] if name else wide["output"]))
        assert saved.shape == tuple(tensor.shape), name
        d = float(np.abs(saved - tensor.numpy()).max())
        assert d <= TOL["fp32_max_abs"], f"{name}: CLI vs API max abs diff {d:.3g} > {TOL['fp32_max_abs']}"

    square = index["square.png"]
    assert square["crops"] == []
    assert sorted(square["outputs"]) == ["layer0", "layer2", "pooled"]
    pooled = np.load(out / square["outputs"]["pooled"])
    assert pooled.shape == (96,) and abs(float(np.linalg.norm(pooled)) - 1) <= 1e-6

    # Same command again: everything is already done. Other options: encoded again under a new job key.
    code, output = run(str(inputs), "--out", str(out), "--pan-and-scan", "--layers", "2,0", "--pool", "mean",
                       "--normalize", "-b", "2")
    assert "encoded 0" in output and "2 already encoded" in output
    code, output = run(str(inputs), "--out", str(out), "--pool", "mean")
    assert "encoded 2" in output
    assert "outputs" in records(out)["wide.png"] and "crops" not in records(out)["wide.png"]
    # The crops and layers only the earlier options wrote are removed: the folder holds one job's files.
    assert sorted(p.name for p in out.glob("*.npy")) == ["square.png.npy", "square.png.pooled.npy", "wide.png.npy",
                                                         "wide.png.pooled.npy"]


def test_image_size_changes_the_token_count(tmp_path, inputs):
    out = tmp_path / "out"
    code, output = run(str(inputs / "square.png"), "--out", str(out), "--image-size", "224")
    assert code == 0, output
    record = records(out)["square.png"]
    assert record["shape"] == [64, 96] and "outputs" not in record  # (224 / 14 / 2)² tokens, one file
    assert np.load(out / "square.png.npy").shape == (64, 96)


def test_plain_encode_record_is_unchanged(tmp_path, inputs):
    out = tmp_path / "out"
    code, output = run(str(inputs / "square.png"), "--out", str(out))
    assert code == 0, output
    record = records(out)["square.png"]
    assert "outputs" not in record and "crops" not in record and record["shape"] == [16, 96]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--normalize"], 2, "--normalize applies to pooled vectors"),
        (["--layers", "1,x"], 2, "expected integers separated by commas"),
        # values the model cannot take (its depth, its projector's pool) are usage errors too
        (["--layers", "5"], 2, r"layers must be in 0..2"),
        (["--image-size", "126"], 2, "merge does not divide: use a multiple of 28 (e.g. 112), or project=False / "
                                     "--no-project"),
        (["--pan-and-scan", "--pan-and-scan-max-num-crops", "1"], 2, "--pan-and-scan-max-num-crops"),
        # one image's views are held together: 100,000 crops of a 1x100,000 image got the process OOM-killed
        (["--pan-and-scan", "--pan-and-scan-max-num-crops", "100000"], 2,
         "'--pan-and-scan-max-num-crops': at most 32, got 100000: one image's views"),
        (["--pan-and-scan-max-num-crops", "3"], 2,
         "--pan-and-scan-max-num-crops applies to Pan & Scan: add --pan-and-scan"),
    ],
)
def test_bad_options(tmp_path, inputs, args, code, message):
    result_code, output = run(str(inputs / "square.png"), "--out", str(tmp_path / "out"), *args)
    assert result_code == code, output
    assert message in output


ZERO_SIZE = {"pil-10x0": lambda: Image.new("RGB", (10, 0)), "array-0x10x3": lambda: np.zeros((0, 10, 3), np.uint8),
             "array-10x0": lambda: np.zeros((10, 0), np.uint8)}


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("kind", list(ZERO_SIZE))
def test_zero_size_images_are_refused(tiny_model, kind, pan_and_scan):
    # Decoded files had this check; images handed over in memory came out black, or divided by zero in Pan & Scan.
    with pytest.raises(ImageError, match=r": expected an image of at least 1x1 pixels, found (10x0|0x10)$"):
        tiny_model.encode([ZERO_SIZE[kind]()], pan_and_scan=pan_and_scan)


def test_pan_and_scan_boxes_refuse_a_zero_side():
    with pytest.raises(ImageError, match=r"^Pan & Scan input: expected an image of at least 1x1 pixels, found 0x7$"):
        crop_boxes(0, 7)


def test_encode_layers_keeps_only_the_states_asked_for(tiny_model):
    # One 896 px image's 28 hidden states are 0.5 GB in fp32: layers=[i] must not hold the other 27 while it runs.
    image = make_rgb(120, 160, seed=4)
    tower = tiny_model.model.vision_tower
    alive = states_alive_at_the_last_norm(tower, lambda: tiny_model.encode([image], layers=[1]))
    assert alive == [1, 2], f"states held at the last norm: {alive}, expected layer 1's (asked) and 2's (the last)"
    [result] = tiny_model.encode([image], layers=[1, 0])
    with torch.inference_mode():
        every = tower(tiny_model.preprocess([image]).to(tiny_model.device), output_hidden_states=True)
    for i in (0, 1):
        assert torch.equal(result.layers[i], every.hidden_states[i][0]), f"layer {i} differs from every state's"


def forward_sizes(monkeypatch) -> list[int]:
    """The batch of every call of a backend's tower from now on (the list fills as the tower runs), whichever
    backend ``auto`` picks."""
    from gemma3_vision.backends.torch import TorchBackend

    sizes: list[int] = []
    backends: list[type] = [TorchBackend]
    with contextlib.suppress(ImportError):  # the openvino extra (x86-64)
        from gemma3_vision.backends.openvino import OpenVINOBackend

        backends.append(OpenVINOBackend)
    for backend in backends:
        def counting(self, pixels, layers=(), tower=backend.tower):  # noqa: ANN001, ANN202
            sizes.append(pixels.shape[0])
            return tower(self, pixels, layers)

        monkeypatch.setattr(backend, "tower", counting)
    return sizes


@pytest.mark.parametrize(("batch_size", "expected"), [(1, [1] * 11), (4, [4, 4, 3])])
def test_batch_size_counts_views_on_every_path(tiny_model, tmp_path, monkeypatch, batch_size, expected):
    # Pan & Scan gives the two 1200x300 images 4 crops each: 5 + 1 + 5 = 11 views. batch_size bounds the views
    # of a forward pass everywhere: the API, the CLI, and both with the extra outputs (--pool, --layers).
    folder = tmp_path / "in"
    folder.mkdir()
    images = [make_rgb(300, 1200, seed=1), make_rgb(280, 280, seed=2), make_rgb(1200, 300, seed=3)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    sizes = forward_sizes(monkeypatch)
    extras = {"plain": ({}, []), "pool": ({"pool": "mean"}, ["--pool", "mean"]),
              "layers": ({"layers": [1]}, ["--layers", "1"])}
    for name, (kwargs, args) in extras.items():
        sizes.clear()
        tiny_model.encode(images, batch_size=batch_size, pan_and_scan=True, **kwargs)
        assert sizes == expected, f"API, {name}: forward passes of {sizes} views, expected {expected}"
        sizes.clear()
        code, output = run(str(folder), "--out", str(tmp_path / f"out-{name}-{batch_size}"), "--pan-and-scan",
                           "-b", str(batch_size), *args)
        assert code == 0, output
        assert sizes == expected, f"CLI, {name}: forward passes of {sizes} views, expected {expected}"


def test_batching_views_leaves_the_outputs_equal(tiny_model, tmp_path):
    # Views batched differently go through the same products in other groupings: fp32 rounding at most.
    images = [make_rgb(300, 1200, seed=1), make_rgb(280, 280, seed=2), make_rgb(1200, 300, seed=3)]
    one = tiny_model.encode(images, batch_size=1, pan_and_scan=True, layers=[1], pool="mean")
    four = tiny_model.encode(images, batch_size=4, pan_and_scan=True, layers=[1], pool="mean")
    worst = 0.0
    for a, b in zip(one, four, strict=True):
        assert a.crop_boxes == b.crop_boxes
        arrays_a, arrays_b = a.arrays(), b.arrays()
        assert arrays_a.keys() == arrays_b.keys()
        worst = max([worst, *(float((arrays_a[k] - arrays_b[k]).abs().max()) for k in arrays_a)])
    assert worst <= TOL["fp32_max_abs"], f"batch 1 vs batch 4: max abs diff {worst:.3g} > {TOL['fp32_max_abs']}"
    print(f"batch 1 vs batch 4: max abs diff {worst:.3g}")


@pytest.mark.parametrize("project", [True, False])
def test_no_images_give_no_rows(tiny_model, project):
    # As for any other count: a tensor with 0 rows of the usual shape, or no ImageEncoding.
    some = tiny_model.encode([make_rgb(40, 40)], project=project, image_size=112)
    none = tiny_model.encode([], project=project, image_size=112)
    assert isinstance(none, torch.Tensor) and isinstance(some, torch.Tensor)
    assert none.shape == (0, *some.shape[1:]) and none.dtype == some.dtype and none.device == some.device
    assert tiny_model.encode([], project=project, pan_and_scan=True) == []
    assert tiny_model.encode([], project=project, pool="mean", layers=[1]) == []
