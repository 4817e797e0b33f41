"""``show``: a valid picture of the expected size, in the format its extension names; the PCA panel is deterministic and independent of eigen signs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_VISION, make_rgb
from gemma3_vision import ConfigError, RandomWeightsWarning
from gemma3_vision.cli import main
from gemma3_vision.tools.visualize import (
    FOOTER_HEIGHT,
    LABEL_HEIGHT,
    MARGIN,
    AttentionQuery,
    attention_map,
    pca_rgb,
    render,
    show,
)

LANDSCAPE = Path(__file__).resolve().parent.parent / "examples" / "images" / "landscape.jpg"


def expected_size(panels: int, panel: int) -> tuple[int, int]:
    return panels * panel + (panels + 1) * MARGIN, LABEL_HEIGHT + panel + FOOTER_HEIGHT + MARGIN


def test_png_of_expected_size(tiny_model, tmp_path):
    out = tmp_path / "show.png"
    size = show(tiny_model, make_rgb(90, 140), str(out))
    # The tiny model's 112 px input is drawn at 4 × 112 = 448 px per panel.
    assert size == expected_size(2, 448)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == size
        img.verify()


@pytest.mark.parametrize("name, fmt", [("s.jpg", "JPEG"), ("s.JPEG", "JPEG"), ("s.webp", "WEBP"),
                                       ("s.tiff", "TIFF"), ("s.png", "PNG"), ("noextension", "PNG")])
def test_format_follows_the_extension(tiny_model, tmp_path, name, fmt):
    out = tmp_path / name
    size = show(tiny_model, make_rgb(90, 140), str(out))
    with Image.open(out) as img:
        assert img.format == fmt and img.mode == "RGB" and img.size == size
        img.load()
    if fmt == "JPEG":  # lossy, but the same picture: mean abs difference to the rendered one stays small
        d = np.abs(np.asarray(Image.open(out), np.float64) - np.asarray(render(tiny_model, make_rgb(90, 140)))).mean()
        assert d < 2.0, f"JPEG vs rendered picture: mean abs diff {d:.3g} >= 2"


@pytest.mark.parametrize("name, match", [("s.xyz", r"cannot write a \.xyz picture: expected an extension Pillow"),
                                         ("s.xbm", r"cannot write an RGB picture as XBM")])
def test_unwritable_extension_is_refused(tiny_model, tmp_path, name, match):
    with pytest.raises(ConfigError, match=match):
        show(tiny_model, make_rgb(90, 140), str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []  # nothing written
    result = CliRunner().invoke(main, ["show", str(LANDSCAPE), "--model", "random:tiny", "-o", str(tmp_path / name),
                                       "--device", "cpu"])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "cannot write" in errors[0] and list(tmp_path.iterdir()) == []


def test_attention_panel_adds_a_panel(tiny_model, tmp_path):
    out = tmp_path / "attn.png"
    size = show(tiny_model, make_rgb(90, 140), str(out), attention=AttentionQuery(layer=2, head=3, patch=(0, 7)))
    assert size == expected_size(3, 448)


def test_picture_is_deterministic(tiny_model, tmp_path):
    image = make_rgb(100, 100, seed=5)
    a = np.asarray(render(tiny_model, image, attention=AttentionQuery(1, 0)))
    b = np.asarray(render(tiny_model, image, attention=AttentionQuery(1, 0)))
    assert np.array_equal(a, b)


def test_pca_panel_is_deterministic_and_sign_free():
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 16)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    # Features with known structure: three directions carrying x, y and x*y, plus small noise.
    basis = torch.randn(3, 32, generator=g)
    feats = (torch.stack([4 * xx, 2 * yy, xx * yy], -1).reshape(256, 3) @ basis
             + 0.01 * torch.randn(256, 32, generator=g))
    first = pca_rgb(feats)
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    assert np.array_equal(first, pca_rgb(feats.clone()))
    assert np.array_equal(first, pca_rgb(-feats)), "PCA colours depend on the eigenvector signs"
    assert np.array_equal(first, pca_rgb(feats + 5.0)), "PCA colours depend on the feature mean"
    # The strongest component (x, 4× the others) drives red: red is monotone along each row.
    red = first[..., 0].astype(int)
    assert abs(np.corrcoef(red.ravel(), xx.numpy().ravel())[0, 1]) > 0.95


def test_attention_weights_match_the_eager_softmax(tiny_model):
    """The panel's weights equal the attention row of the model's own eager path for that layer and head."""
    pixels = tiny_model.preprocess([make_rgb(112, 112, seed=9)])
    tower = tiny_model.model.vision_tower
    out = tower(pixels, output_hidden_states=True)
    layer, head, (row, col) = 2, 1, (3, 5)
    weights = attention_map(tiny_model, out.hidden_states, AttentionQuery(layer, head, (row, col)), 8)
    attn = tower.encoder.layers[layer - 1].self_attn
    h = tower.encoder.layers[layer - 1].layer_norm1(out.hidden_states[layer - 1])
    B, N, D = h.shape
    q = attn.q_proj(h).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, N, Dh)
    k = attn.k_proj(h).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, N, Dh)
    full = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)  # (B, H, N, N)
    expected = full[0, head, row * 8 + col].reshape(8, 8).double().numpy()
    d = np.abs(weights - expected).max()
    assert d <= 1e-6, f"attention row: max abs diff {d:.3g} > 1e-6"
    assert abs(weights.sum() - 1) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": AttentionQuery(3, 0)}, r"layer must be in 1\.\.2"),
        ({"attention": AttentionQuery(1, 4)}, r"head must be in 0\.\.3"),
        ({"attention": AttentionQuery(1, 0, (8, 0))}, r"patch must be \(row, col\) in 0\.\.7"),
        ({"features_layer": 3}, r"features layer must be in 0\.\.2"),
    ],
)
def test_bad_choices_are_refused(tiny_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        render(tiny_model, make_rgb(50, 50), **kwargs)


def test_other_input_size_and_features_layer(tiny_model):
    picture = render(tiny_model, make_rgb(60, 60), image_size=224, features_layer=0)
    assert picture.size == expected_size(2, 448)  # 224 px → 2 × 224


def test_cli_show(tmp_path):
    out = tmp_path / "cli.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = CliRunner().invoke(main, ["show", str(LANDSCAPE), "--model", "random:tiny", "-o", str(out),
                                           "--attention", "2,1", "--patch", "2,3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == expected_size(3, 448)
    assert TINY_VISION.image_size == 112  # the sizes above assume the tiny preset's 112 px


def test_cli_show_reports_bad_options(tmp_path):
    result = CliRunner().invoke(main, ["show", str(LANDSCAPE), "--model", "random:tiny",
                                       "-o", str(tmp_path / "x.png"), "--attention", "9,0", "--device", "cpu"])
    assert result.exit_code == 2  # a usage error: a bad option value
    assert "attention layer must be in 1..2" in result.output
    result = CliRunner().invoke(main, ["show", str(LANDSCAPE), "--model", "random:tiny",
                                       "-o", str(tmp_path / "x.png"), "--patch", "1,2"])
    assert result.exit_code == 2 and "--patch needs --attention" in result.output
