"""Writers of checkpoint fixtures in each format's real on-disk layout, from one canonical state dict.

Independent of the library's own writers (convert.py): names, KV keys and conventions are spelled out here as the
real converters write them (llama.cpp `convert_hf_to_gguf.py --mmproj`, Ollama `convert_gemma3.go`, mlx-vlm,
transformers' SiglipModel), so a reader bug is not mirrored by a writer bug.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from gemma3_vision.model.config import ProjectorConfig, VisionConfig

TOWER, PROJ = "vision_tower.", "multi_modal_projector."
NORM = PROJ + "mm_soft_emb_norm.weight"
PROJECTION = PROJ + "mm_input_projection_weight"

# canonical suffix (after vision_tower. / encoder.layers.{i}.) → (llama.cpp mmproj name, Ollama name)
_GLOBAL = {
    "embeddings.patch_embedding.weight": ("v.patch_embd.weight", "v.patch_embedding.weight"),
    "embeddings.patch_embedding.bias": ("v.patch_embd.bias", "v.patch_embedding.bias"),
    "embeddings.position_embedding.weight": ("v.position_embd.weight", "v.position_embedding.weight"),
    "post_layernorm.weight": ("v.post_ln.weight", "v.post_layernorm.weight"),
    "post_layernorm.bias": ("v.post_ln.bias", "v.post_layernorm.bias"),
}
_LAYER = {
    "layer_norm1": ("ln1", "layer_norm1"), "layer_norm2": ("ln2", "layer_norm2"),
    "self_attn.q_proj": ("attn_q", "attn_q"), "self_attn.k_proj": ("attn_k", "attn_k"),
    "self_attn.v_proj": ("attn_v", "attn_v"), "self_attn.out_proj": ("attn_out", "attn_output"),
    "mlp.fc1": ("ffn_up", "mlp.fc1"), "mlp.fc2": ("ffn_down", "mlp.fc2"),
}
_LEGACY_FFN = {"mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"}


def gguf_name(canonical: str, flavour: str, legacy_ffn: bool = False) -> str:
    """The name a converter gives a canonical tensor. flavour: 'mmproj' or 'ollama'."""
    col = 0 if flavour == "mmproj" else 1
    if canonical == PROJECTION:
        return ("mm.input_projection.weight", "mm.mm_input_projection.weight")[col]
    if canonical == NORM:
        return ("mm.soft_emb_norm.weight", "mm.mm_soft_emb_norm.weight")[col]
    rest = canonical[len(TOWER):]
    if rest in _GLOBAL:
        return _GLOBAL[rest][col]
    _, _, i, *module, param = rest.split(".")  # encoder.layers.{i}.<module>.<param>
    module_name = ".".join(module)
    short = _LAYER[module_name][col]
    if legacy_ffn and flavour == "mmproj" and module_name in _LEGACY_FFN:
        short = _LEGACY_FFN[module_name]
    return f"v.blk.{i}.{short}.{param}"


def encode(t: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q | None]:
    """A tensor as GGUFWriter.add_tensor wants it for a storage type (gguf.quants does the rounding)."""
    a = t.float().numpy()
    if qtype == Q.F32:
        return a, None
    if qtype == Q.F16:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, qtype), qtype


def stored(t: torch.Tensor, qtype: Q) -> torch.Tensor:
    """What a reader must return for ``t`` stored as ``qtype``: the stored precision, or the exact dequantization."""
    if qtype == Q.F32:
        return t.float()
    if qtype == Q.F16:
        return t.half()
    if qtype == Q.BF16:
        return t.bfloat16()
    q = gguf.quants.quantize(t.float().numpy(), qtype)
    return torch.from_numpy(gguf.quants.dequantize(q, qtype))


def storage_type(canonical: str, t: torch.Tensor, matrices: Q, projection: Q) -> Q:
    """llama.cpp's converter: embeddings and every 1-D tensor in F32, the projection F16, matrices --outtype."""
    if canonical == PROJECTION:
        return projection
    if t.dim() < 2 or ".embeddings." in "." + canonical[len(TOWER):]:
        return Q.F32
    return matrices


