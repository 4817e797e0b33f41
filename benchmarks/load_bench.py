"""Loading benchmark: a full-size Gemma 3 checkpoint whose shard also holds >= 4 GB of text-model tensors.

Writes ``model.safetensors`` (text tensors, then the vision tower and projector, then more text tensors) and a
``config.json`` into a temporary folder, drops the file from the page cache, loads it with ``gemma3_vision.load``
and reports:

- which bytes of the file were read, from the page cache afterwards (``mincore``): vision vs text;
- load time against the time to read exactly the vision bytes from a cold cache (target: <= 2x);
- RSS after loading.

The folder is deleted at the end (``--keep`` keeps it). Usage::

    python benchmarks/load_bench.py --dir /tmp --text-gb 4.5 --dtype bfloat16 --json benchmarks/load.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import gemma3_vision as g3
from gemma3_vision.checkpoint import PROJECTOR, TOWER
from gemma3_vision.random_model import random_checkpoint

_CHUNK = 64 << 20
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_checkpoint(folder: Path, text_bytes: int) -> tuple[Path, list[tuple[int, int]], list[tuple[int, int]]]:
    """The shard and its byte ranges (absolute file offsets): vision + projector ranges, text ranges."""
    vision, projector = g3.PRESETS["gemma3-4b"]
    config = {
        "model_type": "gemma3", "mm_tokens_per_image": 256,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                          "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "layer_norm_eps": 1e-6, "vision_use_head": False},
        "text_config": {"hidden_size": projector.text_hidden_size},
    }
    (folder / "config.json").write_text(json.dumps(config))
    source = random_checkpoint("random")
    hub_name = {TOWER: "vision_tower.vision_model.", PROJECTOR: "multi_modal_projector."}
    vision_keys = {}
    for name in source.tensors:
        root = TOWER if name.startswith(TOWER) else PROJECTOR
        vision_keys[hub_name[root] + name[len(root):]] = name
    n_text = max(2, -(-text_bytes // (512 << 20)))
    text_shape = (16384, 16384)  # 512 MiB of bf16 each
    half = n_text // 2
    order = ([f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(half)] + sorted(vision_keys)
             + [f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(half, n_text)])
    header, offset = {}, 0
    for key in order:
        shape = text_shape if key.startswith("language_model.") else source.tensors[vision_keys[key]].shape
        size = 2
        for d in shape:
            size *= d
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    path = folder / "model.safetensors"
    noise = torch.randint(-(2**31), 2**31 - 1, (_CHUNK // 4,), dtype=torch.int32).numpy().tobytes()
    vision_ranges, text_ranges = [], []
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in order:
            begin, end = header[key]["data_offsets"]
            if key.startswith("language_model."):
                left = end - begin
                while left:
                    f.write(noise[:min(left, _CHUNK)])
                    left -= min(left, _CHUNK)
                text_ranges.append((base + begin, base + end))
            else:
                t = source.tensors[vision_keys[key]].read().to(torch.bfloat16).contiguous()
                f.write(t.view(torch.int16).numpy().tobytes())  # numpy has no bfloat16: write the raw bits
                vision_ranges.append((base + begin, base + end))
        f.flush()
        os.fsync(f.fileno())
    return path, vision_ranges, text_ranges


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path, ranges: list[tuple[int, int]]) -> int:
    """Bytes of ``ranges`` now in the page cache (whole pages), via mmap + mincore."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        pages = -(-size // PAGE)
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        _libc.munmap(addr, size)
    finally:
        os.close(fd)
    flags = vec.raw
    total = 0
    for begin, end in ranges:
        total += sum(b & 1 for b in flags[begin // PAGE:-(-end // PAGE)]) * PAGE
    return total


def read_ranges(path: Path, ranges: list[tuple[int, int]]) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for begin, end in ranges:
            f.seek(begin)
            left = end - begin
            while left:
                left -= len(f.read(min(left, _CHUNK)))
    return time.perf_counter() - t


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--text-gb", type=float, default=4.5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="g3-load-bench-", dir=a.dir))
    try:
        t = time.perf_counter()
        path, vision_ranges, text_ranges = write_checkpoint(folder, int(a.text_gb * 1e9))
        write_s = time.perf_counter() - t
        vision_bytes = sum(e - b for b, e in vision_ranges)
        text_bytes = sum(e - b for b, e in text_ranges)
        print(f"wrote {path.stat().st_size / 1e9:.2f} GB in {write_s:.0f} s: vision+projector "
              f"{vision_bytes / 1e9:.3f} GB, text {text_bytes / 1e9:.2f} GB", file=sys.stderr)

        drop_cache(path)
        before = resident(path, vision_ranges + text_ranges)
        rss0 = rss_mb()
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = g3.load(folder, dtype=a.dtype, device="cpu")
        load_s = time.perf_counter() - t
        rss1 = rss_mb()
        read_vision, read_text = resident(path, vision_ranges), resident(path, text_ranges)
        weights_mb = sum(q.numel() * q.element_size() for q in encoder.model.parameters()) / 2**20
        del encoder

        drop_cache(path)
        cold_read_s = read_ranges(path, vision_ranges)
        result = {
            "file_gb": path.stat().st_size / 1e9, "vision_gb": vision_bytes / 1e9, "text_gb": text_bytes / 1e9,
            "dtype": a.dtype, "cached_before_load_bytes": before, "vision_bytes_read": read_vision,
            "text_bytes_read": read_text, "load_s": load_s, "cold_read_vision_s": cold_read_s,
            "load_over_read": load_s / cold_read_s, "rss_before_mb": rss0, "rss_after_load_mb": rss1,
            "model_weights_mb": weights_mb,
        }
        print(f"load {load_s:.2f} s vs cold read of the vision bytes {cold_read_s:.2f} s: "
              f"{load_s / cold_read_s:.2f}x (target <= 2x)")
        print(f"read from the file: vision {read_vision / 1e9:.3f} of {vision_bytes / 1e9:.3f} GB, "
              f"text {read_text / 1e6:.1f} MB of {text_bytes / 1e9:.2f} GB")
        print(f"RSS {rss0:.0f} -> {rss1:.0f} MB (model weights {weights_mb:.0f} MB in {a.dtype})")
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
