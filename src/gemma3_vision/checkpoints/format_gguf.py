"""GGUF checkpoints: llama.cpp ``mmproj`` files and Ollama gemma3 model blobs (text model plus ``v.*`` / ``mm.*``).

The header is validated first (``gguf_header``); tensor data is then memory-mapped and only the vision and projector
tensors are ever touched, so a 17 GB Ollama blob costs its 0.8 GB tower. Quantized types are dequantized by
``gguf.quants``. Conventions undone here:

- ggml stores dimensions innermost first (``ne``): reversing them gives the torch shape. That is already the HF
  layout for every tensor, including ``mm_input_projection_weight`` (stored ``ne [D, 1152]`` = torch ``(1152, D)``).
- Both flavours fold the Gemma RMSNorm's ``1 + w`` into ``mm_soft_emb_norm``: it is subtracted again, in fp32.
- Legacy llama.cpp files name fc1 ``ffn_down`` and fc2 ``ffn_up``: which is which is decided by shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType

from ..errors import ConfigError, WeightsError
from ..model.config import ProjectorConfig, VisionConfig
from ..model.preprocessing import PreprocessConfig, channel_values
from ..safe_io import open_regular
from .checkpoint import Checkpoint, TensorSource
from .gguf_header import GGUFHeader, TensorInfo, read_gguf_header

Fix = Callable[[torch.Tensor], torch.Tensor]
Entry = str | tuple[str, Fix] | None

T, L, P = "vision_tower.", "vision_tower.encoder.layers.{bid}.", "multi_modal_projector."


def undo_plus_one(t: torch.Tensor) -> torch.Tensor:
    """The converters store the Gemma RMSNorm weight as ``w + 1``; the canonical tensor is ``w`` (fp32 math)."""
    assert t.dim() == 1, f"soft-emb norm weight must be 1-D, got {tuple(t.shape)}"
    return t.float() - 1.0


# llama.cpp `convert_hf_to_gguf.py --mmproj` names (LC tools/mtmd/clip-impl.h).
MMPROJ_TO_CANONICAL: dict[str, Entry] = {
    "v.patch_embd.weight": T + "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": T + "embeddings.patch_embedding.bias",
    "v.position_embd.weight": T + "embeddings.position_embedding.weight",
    "v.blk.{bid}.ln1.weight": L + "layer_norm1.weight",
    "v.blk.{bid}.ln1.bias": L + "layer_norm1.bias",
    "v.blk.{bid}.attn_q.weight": L + "self_attn.q_proj.weight",
    "v.blk.{bid}.attn_q.bias": L + "self_attn.q_proj.bias",
    "v.blk.{bid}.attn_k.weight": L + "self_attn.k_proj.weight",
    "v.blk.{bid}.attn_k.bias": L + "self_attn.k_proj.bias",
    "v.blk.{bid}.attn_v.weight": L + "self_attn.v_proj.weight",
    "v.blk.{bid}.attn_v.bias": L + "self_attn.v_proj.bias",
    "v.blk.{bid}.attn_out.weight": L + "self_attn.out_proj.weight",
    "v.blk.{bid}.attn_out.bias": L + "self_attn.out_proj.bias",
    "v.blk.{bid}.ln2.weight": L + "layer_norm2.weight",
    "v.blk.{bid}.ln2.bias": L + "layer_norm2.bias",
    "v.blk.{bid}.ffn_up.weight": L + "mlp.fc1.weight",  # legacy files swap up/down: fixed by shape, see below
    "v.blk.{bid}.ffn_up.bias": L + "mlp.fc1.bias",
    "v.blk.{bid}.ffn_down.weight": L + "mlp.fc2.weight",
    "v.blk.{bid}.ffn_down.bias": L + "mlp.fc2.bias",
    "v.post_ln.weight": T + "post_layernorm.weight",
    "v.post_ln.bias": T + "post_layernorm.bias",
    "mm.input_projection.weight": P + "mm_input_projection_weight",
    "mm.soft_emb_norm.weight": (P + "mm_soft_emb_norm.weight", undo_plus_one),
}

# Ollama `convert/convert_gemma3.go` names; its fc1/fc2 are HF's, unambiguous.
OLLAMA_TO_CANONICAL: dict[str, Entry] = {
    "v.patch_embedding.weight": T + "embeddings.patch_embedding.weight",
    "v.patch_embedding.bias": T + "embeddings.patch_embedding.bias",
    "v.position_embedding.weight": T + "embeddings.position_embedding.weight",
    "v.blk.{bid}.layer_norm1.weight": L + "layer_norm1.weight",
    "v.blk.{bid}.layer_norm1.bias": L + "layer_norm1.bias",
    "v.blk.{bid}.attn_q.weight": L + "self_attn.q_proj.weight",
    "v.blk.{bid}.attn_q.bias": L + "self_attn.q_proj.bias",
    "v.blk.{bid}.attn_k.weight": L + "self_attn.k_proj.weight",
    "v.blk.{bid}.attn_k.bias": L + "self_attn.k_proj.bias",
    "v.blk.{bid}.attn_v.weight": L + "self_attn.v_proj.weight",
    "v.blk.{bid}.attn_v.bias": L + "self_attn.v_proj.bias",
    "v.blk.{bid}.attn_output.weight": L + "self_attn.out_proj.weight",
    "v.blk.{bid}.attn_output.bias": L + "self_attn.out_proj.bias",
    "v.blk.{bid}.layer_norm2.weight": L + "layer_norm2.weight",
    "v.blk.{bid}.layer_norm2.bias": L + "layer_norm2.bias",
    "v.blk.{bid}.mlp.fc1.weight": L + "mlp.fc1.weight",
    "v.blk.{bid}.mlp.fc1.bias": L + "mlp.fc1.bias",
    "v.blk.{bid}.mlp.fc2.weight": L + "mlp.fc2.weight",
    "v.blk.{bid}.mlp.fc2.bias": L + "mlp.fc2.bias",
    "v.post_layernorm.weight": T + "post_layernorm.weight",
    "v.post_layernorm.bias": T + "post_layernorm.bias",
    "mm.mm_input_projection.weight": P + "mm_input_projection_weight",
    "mm.mm_soft_emb_norm.weight": (P + "mm_soft_emb_norm.weight", undo_plus_one),
}

VISION_PREFIXES = ("v.", "mm.")  # everything else in an Ollama blob is the text model: not read
_LAYER = re.compile(r"v\.blk\.(0|[1-9][0-9]{0,5})\.(.+)")
_FLOAT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64}
PLUS_ONE = "mm soft_emb_norm stored as 1 + w: 1 subtracted"
NE_REVERSED = "ggml dimension order (ne) reversed to torch order"
FFN_SWAPPED = "legacy swapped FFN names (fc1 stored as ffn_down, fc2 as ffn_up): decided by shape"


def lookup(table: dict[str, Entry], name: str) -> tuple[str, Fix | None] | None | bool:
    """Canonical name and layout fix for a file tensor; None if dropped on purpose; False if the table lacks it."""
    bid = None
    key = name
    if m := _LAYER.fullmatch(name):
        bid, key = m.group(1), "v.blk.{bid}." + m.group(2)
    if key not in table:
        return False
    entry = table[key]
    if entry is None:
        return None
    target, fix = (entry, None) if isinstance(entry, str) else entry
    return (target.format(bid=bid) if bid is not None else target), fix


def load_gguf(path: str | Path, description: str | None = None) -> Checkpoint:
    """A llama.cpp mmproj or an Ollama gemma3 blob → ``Checkpoint`` (configs from its metadata, lazy tensors).

    Raises:
        FormatError: the file is not valid GGUF.
        WeightsError: a GGUF without Gemma 3 vision tensors (text-only model, other projector type), or a vision
            tensor of a type that cannot be dequantized.
    """
    path = Path(path)
    header = read_gguf_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch == "clip":
        table, fmt = MMPROJ_TO_CANONICAL, "gguf-mmproj"
        projector_type = meta.get("clip.projector_type", meta.get("clip.vision.projector_type"))
        if projector_type != "gemma3":
            raise WeightsError(f"{path}: a llama.cpp mmproj for projector type {projector_type!r}, not gemma3: "
                               "this is not a Gemma 3 vision projector")
    elif arch == "gemma3":
        table, fmt = OLLAMA_TO_CANONICAL, "gguf-ollama"
    else:
        raise WeightsError(f"{path}: GGUF general.architecture is {arch!r}; expected 'clip' (a llama.cpp mmproj "
                           "file) or 'gemma3' (an Ollama gemma3 model blob)")
    vision_names = [n for n in header.tensors if n.startswith(VISION_PREFIXES)]
    if not vision_names:
        raise WeightsError(
            f"{path}: this GGUF ({arch}, {len(header.tensors)} tensors) holds no vision tensors (v.*, mm.*): it is "
            "a text-only model (e.g. gemma3:1b, or a llama.cpp text GGUF). Pass the mmproj file instead"
        )
    vision, projector, preprocess = configs_from_gguf_metadata(header, fmt)

    tensors: dict[str, TensorSource] = {}
    unexpected: list[str] = []
    data = _Mapping(header)
    for name in vision_names:
        mapped = lookup(table, name)
        if not isinstance(mapped, tuple):
            if mapped is False:  # not in the table: the strict load reports it
                unexpected.append(name)
            continue
        canonical, fix = mapped
        info = header.tensors[name]
        _check_readable(path, info)
        tensors[canonical] = TensorSource(canonical, info.shape, info.ggml_type.name, name,
                                          _reader(data, info, fix))
    if arch == "clip":  # an mmproj holds nothing else; in an Ollama blob the rest is the text model, never read
        unexpected += [n for n in header.tensors if not n.startswith(VISION_PREFIXES)]

    conventions = [NE_REVERSED]
    if P + "mm_soft_emb_norm.weight" in tensors:
        conventions.append(PLUS_ONE)
    if fmt == "gguf-mmproj" and swap_legacy_ffn(tensors, vision):
        conventions.append(FFN_SWAPPED)
    return Checkpoint(format=fmt, files=[path], vision=vision, projector=projector, preprocess=preprocess,
                      tensors=tensors, conventions=conventions, unexpected=sorted(unexpected),
                      description=description or str(path), release=data.release)


def swap_legacy_ffn(tensors: dict[str, TensorSource], vision: VisionConfig) -> bool:
    """Legacy mmproj files store fc1 as ``ffn_down`` and fc2 as ``ffn_up`` (llama.cpp tells by shape too:
    ``clip.cpp`` checks ``ffn_down.ne[0] == n_embd``). Per layer, swap the pair back when the weight mapped to fc1
    has fc2's shape. Returns whether any layer was swapped."""
    D, F = vision.hidden_size, vision.intermediate_size
    if D == F:
        return False  # both readings fit: keep the current convention
    swapped = False
    for i in range(vision.num_hidden_layers):
        fc1, fc2 = L.format(bid=i) + "mlp.fc1.", L.format(bid=i) + "mlp.fc2."
        w1, w2 = tensors.get(fc1 + "weight"), tensors.get(fc2 + "weight")
        if w1 is None or w2 is None or not (w1.shape == (D, F) and w2.shape == (F, D)):
            continue  # current layout, or a shape problem the strict load reports
        for suffix in ("weight", "bias"):
            a, b = tensors.pop(fc1 + suffix, None), tensors.pop(fc2 + suffix, None)
            if b is not None:
                tensors[fc1 + suffix] = TensorSource(fc1 + suffix, b.shape, b.stored_dtype, b.source_name, b.read)
            if a is not None:
                tensors[fc2 + suffix] = TensorSource(fc2 + suffix, a.shape, a.stored_dtype, a.source_name, a.read)
        swapped = True
    return swapped


