"""Does ``gemma3-vision serve`` keep its model as busy as in-process ``encode``? One run, same model, same images:

(a) the service: ``gemma3-vision serve`` started as a subprocess on 127.0.0.1, driven by N concurrent async
    clients (aiohttp, the lighter client on a machine the server shares), each sending one image per
    ``POST /v1/encode`` (JSON, base64; request bodies made before the round) and waiting for the answer before the next
    (closed loop). A round stops by itself after ``--requests`` requests or ``--seconds`` seconds, whichever
    comes first. Each image is sent once in the whole run, so the server's cache never answers;
(b) in process: ``Gemma3Vision.encode`` of the same images' bytes (decode, preprocessing and the model, as the
    server does them) at the server's ``--max-batch-size``, in this process.

The two alternate, service then in-process, for ``--rounds`` rounds per client count, after a warm-up of each.
The ratio is the median over rounds of (a)'s images/s over (b)'s of the same round. Latency percentiles come from
the clients' clocks (total) and the server's ``Server-Timing`` header (``queue``: waiting for a batch to start;
``compute``: the batch's model time); the batch sizes from ``/metrics``.

The full-width tower costs 15-30 s an image on 2 CPU cores, so ``--layers L`` cuts it to its first L encoder layers
(every layer costs the same; what is measured is the service's overhead next to the model): the tower is written
once, truncated, as a Hugging Face folder in a temporary folder, and both sides load that folder.

Examples (the figures in docs/serving.md):
    flock -x /work/cpu.lock python benchmarks/serve_bench.py --model random --layers 1 --dtype bfloat16 \\
        --clients 8 32 --max-batch-size 8 --requests 32 --seconds 120 --image-size 640x480 \\
        --json benchmarks/results/zen4-2vcpu/serve_gemma3_1layer_bf16.json
    flock -x /work/cpu.lock python benchmarks/serve_bench.py --model random:tiny --clients 8 32 --requests 400 \\
        --seconds 6 --image-size 128x96 --profile /tmp/prof --json benchmarks/results/zen4-2vcpu/serve_tiny.json
"""

# ruff: noqa: E402  (an environment variable is set before torch is imported)
from __future__ import annotations

import os

# torch's OpenMP threads in this process as `gemma3-vision serve` sets them (before torch loads): sleeping between
# forward passes, so in-process encode and the service run the model alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import base64
import contextlib
import importlib.metadata
import io
import json
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import torch

from gemma3_vision.api import Gemma3Vision, load
from gemma3_vision.checkpoints.convert import convert
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.checkpoints.weights import expected_shapes
from gemma3_vision.tools.bench import result_meta

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_bench import photo_like  # (a sibling script: the same photo-like test images)

_READY_TIMEOUT_S = 300.0  # a truncated full-width tower loads in seconds; Python and torch imports take a few
_STOP_TIMEOUT_S = 60.0
_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")  # one Server-Timing metric: name;dur=milliseconds


# ------------------------------------------------------------------------------------------------------- inputs

def image_bytes(count: int, width: int, height: int, first_seed: int) -> list[bytes]:
    """``count`` distinct photo-like JPEGs (quality 90): what a client would upload."""
    out = []
    for seed in range(first_seed, first_seed + count):
        buffer = io.BytesIO()
        photo_like(width, height, seed).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# -------------------------------------------------------------------------------------------------------- model

def cut_model(model: str, layers: int, folder: Path) -> Path:
    """``model`` truncated to its first ``layers`` encoder layers, written as a Hugging Face folder under
    ``folder`` (float32 as stored: both sides cast it to ``--dtype`` when they load it)."""
    full = resolve(model)
    if not 1 <= layers <= full.vision.num_hidden_layers:
        raise SystemExit(f"--layers must be in 1..{full.vision.num_hidden_layers}, got {layers}")
    vision = replace(full.vision, num_hidden_layers=layers)
    wanted = expected_shapes(vision, full.projector)
    cut = replace(full, vision=vision, tensors={k: v for k, v in full.tensors.items() if k in wanted},
                  description=f"{full.description} (first {layers} of {full.vision.num_hidden_layers} layers)")
    return convert(cut, folder / f"cut-{layers}-layers", "hf")


