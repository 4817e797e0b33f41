"""A picture of what the tower sees: the preprocessed input beside a PCA of the patch features, and optionally the
attention of one layer and head from one patch.

PCA: the first three principal components of the ``(grid², hidden)`` patch features (the tower output, or a chosen
hidden state), each scaled to [0, 1] between its 1st and 99th percentile and mapped to R, G, B, then upsampled with
nearest-neighbour so each patch stays a visible square. Each component's sign is fixed (its scores skew positive),
so the picture does not depend on the eigensolver's arbitrary sign: the same image and model give the same picture.

Attention: ``softmax(q·kᵀ / √head_dim)`` of layer ``L`` (1-based, as ``layers`` counts), recomputed from that
layer's ``q_proj``/``k_proj`` on its ``layer_norm1`` input, for one query patch over all key patches.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..api import Gemma3Vision
from ..errors import OptionError
from ..model.preprocessing import ImageInput
from ..model.tower import EncoderLayer

MIN_PANEL = 448  # small inputs (the tiny test model's 112 px) are shown at an integer multiple of at least this
MARGIN = 8
LABEL_HEIGHT = 24
FOOTER_HEIGHT = 22
BACKGROUND = (255, 255, 255)
# Pillow's save options per format: PNG and JPEG optimized, lossy formats at a quality that keeps the labels sharp.
_SAVE_OPTIONS: dict[str, dict[str, object]] = {"PNG": {"optimize": True}, "JPEG": {"quality": 95, "optimize": True},
                                               "WEBP": {"quality": 95}}
# Anchors of a dark-to-bright heat map (black, purple, red, orange, pale yellow), linearly interpolated.
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)


@dataclass(frozen=True)
class AttentionQuery:
    """Which attention map to draw: ``layer`` 1..depth, ``head`` 0..heads-1, query ``patch`` (row, col)."""

    layer: int
    head: int
    patch: tuple[int, int] | None = None  # None: the centre of the grid


def pca_rgb(features: torch.Tensor) -> np.ndarray:
    """``(N, D)`` features on a square grid → uint8 ``(g, g, 3)``: the first three principal components as RGB."""
    N, D = features.shape
    side = math.isqrt(N)
    if side * side != N:
        raise OptionError(f"PCA picture needs a square patch grid, got {N} patches")
    x = features.detach().to("cpu", torch.float64)
    x = x - x.mean(dim=0)  # (N, D)
    # Eigenvectors of the D×D covariance: exact and deterministic, cheaper than an SVD of (N, D) when D < N.
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    k = min(3, D)
    scores = x @ vectors[:, -k:].flip(-1)  # (N, k), strongest component first
    scores = scores * torch.where((scores**3).sum(0) < 0, -1.0, 1.0)  # sign: skew positive
    if k < 3:
        scores = torch.cat([scores, torch.zeros(N, 3 - k, dtype=scores.dtype)], dim=1)
    lo = torch.quantile(scores, 0.01, dim=0)
    hi = torch.quantile(scores, 0.99, dim=0)
    scaled = ((scores - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)  # (N, 3) in [0, 1]
    return (scaled.reshape(side, side, 3).numpy() * 255).round().astype(np.uint8)


def heat_rgb(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] of any shape → uint8 RGB of that shape + (3,)."""
    pos = np.clip(values, 0, 1) * (len(_HEAT) - 1)
    i = np.minimum(pos.astype(np.int64), len(_HEAT) - 2)
    t = (pos - i)[..., None]
    return np.round(_HEAT[i] * (1 - t) + _HEAT[i + 1] * t).astype(np.uint8)