def write_mmproj(path: Path, state: dict[str, torch.Tensor], vision: VisionConfig, projector: ProjectorConfig,
                 *, matrices: Q = Q.F32, projection: Q = Q.F16, legacy_ffn: bool = False,
                 projector_type: str = "gemma3", omit: tuple[str, ...] = (), extra_kv: dict | None = None,
                 image_mean: list[float] | float = [0.5] * 3, image_std: list[float] | float = [0.5] * 3) -> Path:
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_clip_projector_type(projector_type)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_use_gelu(True)
    w.add_vision_image_size(vision.image_size)
    w.add_vision_patch_size(vision.patch_size)
    w.add_vision_embedding_length(vision.hidden_size)
    w.add_vision_feed_forward_length(vision.intermediate_size)
    w.add_vision_block_count(vision.num_hidden_layers)
    w.add_vision_head_count(vision.num_attention_heads)
    w.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    w.add_vision_projection_dim(projector.text_hidden_size)
    for key, value in (("clip.vision.image_mean", image_mean), ("clip.vision.image_std", image_std)):
        if isinstance(value, list):
            w.add_array(key, value)  # what add_vision_image_mean / _std write
        else:  # not what any converter writes: a hostile file
            w.add_float32(key, value)
    scale = vision.grid_size // projector.tokens_per_side
    if scale != 4:
        w.add_vision_projector_scale_factor(scale)
    for key, value in (extra_kv or {}).items():
        w.add_key_value(key, value[0], value[1])
    for name, t in state.items():
        if name in omit:
            continue
        t = t.float() + 1 if name == NORM else t  # the converter folds the Gemma RMSNorm's 1 + w
        qtype = storage_type(name, t, matrices, projection)
        arr, raw = encode(t, qtype)
        w.add_tensor(gguf_name(name, "mmproj", legacy_ffn), arr, raw_dtype=raw)
    _finish(w)
    return path