# ------------------------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], log: Path) -> Iterator[tuple[str, int]]:
    """``command`` (a ``gemma3-vision serve`` with ``--port``) started in its own process group; yields its base URL
    and pid once ``/ready`` answers 200, and stops it with SIGTERM (SIGKILL after a bound) on the way out."""
    port = command[command.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}) before it was ready:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready within {_READY_TIMEOUT_S:g} s; see {log}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) and its live child processes, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
            if int(stat.parent.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


# --------------------------------------------------------------------------------------------------------- load

@dataclass
class Sample:
    """One request as a client saw it: wall seconds and the server's Server-Timing figures (ms)."""

    status: int
    seconds: float
    timing: dict[str, float] = field(default_factory=dict)


def request_body(image: bytes) -> bytes:
    """One image as ``POST /v1/encode``'s JSON body; the projected soft tokens come back as a float32 .npy."""
    return json.dumps({"images": [base64.b64encode(image).decode()], "dtype": "float32"}).encode()


async def drive(url: str, bodies: list[bytes], clients: int, seconds: float) -> tuple[list[Sample], float]:
    """``clients`` closed-loop clients sharing ``bodies`` (each sent once), until the bodies or ``seconds`` run
    out; returns the samples and the wall seconds from the first request sent to the last answer."""
    pending = iter(bodies)
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + seconds
    headers = {"Content-Type": "application/json"}

    async def client(http: aiohttp.ClientSession) -> None:
        for body in pending:  # the shared iterator: each body goes to exactly one client
            if time.perf_counter() > deadline:
                return
            sent = time.perf_counter()
            async with http.post(f"{url}/v1/encode", data=body, headers=headers) as response:
                await response.read()
                timing = {m: float(v) for m, v in _TIMING.findall(response.headers.get("Server-Timing", ""))}
                samples.append(Sample(response.status, time.perf_counter() - sent, timing))

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=seconds + 600)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return samples, time.perf_counter() - start


def batch_sizes(url: str) -> tuple[float, float]:
    """The server's batch-size histogram as (sum of sizes, batches) so far, from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.type == "histogram" and "batch_size" in family.name:
            for s in family.samples:
                if s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
    return total, count


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    q = np.percentile(np.asarray(values), [50, 95, 99])
    return {"p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2])}


def service_round(url: str, pid: int, images: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """One round of load: images/s, latencies, mean batch, and the CPU time the server and the clients spent."""
    sizes_before = batch_sizes(url)
    bodies = [request_body(image) for image in images]
    cpu_before, server_before = time.process_time(), tree_cpu_seconds(pid)
    samples, wall = asyncio.run(drive(url, bodies, clients, seconds))
    client_cpu, server_cpu = time.process_time() - cpu_before, tree_cpu_seconds(pid) - server_before
    sizes_after = batch_sizes(url)
    ok = [s for s in samples if s.status == 200]
    batches = sizes_after[1] - sizes_before[1]
    return {
        "requests": len(samples), "ok": len(ok), "statuses": sorted({s.status for s in samples}),
        "seconds": wall, "images_per_s": len(ok) / wall,
        "mean_batch": (sizes_after[0] - sizes_before[0]) / batches if batches else None,
        "client_cpu_ms_per_request": 1e3 * client_cpu / max(1, len(samples)),
        "server_cpu_ms_per_request": 1e3 * server_cpu / max(1, len(samples)),
        "latency_ms": {"total": percentiles([1e3 * s.seconds for s in ok]),
                       "queue": percentiles([s.timing["queue"] for s in ok if "queue" in s.timing]),
                       "compute": percentiles([s.timing["compute"] for s in ok if "compute" in s.timing])},
    }


def in_process_round(encoder: Gemma3Vision, images: list[bytes], batch: int) -> dict[str, Any]:
    """``encode`` of the images' bytes, as the service got them, output copied to NumPy as the service does."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        encoder.encode(images[i:i + batch], batch_size=batch).float().numpy()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds,
            "cpu_ms_per_image": 1e3 * cpu / len(images)}