@torch.inference_mode()
def attention_map(encoder: Gemma3Vision, hidden_states: tuple[torch.Tensor, ...], query: AttentionQuery,
                  grid: int) -> np.ndarray:
    """float64 ``(grid, grid)``: attention of ``query.patch`` over every patch, in one layer and head."""
    tower = encoder.model.vision_tower
    depth = len(tower.encoder.layers)
    heads = encoder.vision_config.num_attention_heads
    row, col = query.patch if query.patch is not None else (grid // 2, grid // 2)
    if not 1 <= query.layer <= depth:
        raise OptionError(f"attention layer must be in 1..{depth}, got {query.layer}")
    if not 0 <= query.head < heads:
        raise OptionError(f"attention head must be in 0..{heads - 1}, got {query.head}")
    if not (0 <= row < grid and 0 <= col < grid):
        raise OptionError(f"attention patch must be (row, col) in 0..{grid - 1}, got ({row}, {col})")
    layer = cast(EncoderLayer, tower.encoder.layers[query.layer - 1])
    attn = layer.self_attn
    Dh = attn.head_dim
    h = layer.layer_norm1(hidden_states[query.layer - 1][:1])  # (1, N, D): this layer's attention input
    heads_slice = slice(query.head * Dh, (query.head + 1) * Dh)
    q = attn.q_proj(h[:, row * grid + col])[0, heads_slice].float()  # (Dh,)
    k = attn.k_proj(h)[0, :, heads_slice].float()  # (N, Dh)
    weights = ((k @ q) * attn.scale).softmax(dim=0)  # (N,)
    return weights.double().cpu().numpy().reshape(grid, grid)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render(encoder: Gemma3Vision, image: ImageInput, *, features_layer: int | None = None,
           attention: AttentionQuery | None = None, image_size: int | None = None) -> Image.Image:
    """The picture as a PIL image: input | PCA [| attention], labelled, with a footer naming the model.

    Args:
        encoder: a loaded model.
        image: a path, PIL image or uint8 array.
        features_layer: PCA of hidden state ``i`` (0 = embeddings) instead of the tower output.
        attention: add the attention panel for this layer, head and patch.
        image_size: input size override (position embeddings interpolated).
    """
    config = encoder.preprocess_config
    if image_size is not None:
        config = replace(config, image_size=image_size)
    encoder.check_image_size(config.image_size, project=False)
    depth = encoder.vision_config.num_hidden_layers
    if features_layer is not None and not 0 <= features_layer <= depth:
        raise OptionError(f"features layer must be in 0..{depth}, got {features_layer}")
    _, pixels, _ = encoder.prepare(image, config)  # (1, S, S, 3) float32
    with torch.inference_mode():
        out = encoder.model.vision_tower(torch.from_numpy(pixels).to(encoder.device), output_hidden_states=True)
    features = out.last_hidden_state[0] if features_layer is None else out.hidden_states[features_layer][0]
    S = config.image_size
    grid = S // encoder.vision_config.patch_size
    shown = grid * encoder.vision_config.patch_size  # the pixels the patches cover (a remainder is cut)
    panel = shown * max(1, math.ceil(MIN_PANEL / shown))

    mean, std = np.asarray(config.image_mean), np.asarray(config.image_std)
    rgb = np.clip(np.round((pixels[0, :shown, :shown] * std + mean) * 255), 0, 255).astype(np.uint8)
    panels = [(Image.fromarray(rgb).resize((panel, panel), Image.Resampling.NEAREST),
               f"input, preprocessed ({S} px)")]
    what = "output" if features_layer is None else ("embeddings" if features_layer == 0 else
                                                    f"layer {features_layer}")
    pca = Image.fromarray(pca_rgb(features)).resize((panel, panel), Image.Resampling.NEAREST)
    panels.append((pca, f"PCA of {grid}x{grid} patch features ({what})"))
    if attention is not None:
        weights = attention_map(encoder, out.hidden_states, attention, grid)
        heat = heat_rgb(weights / max(weights.max(), 1e-30))
        grey = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=-1)
        grey = np.asarray(Image.fromarray(grey).resize((panel, panel), Image.Resampling.NEAREST), np.float64)
        heat_up = np.asarray(Image.fromarray(heat).resize((panel, panel), Image.Resampling.NEAREST), np.float64)
        blend = Image.fromarray(np.round(0.3 * grey + 0.7 * heat_up).astype(np.uint8))
        row, col = attention.patch if attention.patch is not None else (grid // 2, grid // 2)
        cell = panel / grid
        ImageDraw.Draw(blend).rectangle(
            [round(col * cell), round(row * cell), round((col + 1) * cell) - 1, round((row + 1) * cell) - 1],
            outline=(0, 255, 255), width=max(1, round(cell / 8)))
        panels.append((blend, f"attention, layer {attention.layer} head {attention.head}, from patch "
                              f"({row}, {col})"))

    width = len(panels) * panel + (len(panels) + 1) * MARGIN
    height = LABEL_HEIGHT + panel + FOOTER_HEIGHT + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for i, (picture, label) in enumerate(panels):
        x = MARGIN + i * (panel + MARGIN)
        canvas.paste(picture, (x, LABEL_HEIGHT))
        draw.text((x, 4), label, fill=(0, 0, 0), font=font)
    footer = f"model: {encoder.checkpoint.description}"
    if encoder.checkpoint.is_random:
        footer += "  (RANDOM WEIGHTS: shows the mechanics only, the features mean nothing)"
    draw.text((MARGIN, LABEL_HEIGHT + panel + 4), footer, fill=(160, 0, 0) if encoder.checkpoint.is_random
              else (0, 0, 0), font=font)
    return canvas


def picture_format(out: str) -> str:
    """The Pillow format that ``out``'s extension names (``.jpg`` → JPEG); no extension: PNG.

    Raises:
        OptionError: an extension no Pillow plugin writes.
    """
    suffix = Path(out).suffix.lower()
    if not suffix:
        return "PNG"
    Image.init()  # loads every plugin, so the registries below are complete
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        common = [e for e in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
                  if Image.registered_extensions().get(e) in Image.SAVE]
        raise OptionError(f"cannot write a {suffix} picture: expected an extension Pillow writes "
                          f"({', '.join(common)}, ...), got {out!r}")
    return fmt


def show(encoder: Gemma3Vision, image: ImageInput, out: str, **kwargs: object) -> tuple[int, int]:
    """Write ``render(encoder, image, **kwargs)`` in the format ``out``'s extension names (see ``picture_format``);
    returns its (width, height).

    Raises:
        OptionError: an extension Pillow cannot write, or a format that cannot hold an RGB picture (nothing is
            written).
    """
    fmt = picture_format(out)  # before the forward pass: a bad name fails at once
    picture = render(encoder, image, **kwargs)  # type: ignore[arg-type]  # RGB, as JPEG needs (it has no alpha)
    buffer = io.BytesIO()  # encode in memory first, so a format that refuses leaves no partial file
    try:
        picture.save(buffer, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
    except (OSError, ValueError, KeyError) as e:  # e.g. XBM takes 1-bit images only, GRIB and HDF5 are stubs
        raise OptionError(f"cannot write an RGB picture as {fmt} ({out!r}): {e}") from None
    Path(out).write_bytes(buffer.getvalue())
    return picture.size
