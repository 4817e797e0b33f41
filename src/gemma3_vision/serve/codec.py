"""What goes over the wire: request schemas and their parsing, and the response encodings.

Requests carry images as bytes only: base64 strings, ``data:image/...;base64,`` URIs, or multipart file parts.
Nothing here reads a URL or a path, and nothing is unpickled. These functions run in the decode thread pool, never
on the event loop (they decode base64 and hash megabytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..api import Gemma3Vision, ImageEncoding, pool_rows
from ..model.pan_and_scan import PanAndScanConfig
from .problems import InvalidRequest, PayloadTooLarge

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_TYPE = "application/vnd.safetensors"
SAFETENSORS_TYPES = (SAFETENSORS_TYPE, "application/safetensors", "application/octet-stream")


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; each input string is one image (base64, or a ``data:`` URI)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields this service has no use for

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EncodeRequest(BaseModel):
    """``POST /v1/encode`` as JSON; a multipart request sends the same options as form fields."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(default_factory=list, description="base64 image files, or data:image/...;base64, URIs")
    model: str | None = None
    project: bool = True
    pool: Literal["mean"] | None = None
    normalize: bool = False
    layers: list[int] = Field(default_factory=list)
    pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio: float = 1.2
    exif_transpose: bool = True
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    format: Literal["npy", "safetensors"] | None = None

    @field_validator("layers", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """A form field sends layers as ``13,26``."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


@dataclass(frozen=True)
class ImageOptions:
    """What changes one image's computed result: the cache key and the batch key are made from these."""

    project: bool = True
    layers: tuple[int, ...] = ()
    pan_and_scan: PanAndScanConfig | None = None
    exif_transpose: bool = True


def image_options(request: EncodeRequest) -> ImageOptions:
    """Raises OptionError for Pan & Scan values out of range."""
    pas = (PanAndScanConfig(request.pan_and_scan_min_crop_size, request.pan_and_scan_max_num_crops,
                            request.pan_and_scan_min_ratio) if request.pan_and_scan else None)
    return ImageOptions(request.project, tuple(request.layers), pas, request.exif_transpose)


def parse_json(model: type[BaseModel], body: bytes) -> Any:
    """``body`` validated as ``model``; a 400 that lists each wrong field, without echoing any value (an image's
    base64 would be echoed back otherwise)."""
    if not body:
        raise InvalidRequest("expected a JSON body, found an empty one")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise InvalidRequest(validation_message(e)) from None


def parse_embeddings(body: bytes, max_images: int) -> tuple[EmbeddingsRequest, list[bytes], list[str]]:
    """An embeddings request, its images' bytes and their digests."""
    req: EmbeddingsRequest = parse_json(EmbeddingsRequest, body)
    images = decode_strings([req.input] if isinstance(req.input, str) else req.input, max_images)
    return req, images, [digest(image) for image in images]


def parse_encode(body: bytes, max_images: int) -> tuple[EncodeRequest, list[bytes], list[str]]:
    """A JSON encode request, its images' bytes and their digests."""
    req: EncodeRequest = parse_json(EncodeRequest, body)
    images = decode_strings(req.images, max_images)
    return req, images, [digest(image) for image in images]


def decode_strings(strings: list[str], max_images: int) -> list[bytes]:
    check_count(len(strings), max_images)
    return [decode_image_string(text, i) for i, text in enumerate(strings)]


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as one line: ``field: what was wrong; ...`` (values left out)."""
    parts = []
    for error in e.errors(include_url=False, include_input=False)[:10]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "invalid request: " + "; ".join(parts)


def decode_image_string(text: str, index: int) -> bytes:
    """One image as sent in JSON: a ``data:image/...;base64,`` URI or bare base64 of the file's bytes."""
    payload = text
    if text.startswith("data:"):
        header, comma, payload = text.partition(",")
        if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
            found = ("no comma before the data" if not comma else
                     "a media type that is not image/..." if not header[5:].startswith("image/") else
                     "data that is not marked ;base64")  # the header is not echoed: it could hold image bytes
            raise InvalidRequest(f"image {index}: expected a data URI of the form data:image/<type>;base64,<data>, "
                                 f"found {found}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"image {index}: expected base64 of an image file or a data:image/...;base64, URI, "
                             f"found a string of {len(text)} characters that is not base64 ({e}); URLs and file "
                             "paths are never read") from None
    if not data:
        raise InvalidRequest(f"image {index}: expected an image file's bytes, found an empty string")
    return data


def check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise PayloadTooLarge(f"expected at most {max_images} images per request, found {n}")
    if n == 0:
        raise InvalidRequest("expected at least one image, found none")


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def wants_safetensors(format: str | None, accept: str) -> bool:
    """The output encoding: an explicit ``format`` wins; otherwise the Accept header (JSON unless it names only
    safetensors or octet-stream)."""
    if format is not None:
        return format == "safetensors"
    types = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    return bool(types) and all(t in SAFETENSORS_TYPES for t in types)


def output_tensors(encoding: ImageEncoding, *, pool: str | None, normalize: bool,
                   dtype: str) -> dict[str, torch.Tensor]:
    """One image's tensors by name, as ``encode`` names its files (``embeddings`` for the main output, then
    ``layer13``, ``pooled``, ``crop1``, ``crop1.layer13`` ...), cast to ``dtype``. The pooled vectors are the mean
    over rows of each view's output (float32 before the cast), as ``encode(pool="mean")`` computes them."""
    views = encoding.views
    pooled = pool_rows(torch.stack([v.embeddings for v in views]), normalize=normalize) if pool else None  # (V, D)
    out: dict[str, torch.Tensor] = {}
    for i, view in enumerate(views):
        prefix = f"crop{i}." if i else ""
        out["embeddings" if i == 0 else f"crop{i}"] = view.embeddings
        for layer, hidden in view.layers.items():
            out[f"{prefix}layer{layer}"] = hidden
        if pooled is not None:
            out[f"{prefix}pooled"] = pooled[i]
    target = OUTPUT_DTYPES[dtype]
    return {name: t.to(target).contiguous() for name, t in out.items()}


NPY_HEADER_BYTES = 128  # np.save's header for these shapes: magic, version and a dict padded to 64-byte alignment


def response_bound(encoder: Gemma3Vision, req: EncodeRequest, n_images: int, safetensors: bool) -> int:
    """Bytes of the tensors ``/v1/encode`` would send for ``n_images`` images, known before decoding them: exact
    without Pan & Scan, an upper bound with it (every image counted with ``pan_and_scan_max_num_crops`` crops).
    JSON counts each tensor's base64 ``.npy`` (4/3 of its bytes); the envelope and metadata are left out."""
    views = n_images * (1 + req.pan_and_scan_max_num_crops if req.pan_and_scan else 1)
    itemsize = OUTPUT_DTYPES[req.dtype].itemsize
    patches, hidden = encoder.tokens_per_image(project=False), encoder.vision_config.hidden_size
    width = encoder.projector_config.text_hidden_size if req.project else hidden
    shapes = [encoder.tokens_per_image(project=req.project) * width]  # elements per view: embeddings, layers, pooled
    shapes += [patches * hidden] * len(set(req.layers))
    shapes += [width] if req.pool else []

    def sent(elements: int) -> int:
        raw = elements * itemsize
        return raw if safetensors else 4 * -(-(raw + NPY_HEADER_BYTES) // 3)

    return views * sum(sent(n) for n in shapes)


def npy_bytes(tensor: torch.Tensor) -> bytes:
    """The ``.npy`` file of a float32 or float16 tensor (``np.save``, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, tensor.numpy(), allow_pickle=False)
    return buffer.getvalue()


def encode_json(model: str, encodings: list[ImageEncoding], tensors: list[dict[str, torch.Tensor]],
                tokens: int) -> bytes:
    """The JSON body of ``/v1/encode``: per image, its size, its views' boxes and each tensor as a base64 ``.npy``
    with its shape and dtype."""
    data = [{"index": i, "size": list(enc.size), "boxes": [list(v.box) for v in enc.views],
             "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                "npy": base64.b64encode(npy_bytes(t)).decode("ascii")}
                         for name, t in named.items()}}
            for i, (enc, named) in enumerate(zip(encodings, tensors, strict=True))]
    usage = {"images": len(encodings), "prompt_tokens": tokens, "total_tokens": tokens}
    return json.dumps({"object": "list", "model": model, "data": data, "usage": usage}).encode()


def encode_safetensors(model: str, encodings: list[ImageEncoding], tensors: list[dict[str, torch.Tensor]]) -> bytes:
    """One safetensors file: tensor ``{i}.{name}`` per image ``i``; the sizes and boxes in its metadata."""
    from safetensors.torch import save

    flat = {f"{i}.{name}": t for i, named in enumerate(tensors) for name, t in named.items()}
    images = [{"size": list(enc.size), "boxes": [list(v.box) for v in enc.views]} for enc in encodings]
    return save(flat, metadata={"model": model, "images": json.dumps(images)})


def encode_body(model: str, encodings: list[ImageEncoding], req: EncodeRequest, safetensors: bool,
                tokens: int) -> bytes:
    """The body of ``/v1/encode``'s answer, with the request's pooling and output dtype."""
    tensors = [output_tensors(e, pool=req.pool, normalize=req.normalize, dtype=req.dtype) for e in encodings]
    return encode_safetensors(model, encodings, tensors) if safetensors else encode_json(model, encodings, tensors,
                                                                                          tokens)


def embeddings_json(model: str, encodings: list[ImageEncoding], encoding_format: str, tokens: int) -> bytes:
    """OpenAI's embeddings response: per image the mean of its soft tokens (``pool_rows``, float32), as JSON
    numbers (exact: each float32 is written as the shortest decimal of its float64 value) or as base64 of their
    little-endian bytes."""
    vectors = [pool_rows(e.embeddings[None])[0] for e in encodings]  # each (D,)

    def embedding(v: torch.Tensor) -> Any:
        array = v.numpy()
        if encoding_format == "base64":
            return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
        return array.tolist()

    data = [{"object": "embedding", "index": i, "embedding": embedding(v)} for i, v in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return json.dumps(body).encode()