# -------------------------------------------------------------------------------------------------------- main

def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("gemma3-vision", "fastapi", "starlette", "uvicorn", "aiohttp", "prometheus_client", "pillow",
                 "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           check=True, cwd=Path(__file__).parent).stdout.strip()
    return out


def serve_command(model: str, args: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, "-m", "gemma3_vision", "serve", "--model", model, "--port", str(port),
            "--dtype", args.dtype, "--device", "cpu", "--max-batch-size", str(args.max_batch_size),
            "--max-wait-ms", str(args.max_wait_ms), *args.serve_arg]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny", help="any model `encode` takes (default random:tiny)")
    p.add_argument("--layers", type=int, help="cut the tower to its first L encoder layers (named in the output)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="concurrent clients, one count a row")
    p.add_argument("--max-batch-size", type=int, default=8, help="the server's, and in-process encode's batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's batching window")
    p.add_argument("--requests", type=int, default=600, help="requests per round at most")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per round at most")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", default="640x480", help="WxH of the uploaded JPEGs")
    p.add_argument("--serve-arg", action="append", default=[], help="one more argument for the server")
    p.add_argument("--profile", type=Path, help="also record the server with py-spy during one more round, here")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    width, height = map(int, args.image_size.split("x"))

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        model, name = args.model, args.model
        if args.layers is not None:
            model = str(cut_model(args.model, args.layers, Path(tmp)))
            name = f"{args.model} cut to its first {args.layers} encoder layers"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: known and wanted here
            encoder = load(model, dtype=args.dtype, device="cpu")
        vision = encoder.vision_config
        per_round = args.requests
        # Each round's service requests and as many in-process images, the warm-ups, and the profiled round.
        total = (2 * per_round * args.rounds + 2 * args.max_batch_size) * len(args.clients) + per_round
        print(f"making {total} distinct {args.image_size} JPEGs", file=sys.stderr)
        pool = iter(image_bytes(total, width, height, first_seed=0))

        def take(n: int) -> list[bytes]:
            return [next(pool) for _ in range(n)]

        command = serve_command(model, args, free_port())
        rows = []
        with running_server(command, Path(tmp) / "server.log") as (url, pid):
            for clients in args.clients:
                print(f"{clients} clients: warm-up", file=sys.stderr)
                service_round(url, pid, take(args.max_batch_size), clients, args.seconds)
                in_process_round(encoder, take(args.max_batch_size), args.max_batch_size)
                rounds = []
                for r in range(args.rounds):
                    served = service_round(url, pid, take(per_round), clients, args.seconds)
                    # The same number of images the service answered, fresh ones (equal cost: same size, same kind).
                    local = in_process_round(encoder, take(served["ok"]), args.max_batch_size)
                    rounds.append({"service": served, "in_process": local,
                                   "ratio": served["images_per_s"] / local["images_per_s"]})
                    print(f"{clients} clients, round {r + 1}: service {served['images_per_s']:.2f} img/s "
                          f"(mean batch {served['mean_batch'] or 0:.1f}), in-process {local['images_per_s']:.2f} "
                          f"img/s, ratio {rounds[-1]['ratio']:.3f}", file=sys.stderr)
                rows.append({"clients": clients, "rounds": rounds,
                             "ratio_median": statistics.median(r["ratio"] for r in rounds),
                             "service_images_per_s_median": statistics.median(
                                 r["service"]["images_per_s"] for r in rounds),
                             "in_process_images_per_s_median": statistics.median(
                                 r["in_process"]["images_per_s"] for r in rounds)})
            profile = (record_profile(url, pid, take(per_round), args.clients[0], args.seconds, args.profile)
                       if args.profile else None)
        result = {
            "meta": result_meta(torch.device("cpu")), "benchmark": "serve_bench",
            "server_command": shlex.join(command), "serving_versions": versions(), "model": name,
            "tower": {"image_size": vision.image_size, "hidden_size": vision.hidden_size,
                      "layers": vision.num_hidden_layers},
            "dtype": args.dtype, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
            "image": f"{args.image_size} JPEG q90", "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows,
            "profile": profile,
        }
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


# Where a sample's time goes: the category of the innermost frame of its stack that names one, so a sample in torch
# under the tower is "model", one in PIL under the app's decode "decode", one in the app's own code "service".
_CATEGORIES = [
    ("model", ("encode_pixels", "encode_views", "/model/tower.py", "/model/projector.py", "/backends/")),
    ("decode + preprocess", ("PIL/", "/model/preprocessing.py", "/model/pan_and_scan.py")),
    ("response encoding", ("safetensors", "numpy/lib/format.py", "/json/", "orjson", "base64")),
    ("HTTP + ASGI", ("uvicorn/", "h11/", "httptools", "starlette/", "fastapi/", "pydantic", "anyio/",
                     "multipart")),
    ("metrics", ("prometheus_client/",)),
    ("event loop", ("asyncio/",)),
    ("service", ("gemma3_vision/serve/",)),
]
# Innermost frames of threads blocked in C (a pool's idle worker, the event loop in select, the model worker's
# wait): py-spy's idle check does not always see them, so they are counted apart, as "waiting".
_WAITING = ("_worker (concurrent/futures/thread.py", "Runner.run (asyncio/runners.py", "wait (threading.py",
            "select (selectors.py")


def record_profile(url: str, pid: int, images: list[bytes], clients: int, seconds: float,
                   folder: Path) -> dict[str, Any]:
    """One more round with py-spy sampling every thread of the server (100 Hz, idle threads left out): the raw
    stacks (collapsed, one stack a line: flamegraph.pl and speedscope read them), and the samples' shares by
    category (``_CATEGORIES``) and by innermost frame."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "server.pyspy.txt"
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
                            "--output", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    served = service_round(url, pid, images, clients, seconds)
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    _, err = spy.communicate(timeout=60)
    if not raw.exists():
        raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
    by_category: dict[str, int] = {}
    by_frame: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        category = "waiting" if frames[-1].startswith(_WAITING) else next(
            (name for frame in reversed(frames) for name, marks in _CATEGORIES if any(m in frame for m in marks)),
            "other")
        by_category[category] = by_category.get(category, 0) + n
        by_frame[frames[-1]] = by_frame.get(frames[-1], 0) + n
    total = sum(by_category.values()) or 1
    top = sorted(by_frame.items(), key=lambda kv: -kv[1])[:15]
    return {"round": served, "samples": total, "stacks_file": str(raw),
            "share_by_category": {k: v / total for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_innermost_frames": [{"frame": f, "share": n / total} for f, n in top]}


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} ({result['tower']['layers']} layers, {result['tower']['image_size']} px, width "
             f"{result['tower']['hidden_size']}), {result['dtype']}, batch {result['max_batch_size']}, "
             f"{result['meta']['machine']['cpu']}",
             f"{'clients':>7} {'service img/s':>13} {'in-proc img/s':>13} {'ratio':>6} "
             f"{'total p50/p95/p99 ms':>22} {'queue p50/p95/p99':>20} {'compute p50/p95/p99':>21}"]

    def trio(d: dict[str, float | None]) -> str:
        return "/".join("-" if v is None else f"{v:.0f}" for v in d.values())

    for row in result["rows"]:
        last = row["rounds"][len(row["rounds"]) // 2]["service"]["latency_ms"]  # the middle round's latencies
        lines.append(f"{row['clients']:>7} {row['service_images_per_s_median']:>13.2f} "
                     f"{row['in_process_images_per_s_median']:>13.2f} {row['ratio_median']:>6.3f} "
                     f"{trio(last['total']):>22} {trio(last['queue']):>20} {trio(last['compute']):>21}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
