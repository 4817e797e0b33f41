"""What ``gemma3-vision info`` reports about a checkpoint, without reading any tensor data."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict
from typing import Any

from .checkpoint import PROJECTOR, TOWER, Checkpoint


def checkpoint_info(checkpoint: Checkpoint) -> dict[str, Any]:
    """Format, files, configs, stored dtypes, parameter counts, projector width and conventions undone."""
    sources = checkpoint.tensors.values()
    tower = sum(math.prod(s.shape) for s in sources if s.name.startswith(TOWER))
    projector = sum(math.prod(s.shape) for s in sources if s.name.startswith(PROJECTOR))
    p = checkpoint.projector
    return {
        "model": checkpoint.description,
        "format": checkpoint.format,
        "files": [str(f) for f in (*checkpoint.files, *checkpoint.extra_files)],  # every file read
        "vision_config": checkpoint.vision.to_dict(),
        "projector_config": p.to_dict() if p is not None else None,
        "preprocess": asdict(checkpoint.preprocess),
        "stored_dtypes": dict(sorted(Counter(s.stored_dtype for s in sources).items())),
        "tensors": len(checkpoint.tensors),
        "parameters": {"vision_tower": tower, "projector": projector, "total": tower + projector},
        "projector_width": p.text_hidden_size if p is not None else None,
        "tokens_per_image": p.mm_tokens_per_image if p is not None else None,
        "output_shape": ([p.mm_tokens_per_image, p.text_hidden_size] if p is not None
                         else [checkpoint.vision.num_patches, checkpoint.vision.hidden_size]),
        "conventions_undone": list(checkpoint.conventions),
        "unexpected_tensors": list(checkpoint.unexpected),
    }


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of ``checkpoint_info``."""
    v, p = info["vision_config"], info["projector_config"]
    params = info["parameters"]
    lines = [
        f"model:        {info['model']}",
        f"format:       {info['format']}",
        "files:        " + ("\n              ".join(info["files"]) or "(none: generated)"),
        f"vision tower: {v['num_hidden_layers']} layers, width {v['hidden_size']}, MLP {v['intermediate_size']}, "
        f"{v['num_attention_heads']} heads, {v['image_size']} px, patch {v['patch_size']}, eps {v['layer_norm_eps']:g}",
        (f"projector:    {p['mm_tokens_per_image']} tokens per image, width {p['text_hidden_size']}" if p
         else "projector:    none (standalone SigLIP tower: encode with --no-project)"),
        f"output:       {' x '.join(str(d) for d in info['output_shape'])} per image",
        "stored dtypes: " + ", ".join(f"{k} x{n}" for k, n in info["stored_dtypes"].items()),
        f"parameters:   {params['total']:,} (tower {params['vision_tower']:,}, projector {params['projector']:,})",
        "conventions:  " + ("; ".join(info["conventions_undone"]) or "none"),
    ]
    if "backend" in info:
        lines.append(f"backend:      {info['backend']['auto']} (auto, on {info['backend']['device']})")
    if info["unexpected_tensors"]:
        lines.append(f"unexpected:   {len(info['unexpected_tensors'])} tensors: "
                     + ", ".join(info["unexpected_tensors"][:10]))
    return "\n".join(lines)
