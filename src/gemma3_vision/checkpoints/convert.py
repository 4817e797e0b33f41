"""Write a checkpoint's vision tower and projector as a Hugging Face folder or a llama.cpp-compatible mmproj GGUF.

Tensors are read, cast and written one at a time (both writers stream), so converting costs one tensor of memory,
not a model. The output is written under a temporary name and renamed when complete.

mmproj files follow llama.cpp's ``convert_hf_to_gguf.py --mmproj`` (class ``Gemma3VisionModel``): current names,
``clip.*`` keys, the soft-emb norm stored as ``1 + w`` in F32, embeddings and 1-D tensors in F32, matrices in the
chosen dtype. The projection is where we differ. The converter forces it to F16 for every outtype (its
``tensor_force_quant``, llama.cpp #13025), which rounds bf16 and f32 weights and turns |w| > 65504 into inf. The
real constraint is narrower: clip.cpp transposes it with ``ggml_cont(ggml_transpose(...))``, a copy in the
tensor's own type, and ggml's CUDA copy has had no bf16 → bf16 kernel ("ggml_cuda_cpy: unsupported type
combination (bf16 to bf16)", koboldcpp #1483, on Gemma 3 BF16 mmproj files). So it is F16 only where F16 is what
was stored or asked for, else F32, which every backend copies and which holds bf16 exactly.

No conversion loses precision the user did not ask for: without ``dtype`` every tensor keeps its stored type (F32
where the format needs it, which widens exactly), and a cast that would overflow the chosen type is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..errors import OptionError, WeightsError
from ..model.preprocessing import RESAMPLE_CODES
from .checkpoint import PROJECTOR, TOWER, Checkpoint, TensorSource
from .format_gguf import MMPROJ_TO_CANONICAL
from .weights import check_tensors

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_GGML = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
_SAFETENSORS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_STORED = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # TensorSource.stored_dtype → a DTYPES key
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16}
NORM = PROJECTOR + "mm_soft_emb_norm.weight"
PROJECTION = PROJECTOR + "mm_input_projection_weight"
_LAYER = re.compile(r"vision_tower\.encoder\.layers\.(\d+)\.(.+)")


def stored_dtype(source: TensorSource) -> str:
    """The tensor's stored precision as a DTYPES key; any other type (Q8_0, ...) dequantizes exactly into f32."""
    return _STORED.get(source.stored_dtype, "f32")