def _check_readable(path: Path, info: TensorInfo) -> None:
    t = info.ggml_type
    if t in _FLOAT_DTYPES or t == GGMLQuantizationType.BF16 or t in quants._type_traits:
        return
    raise WeightsError(f"{path}: unsupported GGUF tensor type {t.name} for {info.name}: the gguf package cannot "
                       "dequantize it")


class _Mapping:
    """The file memory-mapped while tensors are read; ``release`` unmaps it (``read_tensor`` copies, so nothing
    read still points into it). Without that, a loaded model would keep a 17 GB Ollama blob mapped for good."""

    def __init__(self, header: GGUFHeader):
        self.header = header
        self.data: np.memmap | None = None

    def get(self) -> np.memmap:
        if self.data is None:
            path = self.header.path
            with open_regular(path, WeightsError) as f:  # a FIFO swapped in since the header was read would block
                size = os.fstat(f.fileno()).st_size
                if size != self.header.file_size:  # shorter: a read past the end of a mapping is SIGBUS
                    raise WeightsError(f"{path}: the file changed after its header was validated ("
                                       f"{self.header.file_size:,} bytes then, {size:,} now)")
                self.data = np.memmap(f, dtype=np.uint8, mode="r")
        return self.data

    def release(self) -> None:
        self.data = None


