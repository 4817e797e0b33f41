"""Loading benchmark: a full-size Gemma 3 checkpoint whose shard also holds >= 4 GB of text-model tensors.

Writes ``model.safetensors`` (text tensors, then the vision tower and projector, then more text tensors) and a
``config.json`` into a temporary folder. Then, ``--repeat`` times and for each ``--dtype``, alternating: drops the file
from the page cache, loads it with ``gemma3_vision.load`` in a fresh Python process (modules imported before the
clock starts: a user's first ``load``, first-call costs included), and cold-reads exactly the vision bytes in a
fresh process prepared the same way. The read is the fastest plain one measured here: ``readinto`` a reused 4 MiB
buffer (1, 4, 8 and 64 MiB buffers and a fresh 64 MiB ``read()`` per chunk, 11 alternating cold reads each in fresh
processes, November 2026: medians 0.64, 0.58, 0.61, 0.64 and 0.66 s, ranges overlapping; a fresh buffer per
chunk costs its page faults). Both run in fresh processes, so both start about as long after the drop: on this VM a
cold read done at once after dropping the cache took 0.46 s, and the same read 2 s later 0.67 s (likely the
hypervisor's free-page reporting, which hands the freed pages back to the host, so refilling the cache later faults
them in again there). A load waits as long for its imports, so the read must too.
It reports, per dtype, the median of:

- load time against the time to read the vision bytes from a cold cache (target: <= 2x);
- which bytes of the file were read, from the page cache after loading (``mincore``): vision vs text;
- RSS after loading.

``--dtype default`` is what ``load(folder)`` picks without one (bfloat16 where the CPU runs it fast, else float32).
The folder is deleted at the end (``--keep`` keeps it, ``--reuse`` measures a kept one). Usage::

    python benchmarks/load_bench.py --dir /tmp --text-gb 4.5 --dtype bfloat16 --repeat 5 --json benchmarks/load.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import gemma3_vision as g3
from gemma3_vision.checkpoints.checkpoint import PROJECTOR, TOWER
from gemma3_vision.checkpoints.format_safetensors import read_header
from gemma3_vision.checkpoints.random_model import random_checkpoint
from gemma3_vision.tools.bench import result_meta

_CHUNK = 64 << 20  # writing the checkpoint
_READ_BUFFER = 4 << 20  # the cold read: the fastest buffer size measured, see the module docstring
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_checkpoint(folder: Path, text_bytes: int) -> Path:
    """The shard: text tensors, the tower and projector in bf16, more text tensors."""
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
    path = folder / "model.safetensors"
    noise = torch.randint(-(2**31), 2**31 - 1, (_CHUNK // 4,), dtype=torch.int32).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in order:
            begin, end = header[key]["data_offsets"]
            if key.startswith("language_model."):
                left = end - begin
                while left:
                    f.write(noise[:min(left, _CHUNK)])
                    left -= min(left, _CHUNK)
            else:
                t = source.tensors[vision_keys[key]].read().to(torch.bfloat16).contiguous()
                f.write(t.view(torch.int16).numpy().tobytes())  # numpy has no bfloat16: write the raw bits
        f.flush()
        os.fsync(f.fileno())
    return path


def byte_ranges(path: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Absolute file offsets of the vision + projector tensors and of the text tensors, from the header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    vision, text = [], []
    for name, (_, _, (begin, end)) in sorted(read_header(path).items(), key=lambda kv: kv[1][2]):
        (text if name.startswith("language_model.") else vision).append((8 + n + begin, 8 + n + end))
    return vision, text


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
    """Seconds to read ``ranges`` of ``path`` with ``readinto`` one reused buffer: the bytes off disk, no more."""
    buffer = memoryview(bytearray(_READ_BUFFER))
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for begin, end in ranges:
            f.seek(begin)
            left = end - begin
            while left:
                n = f.readinto(buffer[:min(left, _READ_BUFFER)])
                if not n:
                    raise EOFError(f"{path}: ends before byte {end}")
                left -= n
    return time.perf_counter() - t


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: Path, dtype: str) -> None:
    """One load (``dtype`` "read": one read of the vision bytes) in this fresh process; prints its figures as one
    JSON line."""
    # Module imports are start-up (benchmarks/startup_bench.py), not load: done before the clock starts.
    import gemma3_vision.api  # noqa: F401
    import gemma3_vision.checkpoints.format_gguf  # noqa: F401 - resolve() imports the format readers on demand
    import gemma3_vision.checkpoints.format_safetensors  # noqa: F401

    if dtype == "read":
        path = folder / "model.safetensors"
        print(json.dumps({"cold_read_vision_s": read_ranges(path, byte_ranges(path)[0])}))
        return
    rss0 = rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = g3.load(folder, dtype=None if dtype == "default" else dtype, device="cpu")
    load_s, load_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    weights_mb = sum(q.numel() * q.element_size() for q in encoder.model.parameters()) / 2**20
    print(json.dumps({"load_s": load_s, "load_cpu_s": load_cpu_s, "run_dtype": str(encoder.dtype).removeprefix("torch."),
                      "rss_before_mb": rss0, "rss_after_load_mb": rss_mb(), "model_weights_mb": weights_mb}))


def measure(path: Path, dtype: str, vision_ranges: list[tuple[int, int]], text_ranges: list[tuple[int, int]]
            ) -> dict[str, float | str]:
    """One cold load in a fresh process, then one cold read of the vision bytes in another."""
    drop_cache(path)
    before = resident(path, vision_ranges + text_ranges)
    run = run_child(path, dtype)
    run.update(cached_before_load_bytes=before, vision_bytes_read=resident(path, vision_ranges),
               text_bytes_read=resident(path, text_ranges))
    drop_cache(path)
    run.update(run_child(path, "read"))
    run["load_over_read"] = run["load_s"] / run["cold_read_vision_s"]
    return run


def run_child(path: Path, dtype: str) -> dict[str, float | str]:
    out = subprocess.run([sys.executable, __file__, "--child", str(path.parent), "--dtype", dtype],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--text-gb", type=float, default=4.5)
    p.add_argument("--dtype", action="append", help="bfloat16 (the stored dtype), float32, float16 or default; "
                   "repeatable (default: bfloat16)")
    p.add_argument("--repeat", type=int, default=5, help="loads per dtype; medians are reported")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--reuse", type=Path, help="a folder kept by an earlier --keep run")
    p.add_argument("--json")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    dtypes = a.dtype or ["bfloat16"]
    if a.child:
        child(a.child, dtypes[0])
        return 0
    folder = a.reuse or Path(tempfile.mkdtemp(prefix="g3-load-bench-", dir=a.dir))
    try:
        path = folder / "model.safetensors"
        if not a.reuse:
            t = time.perf_counter()
            write_checkpoint(folder, int(a.text_gb * 1e9))
            print(f"wrote {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        vision_ranges, text_ranges = byte_ranges(path)
        vision_bytes = sum(e - b for b, e in vision_ranges)
        text_bytes = sum(e - b for b, e in text_ranges)
        print(f"{path.stat().st_size / 1e9:.2f} GB file: vision+projector {vision_bytes / 1e9:.3f} GB (bf16), "
              f"text {text_bytes / 1e9:.2f} GB")
        runs: dict[str, list[dict[str, float | str]]] = {d: [] for d in dtypes}
        for i in range(a.repeat):
            for dtype in dtypes:  # alternating, so drift on a noisy machine hits every dtype alike
                run = measure(path, dtype, vision_ranges, text_ranges)
                runs[dtype].append(run)
                print(f"  run {i + 1} {dtype} ({run['run_dtype']}): load {run['load_s']:.2f} s "
                      f"({run['load_cpu_s']:.2f} s CPU), cold read "
                      f"{run['cold_read_vision_s']:.2f} s: {run['load_over_read']:.2f}x", file=sys.stderr)
        result: dict[str, object] = {
            "meta": result_meta(torch.device("cpu")),
            "file_gb": path.stat().st_size / 1e9, "vision_gb": vision_bytes / 1e9, "text_gb": text_bytes / 1e9,
            "stored_dtype": "bfloat16", "repeat": a.repeat, "cpus": os.cpu_count(), "torch": torch.__version__,
            "cold_read": f"readinto a reused {_READ_BUFFER >> 20} MiB buffer, fresh process after the load's imports",
        }
        for dtype, rs in runs.items():
            med = {k: statistics.median(float(r[k]) for r in rs)
                   for k in ("load_s", "load_cpu_s", "cold_read_vision_s", "load_over_read", "vision_bytes_read",
                             "text_bytes_read", "rss_before_mb", "rss_after_load_mb")}
            result[dtype] = {"run_dtype": rs[0]["run_dtype"], "model_weights_mb": rs[0]["model_weights_mb"],
                             **{f"{k}_median": v for k, v in med.items()},
                             "load_over_read_min": min(float(r["load_over_read"]) for r in rs),
                             "load_over_read_max": max(float(r["load_over_read"]) for r in rs), "runs": rs}
            print(f"{dtype} ({rs[0]['run_dtype']}), median of {len(rs)}: load {med['load_s']:.2f} s "
                  f"({med['load_cpu_s']:.2f} s CPU) vs cold read "
                  f"of the vision bytes {med['cold_read_vision_s']:.2f} s; load/read {med['load_over_read']:.2f}x "
                  f"(target <= 2x; per-run median)")
            print(f"  read from the file: vision {med['vision_bytes_read'] / 1e9:.3f} of {vision_bytes / 1e9:.3f} GB, "
                  f"text {med['text_bytes_read'] / 1e6:.1f} MB of {text_bytes / 1e9:.2f} GB; RSS "
                  f"{med['rss_before_mb']:.0f} -> {med['rss_after_load_mb']:.0f} MB (weights "
                  f"{rs[0]['model_weights_mb']:.0f} MB)")
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
    finally:
        if not (a.keep or a.reuse):
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
