"""Does the whole ``encode`` pipeline keep the encoder busy? One process, same model, same batch size:

(a) encode only: ``Gemma3Vision.encode_pixels`` over already-preprocessed batches, images/s;
(b) the pipeline: ``pipeline.run_job`` over a folder of generated JPEG/PNG files, built exactly as the ``encode``
    CLI builds it (``discover``, ``job.encode_batch_for``, ``job.make_input_for``, ``job.job_key``), writing
    ``.npy`` files and ``index.jsonl`` into a fresh temporary folder, images/s from the wall time of the call.

The two are timed in alternation after a warm-up; the ratio is median(b) / median(a). Issue 4's target is 90%.
It also times each stage alone on one thread (hash, decode, preprocess, encode, save), so a ratio below target
can be read against what the stages cost.

``--write-only`` times the job's writers alone instead, on outputs shaped as Gemma 3 4B's soft tokens (256, 2560):
one ``.npy`` per image against safetensors shards, in float32 and float16, each through the job's own code
(``OutputFolder``, ``shards.to_out_dtype``, ``NpyFiles`` / ``ShardFiles``, one index record per image), layouts
in alternation, a fresh folder each pass. Images/s and MB/s of array bytes, against a memory copy of the same
bytes measured in the same run (memory bandwidth: a ceiling for writing into the page cache). As in the job, each
shard is synced to disk before its rename (one ``fsync`` per shard) and ``.npy`` files are not.

Examples:
    python benchmarks/pipeline_bench.py --json benchmarks/results/MACHINE/pipeline_fp32.json
    python benchmarks/pipeline_bench.py --write-only --images 128 --shard-size 64 --json benchmarks/results/MACHINE/pipeline_writes.json
    python benchmarks/pipeline_bench.py --model tiny --images 32 --repeats 2          # quick look
    python benchmarks/pipeline_bench.py --model gemma3:2 --batch 1                      # full width, 2 layers
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gemma3_vision.api import Gemma3Vision, compute_dtype_for, load, make_backend
from gemma3_vision.checkpoints.random_model import random_checkpoint
from gemma3_vision.checkpoints.weights import expected_shapes, load_model
from gemma3_vision.jobs.discovery import discover
from gemma3_vision.jobs.job import EncodeOptions, check_options, encode_batch_for, job_key, make_input_for
from gemma3_vision.jobs.output_folder import OutputFolder, content_digest, save_npy
from gemma3_vision.jobs.pipeline import run_job
from gemma3_vision.jobs.shards import Encoded, NpyFiles, ShardFiles, to_out_dtype
from gemma3_vision.model.preprocessing import decode_image, pil_to_input
from gemma3_vision.tools.bench import machine_info, result_meta

# Image sets: (name, width, height, formats cycled through the files).
IMAGE_SETS = {"640x480": (640, 480, ("JPEG", "PNG")), "2000x1500": (2000, 1500, ("JPEG",))}


# ------------------------------------------------------------------------------------------------------- inputs

def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A seeded RGB image that compresses like a photo: smooth shapes, edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    # Built at a quarter size and upscaled: smooth gradients at photo scale, cheap to make.
    h4, w4 = height // 4, width // 4
    y, x = np.mgrid[0:h4, 0:w4].astype(np.float32)  # (h4, w4)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(128 + 90 * np.sin(x * fx + phase) * np.cos(y * fy - c))
    base = np.stack(channels, -1)  # (h4, w4, 3)
    for _ in range(6):  # a few flat-coloured rectangles: hard edges for the DCT
        x0, y0 = rng.integers(0, w4 - 8), rng.integers(0, h4 - 8)
        base[y0:y0 + rng.integers(8, h4 // 2), x0:x0 + rng.integers(8, w4 // 2)] = rng.uniform(0, 255, 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)  # (H, W, 3)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_folder(root: Path, image_set: str, count: int) -> list[Path]:
    """``count`` seeded images of ``image_set`` under ``root/image_set``; the files are written once."""
    width, height, formats = IMAGE_SETS[image_set]
    folder = root / image_set
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        fmt = formats[i % len(formats)]
        path = folder / f"img{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if not path.exists():
            photo_like(width, height, seed=i).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------------------- model

def build_encoder(model: str, dtype: str, backend: str = "torch") -> Gemma3Vision:
    """``tiny``: ``random:tiny``. ``gemma3:L``: the full-width Gemma 3 tower (896 px, 4B projector) with random
    weights, truncated to its first L layers (every layer costs the same, so the depth only scales encode time).
    Weights and compute in ``dtype`` (bfloat16 computes in fp32 on a CPU without native bf16, as ``load`` does),
    on ``backend`` (``torch`` or ``openvino``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights" warnings: known and wanted here
        if model == "tiny":
            return load("random:tiny", dtype=dtype, device="cpu", backend=backend)
        name, _, layers = model.partition(":")
        if name != "gemma3" or not layers.isdigit():
            raise SystemExit(f"--model: expected 'tiny' or 'gemma3:LAYERS', got {model!r}")
        full = random_checkpoint("random")
        vision = replace(full.vision, num_hidden_layers=int(layers))
        wanted = expected_shapes(vision, full.projector)
        checkpoint = replace(full, vision=vision, tensors={k: v for k, v in full.tensors.items() if k in wanted},
                             description=f"random (first {layers} of {full.vision.num_hidden_layers} layers)")
        run_dtype, cpu = getattr(torch, dtype), torch.device("cpu")
        vision_model = load_model(checkpoint, dtype=run_dtype, device=cpu, check_finite=False)
        tower = vision_model.vision_tower  # set up as load() sets it up: bf16 computes in fp32 without native bf16
        tower.compute_dtype, tower.output_dtype = compute_dtype_for(run_dtype, cpu), run_dtype
        return Gemma3Vision(vision_model, checkpoint, run_dtype, cpu,
                            backend=make_backend(backend, vision_model, checkpoint, run_dtype, cpu))


# ------------------------------------------------------------------------------------------------------- timing

def preprocessed_batches(encoder: Gemma3Vision, paths: list[Path], batch: int) -> list[torch.Tensor]:
    """The inputs as the pipeline hands them to the model: float32 NHWC ``(B, S, S, 3)`` per batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pixels = [pil_to_input(decode_image(open(p, "rb"), str(p)), encoder.preprocess_config) for p in paths]
    return [torch.from_numpy(np.stack(pixels[i:i + batch])) for i in range(0, len(pixels), batch)]


def time_encode_only(encoder: Gemma3Vision, batches: list[torch.Tensor]) -> float:
    """Seconds to encode every batch, output copied to NumPy as ``encode_batch_for`` does."""
    start = time.perf_counter()
    for x in batches:
        encoder.encode_pixels(x).float().cpu().numpy()
    return time.perf_counter() - start


def time_pipeline(encoder: Gemma3Vision, inputs: list[str], batch: int, workers: int) -> dict[str, float]:
    """One ``run_job`` over ``inputs`` (a folder, or files) into a fresh output folder, built as the ``encode``
    CLI builds it: its wall seconds, images encoded, and the process's user and system CPU seconds."""
    options = check_options(encoder, EncodeOptions(batch_size=batch))
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-out-") as out:
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        summary = run_job(discover(inputs), Path(out), encode_batch_for(encoder, options),
                          encoder.preprocess_config, make_input=make_input_for(encoder.preprocess_config, options),
                          job_key=job_key(encoder, options), batch_size=batch, workers=workers)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    if summary.failed or summary.skipped:
        raise RuntimeError(f"pipeline run did not encode every image: {summary.line()}")
    return {"seconds": seconds, "encoded": summary.encoded, "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime}


def stage_costs(encoder: Gemma3Vision, paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each input-side stage run alone on this thread (median over the files): what
    the decode workers and the writer need per image, to read against the encoder's time per image."""
    hash_ms, decode_ms, prep_ms, save_ms = [], [], [], []
    out = np.zeros((encoder.tokens_per_image(), encoder.projector_config.text_hidden_size), np.float32)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-stage-") as tmp:
        for i, p in enumerate(paths):
            data = p.read_bytes()
            t0 = time.perf_counter()
            content_digest(io.BytesIO(data))
            t1 = time.perf_counter()
            img = decode_image(io.BytesIO(data), str(p))
            t2 = time.perf_counter()
            pil_to_input(img, encoder.preprocess_config)
            t3 = time.perf_counter()
            save_npy(Path(tmp), f"{i}.npy", out, Path(tmp) / "tmp.npy")
            t4 = time.perf_counter()
            hash_ms.append(t1 - t0)
            decode_ms.append(t2 - t1)
            prep_ms.append(t3 - t2)
            save_ms.append(t4 - t3)
    return {"hash_ms": 1e3 * statistics.median(hash_ms), "decode_ms": 1e3 * statistics.median(decode_ms),
            "preprocess_ms": 1e3 * statistics.median(prep_ms), "save_ms": 1e3 * statistics.median(save_ms)}


def bench_one(encoder: Gemma3Vision, model: str, paths: list[Path], image_set: str, batch: int, workers: int,
              repeats: int) -> dict[str, Any]:
    """Encode-only and pipeline passes over the same files, alternating; the ratio is the median over repeats of
    pipeline images/s over the encode-only images/s of the pass just before it (adjacent passes see the same
    machine, which on a shared VM drifts by tens of percent over minutes)."""
    batches = preprocessed_batches(encoder, paths, batch)
    n = len(paths)
    time_encode_only(encoder, batches[:1])  # warm-up: first-call allocations
    time_pipeline(encoder, [str(p) for p in paths[:2 * batch]], batch, workers)  # warm-up: page cache, pools
    encode_ips, runs = [], []
    for _ in range(repeats):
        encode_ips.append(n / time_encode_only(encoder, batches))
        runs.append(time_pipeline(encoder, [str(paths[0].parent)], batch, workers))
    pipeline_ips = [r["encoded"] / r["seconds"] for r in runs]
    pair_ratios = [p / e for p, e in zip(pipeline_ips, encode_ips, strict=True)]
    return {
        "model": model, "image_size": encoder.image_size, "layers": encoder.vision_config.num_hidden_layers,
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "compute_dtype": str(encoder.model.vision_tower.compute_dtype or encoder.dtype).removeprefix("torch."),
        "batch": batch, "workers": workers, "torch_threads": torch.get_num_threads(),
        "images": image_set, "files": n, "encode_only_ips": encode_ips, "pipeline_ips": pipeline_ips,
        "encode_only_median_ips": statistics.median(encode_ips), "pipeline_median_ips": statistics.median(pipeline_ips),
        "ratio": statistics.median(pair_ratios), "pair_ratios": pair_ratios,
        "ratio_of_medians": statistics.median(pipeline_ips) / statistics.median(encode_ips),
        "pipeline_cpu_ms_per_image": {"user": 1e3 * statistics.median(r["user_s"] / r["encoded"] for r in runs),
                                      "sys": 1e3 * statistics.median(r["sys_s"] / r["encoded"] for r in runs)},
        "stages": {**stage_costs(encoder, paths[:8]), "encode_ms": 1e3 / statistics.median(encode_ips)},
    }


def write_pass(root: Path, arrays: list[np.ndarray], layout: str, out_dtype: str, shard_size: int) -> float:
    """Seconds to write ``arrays`` (one per image) as the job does: cast, write, one index record each."""
    out = root / f"{layout}-{out_dtype}"
    folder = OutputFolder(out)
    try:
        files = NpyFiles(folder.dir, folder.save) if layout == "npy" else ShardFiles(folder.dir, folder.tmp,
                                                                                       shard_size)
        start = time.perf_counter()
        for i, array in enumerate(arrays):
            e = Encoded({"input": f"{i}.png", "path": f"/in/{i}.png"}, to_out_dtype({"": array}, out_dtype),
                        {"job": "bench"}, output=f"{i}.png.npy")
            for record in files.write(e):
                folder.append(record)
        for record in files.flush():
            folder.append(record)
        seconds = time.perf_counter() - start
    finally:
        folder.close()
    shutil.rmtree(out)
    return seconds


def bench_writes(images: int, shard_size: int, repeats: int, root: Path) -> dict[str, Any]:
    """Write throughput of each layout and output dtype, alternating, median over ``repeats`` passes."""
    rng = np.random.default_rng(0)
    distinct = [rng.standard_normal((256, 2560), dtype=np.float32) for _ in range(8)]  # 2.6 MB each
    arrays = [distinct[i % len(distinct)] for i in range(images)]
    variants = [("npy", "float32"), ("safetensors", "float32"), ("npy", "float16"), ("safetensors", "float16")]
    seconds: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    write_pass(root, arrays[:4], "npy", "float32", shard_size)  # warm-up
    write_pass(root, arrays[:4], "safetensors", "float32", shard_size)
    copy_gbs = []
    for _ in range(repeats):
        for v in variants:
            seconds[v].append(write_pass(root, arrays, *v, shard_size))
        copy_gbs.append(memory_copy_gbs(arrays))
    rows = []
    for (layout, out_dtype), times in seconds.items():
        t = statistics.median(times)
        mb = images * arrays[0].size * (4 if out_dtype == "float32" else 2) / 1e6
        rows.append({"layout": layout, "out_dtype": out_dtype, "images": images,
                     "shard_size": shard_size if layout == "safetensors" else None, "seconds": times,
                     "images_per_s": images / t, "mb_per_s": mb / t})
    copy = statistics.median(copy_gbs)
    for r in rows:
        r["fraction_of_memory_copy"] = r["mb_per_s"] / 1e3 / copy
    return {"memory_copy_gb_per_s": copy, "memory_copy_runs": copy_gbs, "writes": rows}


def memory_copy_gbs(arrays: list[np.ndarray]) -> float:
    """GB/s of copying the images' float32 bytes once into memory already mapped (the buffer is written once before
    the clock starts): the memory bandwidth that any write into the page cache spends at least once per byte."""
    n = arrays[0].size
    dest = np.zeros(n * len(arrays), np.float32)
    dest.fill(1.0)  # every page faulted in: the timed copy measures the copy alone
    start = time.perf_counter()
    for i, a in enumerate(arrays):
        np.copyto(dest[i * n:(i + 1) * n], a.reshape(-1))
    return dest.nbytes / (time.perf_counter() - start) / 1e9


def format_writes(result: dict[str, Any]) -> str:
    head = f"{'layout':<12} {'dtype':<8} {'images':>6} {'shard':>5} {'images/s':>9} {'MB/s':>8} {'of memcpy':>9}"
    lines = [head, "-" * len(head)]
    for r in result["writes"]:
        lines.append(f"{r['layout']:<12} {r['out_dtype']:<8} {r['images']:>6} {r['shard_size'] or '-':>5} "
                     f"{r['images_per_s']:>9.1f} {r['mb_per_s']:>8.0f} {100 * r['fraction_of_memory_copy']:>8.1f}%")
    lines.append(f"memory copy: {result['memory_copy_gb_per_s']:.2f} GB/s")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<10} {'px':>4} {'images':<10} {'batch':>5} {'encode img/s':>13} {'pipeline img/s':>15} "
            f"{'ratio':>6}   stages ms/img (1 thread): hash decode prep save | encode | pipeline CPU ms/img usr+sys")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["stages"]
        lines.append(
            f"{r['model']:<10} {r['image_size']:>4} {r['images']:<10} {r['batch']:>5} "
            f"{r['encode_only_median_ips']:>13.2f} {r['pipeline_median_ips']:>15.2f} {100 * r['ratio']:>5.1f}%   "
            f"{s['hash_ms']:.1f} {s['decode_ms']:.1f} {s['preprocess_ms']:.1f} {s['save_ms']:.1f} | {s['encode_ms']:.1f} | "
            f"{r['pipeline_cpu_ms_per_image']['user']:.1f}+{r['pipeline_cpu_ms_per_image']['sys']:.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="append", help="tiny, or gemma3:LAYERS (default: tiny and gemma3:1)")
    p.add_argument("--batch", type=int, action="append", help="default: 1 and 4")
    p.add_argument("--image-set", action="append", choices=sorted(IMAGE_SETS), help="default: both")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--workers", type=int, default=2, help="decode workers, as encode --workers")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    p.add_argument("--images", type=int, help="files per folder (default: 96 for tiny, 8 for gemma3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--files-dir", type=Path, help="where the generated images live (default: a temporary folder)")
    p.add_argument("--backend", choices=["torch", "openvino"], default="torch", help="the engine (load's backend)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--write-only", action="store_true", help="time the writers alone: .npy files against shards")
    p.add_argument("--shard-size", type=int, default=64, help="--write-only: images per shard")
    p.add_argument("--out-dir", type=Path, help="--write-only: where to write (default: a temporary folder)")
    a = p.parse_args(argv)
    if a.write_only:
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-writes-", dir=a.out_dir) as tmp:
            result = bench_writes(a.images or 128, a.shard_size, a.repeats, Path(tmp))
        print(format_writes(result))
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            meta = result_meta(torch.device("cpu"))
            meta["versions"].update(numpy=np.__version__, safetensors=_version("safetensors"))
            a.json.write_text(json.dumps({"meta": meta, **result}, indent=1) + "\n")
        return 0
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    models, batches = a.model or ["tiny", "gemma3:1"], a.batch or [1, 4]
    image_sets = a.image_set or list(IMAGE_SETS)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-files-") as tmp:
        root = a.files_dir or Path(tmp)
        for model in models:
            encoder = build_encoder(model, a.dtype, a.backend)
            count = a.images or (96 if model == "tiny" else 8)
            for image_set in image_sets:
                paths = make_folder(root / f"n{count}", image_set, count)
                for batch in batches:
                    print(f"{model} {image_set} batch {batch}: {count} files, {a.repeats} repeats", file=sys.stderr)
                    rows.append(bench_one(encoder, model, paths, image_set, batch, a.workers, a.repeats))
                    print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    print(format_table(rows))
    if a.json:
        cpu = torch.device("cpu")
        report = {"meta": result_meta(cpu), "machine": machine_info(cpu), "backend": a.backend, "results": rows}
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