def _reader(data: _Mapping, info: TensorInfo, fix: Fix | None) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        t = read_tensor(data.get(), info)
        return fix(t) if fix else t
    return read


def read_tensor(data: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """One tensor in torch order: float types as stored (F16 stays float16, BF16 bfloat16), quantized types
    dequantized to float32 by ``gguf.quants`` exactly. Always a fresh copy, never a view of the mapping."""
    raw = data[info.offset:info.offset + info.nbytes]
    t = info.ggml_type
    if t in _FLOAT_DTYPES:
        return torch.from_numpy(raw.view(_FLOAT_DTYPES[t]).reshape(info.shape).copy())
    if t == GGMLQuantizationType.BF16:  # numpy has no bfloat16: move the bits
        return torch.from_numpy(raw.view(np.int16).reshape(info.shape).copy()).view(torch.bfloat16)
    blocks = raw.reshape(quants.quant_shape_to_byte_shape(info.shape, t))
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(blocks, t), dtype=np.float32))


def _eps(meta: dict[str, Any], key: str, default: float) -> float:
    """GGUF stores eps as float32 (1e-6 reads 9.99999997e-07): take the shortest decimal that float32 rounds to
    the stored value, so the config equals the Hugging Face one."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"GGUF metadata {key} must be a number, found {value!r}")
    return float(str(np.float32(value)))


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise ConfigError(f"GGUF metadata lacks {key}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"GGUF metadata {key} must be an integer, found {value!r}")
    return value


def configs_from_gguf_metadata(header: GGUFHeader, fmt: str
                               ) -> tuple[VisionConfig, ProjectorConfig, PreprocessConfig]:
    """The vision, projector and preprocessing configs from a GGUF's metadata (llama.cpp ``clip.vision.*`` or
    Ollama ``gemma3.vision.*``). Keys Ollama leaves out take Gemma 3's values, as its model code does."""
    meta, d = header.metadata, VisionConfig()
    try:
        if fmt == "gguf-mmproj":
            k = "clip.vision."
            vision = VisionConfig(
                hidden_size=_int(meta, k + "embedding_length"), image_size=_int(meta, k + "image_size"),
                intermediate_size=_int(meta, k + "feed_forward_length"),
                num_attention_heads=_int(meta, k + "attention.head_count"),
                num_hidden_layers=_int(meta, k + "block_count"), patch_size=_int(meta, k + "patch_size"),
                layer_norm_eps=_eps(meta, k + "attention.layer_norm_epsilon", d.layer_norm_eps),
            )
            scale = _int(meta, k + "projector.scale_factor", 4)  # llama.cpp writes it only when it is not 4
            if scale <= 0 or vision.grid_size % scale:
                raise ConfigError(f"clip.vision.projector.scale_factor {scale} must divide the "
                                  f"{vision.grid_size}x{vision.grid_size} patch grid")
            projection = header.tensors.get("mm.input_projection.weight")
            width = _int(meta, k + "projection_dim", projection.ne[0] if projection else None)
            projector = ProjectorConfig(text_hidden_size=width, mm_tokens_per_image=(vision.grid_size // scale) ** 2)
            mean = channel_values(meta.get(k + "image_mean", (0.5, 0.5, 0.5)), k + "image_mean")
            std = channel_values(meta.get(k + "image_std", (0.5, 0.5, 0.5)), k + "image_std", positive=True)
        else:
            k = "gemma3.vision."
            vision = VisionConfig(
                hidden_size=_int(meta, k + "embedding_length", d.hidden_size),
                image_size=_int(meta, k + "image_size", d.image_size),
                intermediate_size=_int(meta, k + "feed_forward_length", d.intermediate_size),
                num_attention_heads=_int(meta, k + "attention.head_count", d.num_attention_heads),
                num_hidden_layers=_int(meta, k + "block_count", d.num_hidden_layers),
                patch_size=_int(meta, k + "patch_size", d.patch_size),
                layer_norm_eps=_eps(meta, k + "attention.layer_norm_epsilon", d.layer_norm_eps),
                num_channels=_int(meta, k + "num_channels", d.num_channels),
            )
            projection = header.tensors.get("mm.mm_input_projection.weight")
            width = _int(meta, "gemma3.embedding_length", projection.ne[0] if projection else None)
            projector = ProjectorConfig(text_hidden_size=width,
                                        mm_tokens_per_image=_int(meta, "gemma3.mm.tokens_per_image", 256))
            mean = std = (0.5, 0.5, 0.5)  # what Ollama's llama.cpp shim injects for gemma3 blobs
        projector.pool_kernel(vision)
    except ConfigError as e:
        raise ConfigError(f"{header.path}: {e}") from None
    preprocess = PreprocessConfig(image_size=vision.image_size, image_mean=mean, image_std=std)
    return vision, projector, preprocess

