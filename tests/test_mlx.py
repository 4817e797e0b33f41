"""The MLX backend against the torch path and transformers: parity in fp32 (max abs diff) and bf16 (cosine against
the fp32 reference), on random:tiny and on the full-width tower cut to one layer at 224 px; every source format;
layers, pooling, Pan & Scan, pickling and the command line through the backend seam.

MLX's Linux CPU build multiplies at a few GFLOP/s, so inputs stay small (one full-width layer is seconds)."""

from __future__ import annotations

import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_PROJECTOR, TINY_VISION, TOL, Reference, cosine, make_rgb, max_abs
from format_fixtures import write_hf_folder, write_mlx_folder, write_mmproj
from gemma3_vision import backends
from gemma3_vision import load as g3_load
from gemma3_vision.api import RandomWeightsWarning
from gemma3_vision.checkpoints.weights import VisionModel
from gemma3_vision.cli import main
from gemma3_vision.errors import OptionError
from gemma3_vision.model.config import PRESETS, ProjectorConfig

pytest.importorskip("mlx.core", reason='mlx is not installed (pip install "gemma3-vision[mlx]"; the test extra '
                                       "installs it on Linux x86-64, where CI runs these tests)")


def load(model: str | Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return g3_load(model, device="cpu", **kwargs)


def pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    d = max_abs(ours, theirs)
    assert d <= TOL["fp32_max_abs"], f"{what}: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"


def assert_cosine(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    c = cosine(ours, reference)
    assert c >= TOL["bf16_cosine"], f"{what}: cosine {c:.6f} < {TOL['bf16_cosine']} against the fp32 reference"


@pytest.fixture(scope="module")
def tiny_mlx():
    return load("random:tiny", dtype="float32", backend="mlx")


def test_tiny_fp32_equals_torch_and_transformers(tiny_mlx, tiny_model, tiny_state):
    assert tiny_mlx.backend.name == "mlx" and tiny_model.backend.name == "torch"
    x = pixels(2, TINY_VISION.image_size)
    depth = TINY_VISION.num_hidden_layers
    ours, states = tiny_mlx.backend.tower(x, layers=range(depth + 1))
    hf, hf_tokens = Reference(TINY_VISION, TINY_PROJECTOR, tiny_state)(x, output_hidden_states=True)
    torch_out, torch_states = tiny_model.backend.tower(x, layers=range(depth + 1))
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert_close(ours, torch_out, "tower vs torch")
    assert_close(ours, hf.last_hidden_state, "tower vs transformers")
    for i in range(depth + 1):
        assert_close(states[i], torch_states[i], f"hidden state {i} vs torch")
        assert_close(states[i], hf.hidden_states[i], f"hidden state {i} vs transformers")
    tokens = tiny_mlx.backend.project(ours)
    assert_close(tokens, tiny_model.backend.project(torch_out), "projected tokens vs torch")
    assert_close(tokens, hf_tokens, "projected tokens vs transformers")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tiny_16_bit_cosine_against_fp32(tiny_model, dtype):
    m = load("random:tiny", dtype=dtype, backend="mlx")
    x = pixels(2, TINY_VISION.image_size, seed=1)
    tower = m.encode_pixels(x, project=False)
    tokens = m.encode_pixels(x)
    assert tower.dtype == tokens.dtype == getattr(torch, dtype)
    assert_cosine(tower, tiny_model.encode_pixels(x, project=False), f"{dtype} tower")
    assert_cosine(tokens, tiny_model.encode_pixels(x), f"{dtype} projected tokens")


def test_fp16_overflow_is_computed_again_in_fp32(tiny_state):
    # fc2 outputs beyond fp16's 65504: the first pass overflows, the second runs every product in float32
    vision, projector = TINY_VISION, TINY_PROJECTOR
    state = {k: v * 3e4 if k.endswith("layers.0.mlp.fc2.weight") else v for k, v in tiny_state.items()}
    reference = Reference(vision, projector, state)
    x = pixels(1, vision.image_size, seed=2)
    with torch.no_grad():
        hf, _ = reference(x)
    model = VisionModel(vision, projector).eval()
    model.load_state_dict(state)
    from gemma3_vision.backends.mlx import MLXBackend

    out, _ = MLXBackend(model.half(), torch.float16).tower(x)
    assert bool(torch.isfinite(out).all()), "the fp16 output holds inf/NaN"
    assert_cosine(out, hf.last_hidden_state, "fp16 tower after an overflow")


def full_width_model(seed: int = 0) -> tuple[VisionModel, dict[str, torch.Tensor]]:
    """Gemma 3's tower at full width (1152, 16 heads, MLP 4304) cut to one layer at 224 px, with a 4B projector
    (16 tokens): seeded default initialisation, the norms' weights and biases moved off 1 and 0, a random
    projection."""
    vision = replace(PRESETS["gemma3-4b"][0], num_hidden_layers=1, image_size=224)
    projector = ProjectorConfig(text_hidden_size=PRESETS["gemma3-4b"][1].text_hidden_size, mm_tokens_per_image=16)
    torch.manual_seed(seed)
    model = VisionModel(vision, projector).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("position_embedding.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mm_input_projection_weight"):  # built as zeros
                p.copy_(torch.randn_like(p) * p.shape[0] ** -0.5)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_full_width_one_layer_fp32_and_bf16():
    from gemma3_vision.backends.mlx import MLXBackend

    model, state = full_width_model()
    vision, projector = model.vision_tower.config, model.multi_modal_projector.config
    x = pixels(1, 224, seed=3)
    with torch.no_grad():
        torch_out = model.vision_tower(x)
        torch_tokens = model.multi_modal_projector(torch_out)
    hf, hf_tokens = Reference(vision, projector, state)(x)
    fp32 = MLXBackend(model, torch.float32)
    ours, _ = fp32.tower(x)
    tokens = fp32.project(ours)
    assert_close(ours, torch_out, "full-width tower vs torch")
    assert_close(ours, hf.last_hidden_state, "full-width tower vs transformers")
    assert_close(tokens, torch_tokens, "full-width tokens vs torch")
    assert_close(tokens, hf_tokens, "full-width tokens vs transformers")

    bf16_model = VisionModel(vision, projector).eval().to(torch.bfloat16)
    bf16_model.load_state_dict(state)
    bf16 = MLXBackend(bf16_model, torch.bfloat16)
    ours16, _ = bf16.tower(x)
    assert ours16.dtype == torch.bfloat16
    assert_cosine(ours16, hf.last_hidden_state, "full-width bf16 tower")
    assert_cosine(bf16.project(ours16), hf_tokens, "full-width bf16 tokens")


def test_weights_are_held_once_and_16_bit_stays_16_bit():
    m = load("random:tiny", dtype="float32", backend="mlx")  # random:tiny is made in the run dtype
    b = load("random:tiny", dtype="bfloat16", backend="mlx")
    for enc, dtype in ((m, torch.float32), (b, torch.bfloat16)):
        for name, p in enc.model.named_parameters():
            a = enc.backend.weights[name]
            assert p.dtype == dtype and str(a.dtype).endswith(str(dtype).split(".")[1]), name
            # the torch parameter reads the MLX array's memory: one copy for both
            assert np.frombuffer(memoryview(a), dtype=np.uint8).ctypes.data == p.data_ptr(), name
            assert p.untyped_storage().nbytes() == a.nbytes, name


def test_a_float32_run_keeps_bf16_weights_as_stored(tmp_path, tiny_state, tiny_model):
    folder = write_hf_folder(tmp_path / "hf", tiny_state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)
    m = load(folder, dtype="float32", backend="mlx")
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
    assert {str(a.dtype) for a in m.backend.weights.values()} == {"mlx.core.bfloat16"}
    x = pixels(1, TINY_VISION.image_size, seed=4)
    torch_run = load(folder, dtype="float32")
    out = m.encode_pixels(x)
    assert out.dtype == torch.float32
    assert_close(out, torch_run.encode_pixels(x), "bf16-stored weights, float32 run, vs torch")


@pytest.fixture(scope="module")
def format_files(tmp_path_factory, tiny_state) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {
        "hf": write_hf_folder(root / "hf", tiny_state, TINY_VISION, TINY_PROJECTOR),
        "mmproj": write_mmproj(root / "mmproj.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR),
        "mlx": write_mlx_folder(root / "mlx", tiny_state, TINY_VISION, TINY_PROJECTOR),
    }


@pytest.mark.parametrize("fmt", ["hf", "mmproj", "mlx"])
def test_every_format_family(format_files, fmt):
    ours = load(format_files[fmt], dtype="float32", backend="mlx")
    theirs = load(format_files[fmt], dtype="float32", backend="torch")
    x = pixels(1, TINY_VISION.image_size, seed=5)
    assert_close(ours.encode_pixels(x, project=False), theirs.encode_pixels(x, project=False), f"{fmt} tower")
    assert_close(ours.encode_pixels(x), theirs.encode_pixels(x), f"{fmt} tokens")


def test_encode_options_equal_torch(tiny_mlx, tiny_model):
    wide, square = make_rgb(60, 200, seed=1), make_rgb(120, 120, seed=2)
    options = dict(pan_and_scan=True, pan_and_scan_min_crop_size=32, layers=[2, 0], pool="mean", normalize=True,
                   batch_size=3)
    ours, theirs = tiny_mlx.encode([wide, square], **options), tiny_model.encode([wide, square], **options)
    assert [len(e.views) for e in ours] == [len(e.views) for e in theirs] and len(ours[0].views) > 1
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.crop_boxes == b.crop_boxes
        arrays_a, arrays_b = a.arrays(), b.arrays()
        assert arrays_a.keys() == arrays_b.keys()
        for name in arrays_a:
            assert_close(arrays_a[name], arrays_b[name], f"image {i} {name or 'embeddings'}")
    # unprojected, at another size (the position table resampled), and no images at all
    a = tiny_mlx.encode([square], project=False, image_size=168)
    assert_close(a, tiny_model.encode([square], project=False, image_size=168), "168 px tower")
    for project in (True, False):
        empty = tiny_mlx.encode([], project=project)
        assert empty.shape == tiny_model.encode([], project=project).shape and empty.dtype == torch.float32


def test_pickle_rebuilds_the_backend(tiny_mlx):
    x = pixels(1, TINY_VISION.image_size, seed=6)
    copy = pickle.loads(pickle.dumps(tiny_mlx))
    assert copy.backend.name == "mlx" and copy.backend.model is copy.model
    assert torch.equal(copy.encode_pixels(x), tiny_mlx.encode_pixels(x))


def test_worker_threads_give_the_same_tokens(tiny_mlx):
    # a server's worker threads: each runs MLX on a stream of its own (backends/mlx.py, thread_stream)
    x = pixels(2, TINY_VISION.image_size, seed=8)
    expected = tiny_mlx.encode_pixels(x)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: tiny_mlx.encode_pixels(x), range(4)))
    assert all(torch.equal(r, expected) for r in results)


def test_choosing_the_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(backends, "openvino_installed", lambda: False)  # auto's x86 choice: tests/test_openvino.py
    monkeypatch.setattr(backends, "on_apple_silicon", lambda: True)
    assert backends.resolve_backend("auto", cpu) == "mlx"
    assert backends.resolve_backend("auto", cuda) == "torch"
    assert backends.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setattr(backends, "on_apple_silicon", lambda: False)
    assert backends.resolve_backend("auto", cpu) == "torch" and backends.resolve_backend(None, cpu) == "torch"
    assert backends.resolve_backend("mlx", cpu) == "mlx"
    with pytest.raises(OptionError, match="device must be cpu or left out, got cuda"):
        backends.resolve_backend("mlx", cuda)
    monkeypatch.setattr(backends, "mlx_import_error", lambda: "No module named 'mlx'")
    with pytest.raises(OptionError, match=r"No module named 'mlx'.*pip install \"gemma3-vision\[mlx\]\""):
        backends.resolve_backend("mlx", cpu)
    monkeypatch.setattr(backends, "on_apple_silicon", lambda: True)
    assert backends.resolve_backend("auto", cpu) == "torch"  # Apple silicon without mlx: torch, as before


def test_encode_command_with_mlx(tmp_path, tiny_model):
    Image.fromarray(make_rgb(100, 140, seed=7)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = CliRunner().invoke(main, ["encode", str(tmp_path / "a.png"), "--model", "random:tiny", "--out",
                                           str(out), "--backend", "mlx", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    saved = torch.from_numpy(np.load(out / "a.png.npy"))
    assert_close(saved, tiny_model.encode([str(tmp_path / "a.png")])[0], "CLI --backend mlx vs torch")


def test_serve_command_with_mlx_answers_as_encode_and_exits_0_on_sigterm(tmp_path, tiny_mlx):
    # The service's worker thread runs the model: MLX on a stream of that thread. A real `gemma3-vision serve`
    # process, so that what SIGTERM does to MLX at exit is part of what is tested.
    import base64
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    Image.fromarray(make_rgb(60, 80, seed=3)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "gemma3_vision", "serve", "--model", "random:tiny", "--backend",
                               "mlx", "--dtype", "float32", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ready", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.2)
        models = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=10))
        assert models["data"][0]["backend"] == "mlx", models
        body = json.dumps({"model": "random:tiny", "input": base64.b64encode(data).decode()}).encode()
        request = urllib.request.Request(f"{url}/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        served = torch.tensor(json.load(urllib.request.urlopen(request, timeout=60))["data"][0]["embedding"])
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    expected = tiny_mlx.encode([str(tmp_path / "a.png")])[0].float().mean(dim=0)
    d = max_abs(served, expected)
    assert d == 0.0, f"serve --backend mlx vs encode on mlx: max abs diff {d:.3g} (expected bit-identical)"
    assert server.returncode == 0, f"exit {server.returncode}: {err[-2000:]}"