def convert(checkpoint: Checkpoint, out: str | os.PathLike, to: str, dtype: str | None = None) -> Path:
    """Write ``checkpoint`` to ``out`` as ``to`` = 'hf' (a folder) or 'mmproj' (a GGUF file).

    Args:
        dtype: 'f32', 'f16' or 'bf16' for every tensor the format lets choose; None keeps each tensor's stored
            precision, so the conversion is lossless.

    Raises:
        OptionError: bad ``to`` / ``dtype``, ``out`` exists or its folder does not, mmproj asked of a checkpoint
            without projector, or a tensor with values beyond ``dtype``'s range (nothing is written).
        WeightsError: the checkpoint's tensors do not match its config or are not finite (nothing is written).
    """
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise OptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if to not in ("hf", "mmproj"):
        raise OptionError(f"--to must be hf or mmproj, got {to!r}")
    if out.exists():
        raise OptionError(f"{out} already exists: choose a new output path")
    if not out.absolute().parent.is_dir():  # else the error would name the temporary file written first
        raise OptionError(f"{out}: the folder {out.absolute().parent} does not exist; create it first")
    if to == "mmproj" and checkpoint.projector is None:
        raise OptionError(f"{checkpoint.description} has no multimodal projector (a standalone SigLIP tower): an "
                          "mmproj needs one; use --to hf")
    check_tensors(checkpoint)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    try:
        if to == "hf":
            write_hf(checkpoint, tmp, dtype)
        else:
            write_mmproj(checkpoint, tmp, dtype)
        tmp.rename(out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    return out


def _read(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    t = checkpoint.tensors[name].read()
    if not bool(torch.isfinite(t).all()):
        raise WeightsError(f"{checkpoint.description}: {name} holds NaN or Inf values; refusing to convert it")
    return t


def _cast(checkpoint: Checkpoint, name: str, t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` in ``dtype``, refusing values the cast makes inf, which no reader accepts. ``t`` is finite (``_read``),
    so an inf in the result is an overflow; a value just past the largest (f16: below 65520) rounds to it and is kept.
    """
    target = DTYPES[dtype]
    cast = t.to(target)
    if cast.dtype != t.dtype and not bool(torch.isfinite(cast).all()):
        largest, limit = t.abs().max().item(), torch.finfo(target).max
        raise OptionError(f"{checkpoint.description}: {name} holds |value| up to {largest:.6g}, beyond {dtype}'s "
                          f"largest {limit:.6g}; choose a wider --dtype (f32 holds it)")
    return cast


# --- Hugging Face folder -----------------------------------------------------------------------------------------

def hf_key(name: str, siglip: bool) -> str:
    """Canonical name → the released Hub layout (``vision_tower.vision_model.*``; SigLIP: ``vision_model.*``)."""
    if name.startswith(TOWER):
        return ("vision_model." if siglip else "vision_tower.vision_model.") + name[len(TOWER):]
    return name


def hf_config(checkpoint: Checkpoint) -> dict:
    v = checkpoint.vision
    vision = {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "image_size": v.image_size,
              "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_attention_heads,
              "num_hidden_layers": v.num_hidden_layers, "patch_size": v.patch_size,
              "layer_norm_eps": v.layer_norm_eps, "num_channels": v.num_channels,
              "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    if checkpoint.projector is None:
        return {**vision, "architectures": ["SiglipVisionModel"]}
    return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "vision_config": vision,
            "text_config": {"model_type": "gemma3_text", "hidden_size": checkpoint.projector.text_hidden_size},
            "mm_tokens_per_image": checkpoint.projector.mm_tokens_per_image}


def preprocessor_config(checkpoint: Checkpoint) -> dict:
    p = checkpoint.preprocess
    return {"image_processor_type": "Gemma3ImageProcessor" if checkpoint.projector else "SiglipImageProcessor",
            "do_convert_rgb": True, "do_resize": True, "size": {"height": p.image_size, "width": p.image_size},
            "resample": RESAMPLE_CODES[p.resample], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(p.image_mean), "image_std": list(p.image_std)}


def write_hf(checkpoint: Checkpoint, folder: Path, dtype: str | None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(checkpoint), indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(checkpoint), indent=2) + "\n")
    siglip = checkpoint.projector is None
    names = sorted(checkpoint.tensors)
    types = {name: dtype or stored_dtype(checkpoint.tensors[name]) for name in names}  # safetensors: any mix
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:  # the header first: shapes and dtypes are known before any tensor is read
        shape = tuple(checkpoint.tensors[name].shape)
        torch_dtype = DTYPES[types[name]]
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch_dtype.itemsize
        header[hf_key(name, siglip)] = {"dtype": _SAFETENSORS[torch_dtype], "shape": list(shape),
                                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            t = _cast(checkpoint, name, _read(checkpoint, name), types[name]).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


# --- llama.cpp mmproj GGUF ---------------------------------------------------------------------------------------

def _canonical_to_mmproj() -> dict[str, str]:
    table = {}
    for gguf_name, entry in MMPROJ_TO_CANONICAL.items():
        if entry is not None:
            table[entry if isinstance(entry, str) else entry[0]] = gguf_name
    return table


CANONICAL_TO_MMPROJ = _canonical_to_mmproj()


def mmproj_name(name: str) -> str:
    if m := _LAYER.fullmatch(name):
        return CANONICAL_TO_MMPROJ["vision_tower.encoder.layers.{bid}." + m.group(2)].format(bid=m.group(1))
    return CANONICAL_TO_MMPROJ[name]


def mmproj_dtype(name: str, source: TensorSource, dtype: str | None) -> str:
    """The type llama.cpp gets: embeddings and 1-D tensors f32 (as its converter writes them); the projection f16 or
    f32, never bf16 (clip.cpp copies it in its own type, see the module docstring); other matrices ``dtype``.
    ``dtype`` None: the stored precision. Every forced type widens bf16 exactly, so no choice here rounds."""
    wanted = dtype or stored_dtype(source)
    if len(source.shape) < 2 or name.startswith(TOWER + "embeddings."):
        return "f32"
    if name == PROJECTION and wanted == "bf16":
        return "f32"
    return wanted


def _ggml_array(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy()  # numpy has no bfloat16: write the bits
    return t.contiguous().numpy()


def _file_type(types: dict[str, str], checkpoint: Checkpoint) -> gguf.LlamaFileType:
    """``general.file_type`` names the bulk: the most common type among the encoder's matrices."""
    blocks = Counter(t for name, t in types.items()
                     if name.startswith(TOWER + "encoder.") and len(checkpoint.tensors[name].shape) >= 2)
    return _FILE_TYPE[blocks.most_common(1)[0][0] if blocks else "f32"]


def write_mmproj(checkpoint: Checkpoint, path: Path, dtype: str | None) -> None:
    v, p = checkpoint.vision, checkpoint.projector
    assert p is not None
    types = {name: mmproj_dtype(name, source, dtype) for name, source in checkpoint.tensors.items()}
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(_file_type(types, checkpoint))
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_use_gelu(True)
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(v.num_hidden_layers)
    w.add_vision_head_count(v.num_attention_heads)
    w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    w.add_vision_projection_dim(p.text_hidden_size)
    w.add_vision_image_mean(list(checkpoint.preprocess.image_mean))
    w.add_vision_image_std(list(checkpoint.preprocess.image_std))
    if (scale := p.pool_kernel(v)) != 4:  # llama.cpp writes it only when it differs from Gemma 3's 4
        w.add_vision_projector_scale_factor(scale)
    order = sorted(checkpoint.tensors, key=lambda n: _mmproj_order(mmproj_name(n)))
    for name in order:
        shape = tuple(checkpoint.tensors[name].shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[types[name]].itemsize
        w.add_tensor_info(mmproj_name(name), shape, np.dtype(np.float32), nbytes, raw_dtype=_GGML[types[name]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name in order:
        t = _read(checkpoint, name)
        if name == NORM:
            t = t.float() + 1.0  # llama.cpp applies the weight as is: fold Gemma's 1 + w back in
        w.write_tensor_data(_ggml_array(_cast(checkpoint, name, t, types[name])))
    w.close()


def _mmproj_order(gguf_name: str) -> tuple:
    """The converter's order: embeddings, then blocks by index, then post-LN and projector tensors."""
    parts = gguf_name.split(".")
    if parts[1] == "blk":
        return (1, int(parts[2]), gguf_name)
    return (0 if "embd" in gguf_name else 2, 0, gguf_name)