def write_ollama_blob(path: Path, state: dict[str, torch.Tensor] | None, vision: VisionConfig,
                      projector: ProjectorConfig, *, matrices: Q = Q.F16) -> Path:
    """A gemma3 model blob: a (very small) text model, a tokenizer, and the vision tensors unless state is None."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_uint32("gemma3.embedding_length", projector.text_hidden_size)
    w.add_uint32("gemma3.block_count", 1)
    for key, value in (("block_count", vision.num_hidden_layers), ("embedding_length", vision.hidden_size),
                       ("feed_forward_length", vision.intermediate_size), ("image_size", vision.image_size),
                       ("patch_size", vision.patch_size), ("num_channels", vision.num_channels),
                       ("attention.head_count", vision.num_attention_heads)):
        w.add_uint32(f"gemma3.vision.{key}", value)
    w.add_float32("gemma3.vision.attention.layer_norm_epsilon", vision.layer_norm_eps)
    w.add_uint32("gemma3.mm.tokens_per_image", projector.mm_tokens_per_image)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(2000)])  # long: summarised, not kept
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(2000)])
    g = torch.Generator().manual_seed(1)
    D = projector.text_hidden_size
    w.add_tensor("token_embd.weight", encode(torch.randn(32, D, generator=g), Q.Q8_0)[0], raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", torch.randn(D, D, generator=g).half().numpy())
    w.add_tensor("output_norm.weight", torch.randn(D, generator=g).numpy())
    for name, t in (state or {}).items():
        t = t.float() + 1 if name == NORM else t  # Ollama's addOne on every *_norm.weight outside v.
        qtype = Q.F32 if t.dim() < 2 else matrices  # v.* and mm.* are never quantized by Ollama
        arr, raw = encode(t, qtype)
        w.add_tensor(gguf_name(name, "ollama"), arr, raw_dtype=raw)
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gemma3_config_dict(vision: VisionConfig, projector: ProjectorConfig | None) -> dict:
    v = {"model_type": "siglip_vision_model", "hidden_size": vision.hidden_size, "image_size": vision.image_size,
         "intermediate_size": vision.intermediate_size, "num_attention_heads": vision.num_attention_heads,
         "num_hidden_layers": vision.num_hidden_layers, "patch_size": vision.patch_size,
         "layer_norm_eps": vision.layer_norm_eps, "num_channels": vision.num_channels, "vision_use_head": False}
    if projector is None:
        return {**v, "model_type": "siglip_vision_model"}
    return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "vision_config": v,
            "text_config": {"model_type": "gemma3_text", "hidden_size": projector.text_hidden_size},
            "mm_tokens_per_image": projector.mm_tokens_per_image}


def write_hf_folder(folder: Path, state: dict[str, torch.Tensor], vision: VisionConfig, projector: ProjectorConfig,
                    *, dtype: torch.dtype = torch.float32, shards: int = 1) -> Path:
    """The released Hub layout (vision_tower.vision_model.*, multi_modal_projector.*) plus a text model tensor;
    with shards > 1, a model.safetensors.index.json whose last shard holds only text tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(gemma3_config_dict(vision, projector)))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma3ImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "size": {"height": vision.image_size, "width": vision.image_size}}))
    tensors = {(TOWER + "vision_model." + k[len(TOWER):] if k.startswith(TOWER) else k): v.to(dtype).contiguous()
               for k, v in state.items()}
    text = {"language_model.model.embed_tokens.weight": torch.zeros(8, projector.text_hidden_size, dtype=dtype)}
    if shards == 1:
        save_file({**tensors, **text}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    groups = [names[i::shards - 1] for i in range(shards - 1)]
    weight_map = {}
    for i, group in enumerate([*groups, list(text)]):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: {**tensors, **text}[n] for n in group}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_mlx_folder(folder: Path, state: dict[str, torch.Tensor], vision: VisionConfig,
                     projector: ProjectorConfig) -> Path:
    """mlx-community layout: HF released names, patch conv (O, kH, kW, C), quantized LM (.scales/.biases)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(gemma3_config_dict(vision, projector)))
    tensors = {}
    for k, v in state.items():
        if k.endswith("patch_embedding.weight"):
            v = v.permute(0, 2, 3, 1)  # OIHW → OHWI
        tensors[TOWER + "vision_model." + k[len(TOWER):] if k.startswith(TOWER) else k] = v.contiguous()
    tensors["language_model.model.layers.0.mlp.down_proj.scales"] = torch.ones(4, 2)
    tensors["language_model.model.layers.0.mlp.down_proj.biases"] = torch.zeros(4, 2)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_siglip_folder(folder: Path, state: dict[str, torch.Tensor], vision: VisionConfig) -> Path:
    """A transformers SiglipModel checkpoint: vision_model.*, the MAP head, a text model, logit scale and bias."""
    folder.mkdir(parents=True, exist_ok=True)
    v = gemma3_config_dict(vision, None)
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": v,
                                                    "text_config": {"hidden_size": 16}}))
    D = vision.hidden_size
    tensors = {"vision_model." + k[len(TOWER):]: t.contiguous() for k, t in state.items() if k.startswith(TOWER)}
    tensors.update({
        "vision_model.head.probe": torch.zeros(1, 1, D),
        "vision_model.head.attention.in_proj_weight": torch.zeros(3 * D, D),
        "vision_model.head.attention.in_proj_bias": torch.zeros(3 * D),
        "vision_model.head.layernorm.weight": torch.ones(D),
        "text_model.embeddings.token_embedding.weight": torch.zeros(10, 16),
        "logit_scale": torch.zeros(1), "logit_bias": torch.zeros(1),
    })
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_ollama_store(root: Path, name: str, blob: Path, *, projector: Path | None = None) -> Path:
    """An Ollama store: blobs/sha256-<hex> plus manifests/<host>/<namespace>/<model>/<tag>. name: model:tag."""
    model, _, tag = name.partition(":")
    layers = []
    for media, src in (("model", blob), ("projector", projector), ("template", None)):
        data = src.read_bytes() if src is not None else b"{{ .Prompt }}"
        if media == "projector" and src is None:
            continue
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        layers.append({"mediaType": f"application/vnd.ollama.image.{media}", "digest": f"sha256:{digest}",
                       "size": len(data)})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / model / (tag or "latest")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                   "size": 2},
        "layers": layers}))
    return manifest


def populate_hf_cache(cache: Path, repo_id: str, files: dict[str, Path], revision: str = "a" * 40) -> Path:
    """The huggingface_hub cache layout: snapshot entries are symlinks into blobs/, refs/main names the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snapshot / name).parent), snapshot / name)
    return snapshot
