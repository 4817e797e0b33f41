"""What an encode job computes, whichever executor runs it (``pipeline.run_job`` here, ``ray_encode`` on a cluster):
the options, the job key that resume decisions compare, and the two callables the pipeline takes.

Both executors build these from the same ``EncodeOptions``, so they write the same files and the same records.
``make_input_for`` returns a picklable function: on Ray it runs on CPU workers that never load the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..api import Gemma3Vision
from ..errors import OptionError
from ..model.pan_and_scan import PanAndScanConfig
from ..model.preprocessing import PreprocessConfig
from .output_folder import checkpoint_identity, fingerprint
from .pipeline import EncodeBatch, MakeInput


@dataclass(frozen=True)
class EncodeOptions:
    """Everything besides the model that changes what an encode job writes."""

    project: bool = True  # soft tokens (T, D); False: the tower output (N, hidden)
    batch_size: int = 1  # views per forward pass: images, and with Pan & Scan each crop counts one too
    layers: tuple[int, ...] = ()  # hidden states also saved: 0 the embeddings, i after layer i
    pool: str | None = None  # "mean": also save one vector per view
    normalize: bool = False  # L2-normalise the pooled vectors
    pan_and_scan: PanAndScanConfig | None = None
    exif_transpose: bool = True
    out_dtype: str = "float32"  # what the arrays are written in: float32, float16, bfloat16 (shards only)


def check_options(encoder: Gemma3Vision, options: EncodeOptions) -> EncodeOptions:
    """``options`` validated against the model, layers deduplicated.

    Raises:
        ConfigError: projecting without a projector, an input size the model cannot take, a layer out of range,
            ``normalize`` without ``pool``.
    """
    if options.project:
        encoder.require_projector()
    if options.normalize and options.pool is None:
        raise OptionError("normalize applies to pooled vectors: set pool='mean' (--pool mean) as well")
    encoder.check_image_size(encoder.image_size, project=options.project)
    return replace(options, layers=tuple(encoder.check_layers(list(options.layers))))


def job_key(encoder: Gemma3Vision, options: EncodeOptions, backend: str | None = None) -> str:
    """The model's identity, compute dtype, backend, preprocessing and every output-affecting option, as one digest.
    Reads no weights: ``encoder`` may be built on the meta device, with ``backend`` naming the one that will run
    (default: the encoder's)."""
    extras = {"pan_and_scan": options.pan_and_scan, "layers": list(options.layers), "pool": options.pool,
              "normalize": options.normalize}
    wanted = options.pan_and_scan or options.layers or options.pool
    # bf16 computed in fp32 (a CPU without native bf16) and bf16 computed in bf16 give different outputs, so a
    # folder resumed on the other kind of machine must not mix them. Written so that keys where the two agree
    # stay as before: resuming after an upgrade redoes nothing.
    compute = encoder.model.vision_tower.compute_dtype or encoder.dtype
    precision = str(encoder.dtype) if compute == encoder.dtype else f"{encoder.dtype} computed in {compute}"
    backend = backend or encoder.backend.name
    if backend != "torch":  # another engine rounds differently; torch's keys stay as they were
        precision += f" on {backend}"
    # The output dtype, not the layout: an input written as .npy and one in a shard hold the same values, so a
    # folder resumed in the other layout redoes nothing. Only named when not float32: default keys stay as before.
    written = [{"out_dtype": options.out_dtype}] if options.out_dtype != "float32" else []
    return fingerprint(checkpoint_identity(encoder.checkpoint), precision, options.project,
                       options.exif_transpose, encoder.preprocess_config.identity(),
                       *([extras] if wanted else []), *written)


def encode_batch_for(encoder: Gemma3Vision, options: EncodeOptions) -> EncodeBatch:
    """``pipeline.EncodeBatch`` for this encoder: float32 NHWC ``(V, S, S, 3)`` → ``(V, ...)`` float32, or named
    arrays when layers or pooling are asked for."""
    project, layers = options.project, list(options.layers)

    def encode_batch(pixels: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        # The executors batch by images; with Pan & Scan those hold more views than batch_size, which bounds the
        # views per forward pass, as in Gemma3Vision.encode.
        B = options.batch_size
        batches = [torch.from_numpy(pixels[i:i + B]) for i in range(0, len(pixels), B)]  # each (<= B, S, S, 3)
        if not (layers or options.pool):
            arrays = [encoder.encode_pixels(batch, project=project).float().cpu().numpy() for batch in batches]
            # one batch (every run without Pan & Scan): no copy; concatenate always copies, 14 ms for 8 images'
            # tower outputs
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        views = [view for batch in batches
                 for view in encoder.encode_views(batch, project=project, layers=layers, pool=options.pool,
                                                  normalize=options.normalize)]
        names = views[0].arrays()
        return {name: torch.stack([v.arrays()[name] for v in views]).float().cpu().numpy() for name in names}

    return encode_batch


def make_input_for(config: PreprocessConfig, options: EncodeOptions) -> MakeInput | None:
    """``pipeline.MakeInput`` for Pan & Scan (the views and the crop boxes); None means the image alone."""
    if options.pan_and_scan is None:
        return None
    return functools.partial(_pan_and_scan_input, config=config, pas=options.pan_and_scan)


def _pan_and_scan_input(img: Image.Image, config: PreprocessConfig,
                        pas: PanAndScanConfig) -> tuple[np.ndarray, dict[str, Any]]:
    _, views, boxes = Gemma3Vision.prepare(img, config, pas)  # (V, S, S, 3)
    return views, {"crops": [list(box) for box in boxes[1:]]}
