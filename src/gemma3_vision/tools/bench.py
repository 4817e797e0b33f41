"""Side-by-side benchmark: our tower against transformers' ``SiglipVisionModel``, same weights, one process.

Each configuration (dtype, batch, threads, device) loads seeded random weights once, builds the runners (ours,
transformers, and each under ``torch.compile`` on request), warms each up (the first call's extra time is reported as
compile time), then times them in alternation so that a noisy machine hurts all of them alike. Timers are read after
a device sync. Results are seconds per image (median and spread), achieved TFLOP/s against a GEMM peak measured on
the spot, peak memory, and how far each output is from ours.

``--layers`` truncates the depth (the 27 layers are identical in cost, so per-layer figures carry over) and
``--image-size`` changes the input; both are labelled in the report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend

from ..errors import OptionError
from ..model import cpu_kernels
from ..model.config import PRESETS, VisionConfig

if TYPE_CHECKING:
    from ..model.tower import VisionTower

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# --attention NAME: the tower settings of runner "ours[NAME]". sdpa and blocked are our two attention paths (the
# default picks one per device and dtype); flash, efficient, cudnn and math are SDPA allowed that one kernel.
ATTENTION_VARIANTS: dict[str, dict[str, Any]] = {
    "sdpa": {"attention": "sdpa"},
    "blocked": {"attention": "blocked"},
    **{name: {"attention": "sdpa", "attention_backends": (kernel,)} for name, kernel in SDPA_KERNELS.items()},
}

# Every runner a run can have; ``runners=`` picks among them (``ours`` still runs once, untimed, as the reference).
RUNNERS = ("ours", "ours+compile", "transformers", "transformers+compile", "ours[openvino]", "openvino[transformers]",
           "ours[bf16 residual]", *(f"ours[{name}]" for name in ATTENTION_VARIANTS))


@dataclass
class RunnerResult:
    """One implementation in one configuration."""

    name: str  # "ours", "ours+compile", "transformers", "transformers+compile"; "ours[cudnn]": an attention variant
    seconds_per_image: list[float]  # every timed run, divided by the batch
    median_s: float
    min_s: float
    max_s: float
    compile_s: float | None  # first call minus the median call: compilation (and first-touch) cost
    tflops: float  # achieved, at the median
    peak_fraction: float  # tflops / the GEMM peak measured for this configuration
    peak_memory_mb: float  # peak RSS (CPU) or peak allocated GPU memory during this runner's timed calls
    max_abs_diff: float | None  # against ours (plain), None for ours itself
    cosine: float | None
    note: str = ""


@dataclass
class ConfigResult:
    dtype: str
    compute_dtype: str  # what our matmuls ran in (float32 for bf16 weights on a CPU without native bf16)
    batch: int
    threads: int
    device: str
    image_size: int
    layers: int  # encoder layers run
    full_layers: int  # the preset's depth (27 for Gemma 3): fewer layers run means a truncated tower
    gflop_per_image: float
    gemm_peak_tflops: float  # best GEMM rate measured before and after the runs: dtype and fp32, the fc1 shape (and 8192³ on a GPU), torch.mm or oneDNN
    compile_mode: str = "default"  # torch.compile's mode for the +compile runners
    runners: list[RunnerResult] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # "vs transformers": their median / ours, ...


@dataclass
class BenchReport:
    machine: dict[str, Any]
    configs: list[ConfigResult]
    memory: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # result_meta(): machine, versions, command line

    def to_json(self) -> str:
        report = asdict(self)
        return json.dumps({"meta": report.pop("meta"), **report}, indent=2)


def gflop_per_image(vision: VisionConfig) -> float:
    """Matmul work of one image: the linears and the two attention products (softmax, norms, GELU left out)."""
    N, D, M, L = vision.num_patches, vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    patch = 2 * N * vision.num_channels * vision.patch_size**2 * D
    linear = 2 * N * D * (3 * D + D + 2 * M)  # qkv, out_proj, fc1, fc2
    attention = 2 * 2 * N * N * D  # q·kᵀ and a·v over all heads
    return (patch + L * (linear + attention)) / 1e9


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo's, else lscpu's (ARM's cpuinfo has none), else what platform knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    from ..api import cpu_has_fast_bf16, cpu_has_fast_fp16

    info: dict[str, Any] = {
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_fast_bf16(), "native_fp16": cpu_has_fast_fp16(), "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        info["openvino"] = openvino.get_version()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict[str, str | None]:
    """The versions a result depends on: Python, torch, transformers, the optional engines (``None`` where not
    installed), gemma3-vision, and the commit of the checkout it runs from (``+dirty`` with uncommitted changes)."""
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "openvino", "mlx", "gemma3-vision"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    found["gemma3-vision commit"] = _checkout_commit()
    return found


def _checkout_commit() -> str | None:
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        status = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None  # an installed copy, not a checkout
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this process was started, as a shell line: ``gemma3-vision bench ...``, ``python -m gemma3_vision
    bench ...`` or ``python benchmarks/load_bench.py ...``."""
    program, *args = sys.argv if argv is None else argv
    path = Path(program)
    if program == "-c":
        start = "python -c"
    elif path.name == "__main__.py":
        start = f"python -m {path.parent.name}"
    elif path.suffix == ".py":
        start = f"python {program}"
    else:  # a console script: its name, not the venv it lives in
        start = path.name
    return " ".join([start, *map(shlex.quote, args)])


def result_meta(device: torch.device) -> dict[str, Any]:
    """What every result file records first: the machine, the versions and the command line that made it."""
    m = machine_info(device)
    gpu = m.get("gpu") or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return {
        "machine": {"cpu": m["cpu"], "logical_cpus": m["logical_cpus"], "cpu_capability": m["cpu_capability"],
                    "native_bf16": m["native_bf16"], "native_fp16": m["native_fp16"], "gpu": gpu,
                    "platform": platform.platform()},
        "versions": versions(),
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def gemm_tflops(dtype: torch.dtype, device: torch.device, m: int = 2048, k: int = 1152, n: int = 4304,
                repeats: int = 3) -> float:
    """Best-of-``repeats`` rate of one ``(m, k) @ (k, n)`` product (the tower's fc1 shape): ``torch.mm`` into a reused
    buffer and, on a CPU, oneDNN's product as the tower calls it, whichever is faster (MKL, behind ``torch.mm`` in
    float32, runs half as fast as oneDNN on an AMD CPU)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    products = [lambda: torch.mm(a, b.t(), out=out)]
    if device.type == "cpu" and cpu_kernels.onednn_runs(dtype):
        products.append(lambda: cpu_kernels.matmul_transposed(a, b))
    iters = 20 if device.type == "cuda" else 1
    best = float("inf")
    for product in products:
        for _ in range(repeats + 1):  # the first is a warm-up
            _sync(device)
            t = time.perf_counter()
            for _ in range(iters):
                product()
            _sync(device)
            best = min(best, (time.perf_counter() - t) / iters)
    return 2 * m * k * n / best / 1e12


class _PeakMemory:
    """Peak RSS (Linux: VmHWM, reset through /proc/self/clear_refs) or peak allocated CUDA memory, in MB."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _proc_status_kb("VmHWM") / 1024


def _proc_status_kb(key: str) -> float:
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux; no reset: an upper bound


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def random_tower_state(preset: str, layers: int) -> dict[str, torch.Tensor]:
    """Seeded random tower weights of ``random:<preset>`` (fp32), keeping the first ``layers`` layers."""
    from ..checkpoints.checkpoint import TOWER
    from ..checkpoints.random_model import random_checkpoint

    state = {}
    for name, source in random_checkpoint(f"random:{preset}").tensors.items():
        if not name.startswith(TOWER):
            continue
        key = name[len(TOWER):]
        if key.startswith("encoder.layers.") and int(key.split(".")[2]) >= layers:
            continue
        state[key] = source.read().clone()  # random weights are views of shared pools: each runner gets its own
    return state


def build_ours(vision: VisionConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
               device: torch.device) -> VisionTower:
    """Our tower as ``load()`` sets it up for ``device``, compute dtype included."""
    from ..api import compute_dtype_for
    from ..model.tower import VisionTower

    with torch.device("meta"):
        tower = VisionTower(vision)
    tower.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    tower.compute_dtype = compute_dtype_for(dtype, device)
    return tower.eval().requires_grad_(False)


def _variant(tower: VisionTower, pixels: torch.Tensor, **settings: Any) -> Callable[[], torch.Tensor]:
    """A runner of ``tower`` with some attributes changed for the call (``attention``, ``residual_dtype``, ...)."""
    def run() -> torch.Tensor:
        saved = {name: getattr(tower, name) for name in settings}
        for name, value in settings.items():
            setattr(tower, name, value)
        try:
            return tower(pixels)
        finally:
            for name, value in saved.items():
                setattr(tower, name, value)
    return run


def build_transformers(vision: VisionConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                       device: torch.device) -> torch.nn.Module | None:
    try:
        import transformers
    except ImportError:
        return None
    config = transformers.SiglipVisionConfig(
        hidden_size=vision.hidden_size, image_size=vision.image_size, intermediate_size=vision.intermediate_size,
        num_attention_heads=vision.num_attention_heads, num_hidden_layers=vision.num_hidden_layers,
        patch_size=vision.patch_size, layer_norm_eps=vision.layer_norm_eps, num_channels=vision.num_channels,
        hidden_act="gelu_pytorch_tanh", vision_use_head=False,
    )
    config._attn_implementation = "sdpa"
    model = transformers.SiglipVisionModel(config)
    model.load_state_dict(state, strict=True)  # transformers 5.x: no vision_model. prefix
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # type: ignore[call-arg]  # transformers wraps .to()


def convert_transformers_to_openvino(vision: VisionConfig, state: dict[str, torch.Tensor]) -> Any:
    """transformers' fp32 tower converted by ``ov.convert_model`` (TorchScript tracing), batch left dynamic: the
    OpenVINO model a user would make from transformers, an engine independent of our graph builder. Slow (minutes
    and 12-15 GB of RAM for the full Gemma 3 tower); its time and peak RSS are reported."""
    import openvino as ov

    built = build_transformers(vision, state, torch.float32, torch.device("cpu"))
    assert built is not None  # the caller checked that transformers is installed
    model: torch.nn.Module = built

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).last_hidden_state

    S = vision.image_size
    example = torch.zeros(1, vision.num_channels, S, S)
    with torch.no_grad():
        return ov.convert_model(LastHiddenState().eval(), example_input=example,
                                input=[(-1, vision.num_channels, S, S)])


def openvino_runners(vision: VisionConfig, ours: VisionTower, converted: Any, torch_dtype: torch.dtype,
                     pixels: torch.Tensor, pixels_nchw: torch.Tensor, threads: int) -> dict[str, Callable[[], Any]]:
    """``ours[openvino]`` (our backend, its graph built from our tower, no disk cache) and, given the converted
    transformers model, ``openvino[transformers]`` compiled with the same properties (precision, threads)."""
    import openvino as ov

    from ..backends.openvino import OpenVINOBackend, compile_config

    compute = ours.compute_dtype or torch_dtype
    backend = OpenVINOBackend(ours, None, dtype=torch_dtype, compute_dtype=compute, threads=threads)
    runners: dict[str, Callable[[], Any]] = {"ours[openvino]": lambda: backend.tower(pixels)[0]}
    if converted is not None:
        compiled: list[Any] = []  # compiled on the first call, so the warm-up times it as compile time

        def theirs() -> torch.Tensor:
            if not compiled:
                compiled.append(ov.Core().compile_model(converted, "CPU", compile_config(compute, threads)))
            return torch.from_numpy(compiled[0](pixels_nchw.float().numpy())[0].copy())

        runners["openvino[transformers]"] = theirs
    return runners


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compiled(module: torch.nn.Module, mode: str) -> Callable[..., Any]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold the weights (prepacking on CPU), as the figures did
    # max-autotune lets inductor use its own GEMM templates, into which it can fuse bias, GELU and residual adds
    return torch.compile(module, mode=mode)


def _time_runners(runners: dict[str, Callable[[], torch.Tensor]], repeats: int, batch: int,
                  device: torch.device) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float],
                                                 dict[str, torch.Tensor]]:
    """Warm each runner once (timed apart), then run them in alternation ``repeats`` times."""
    first: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name, run in list(runners.items()):
        _sync(device)
        t = time.perf_counter()
        try:
            outputs[name] = run().float().cpu()
        except RuntimeError as e:  # a single-kernel variant whose kernel does not support this device or shape
            if "[" not in name:
                raise
            print(f"{name}: cannot run here ({str(e).splitlines()[0][:200]}); left out", file=sys.stderr)
            del runners[name]
            continue
        _sync(device)
        first[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks = {name: 0.0 for name in runners}
    memory = _PeakMemory(device)
    for _ in range(repeats):
        for name, run in runners.items():
            memory.reset()
            _sync(device)
            t = time.perf_counter()
            run()
            _sync(device)
            times[name].append((time.perf_counter() - t) / batch)
            peaks[name] = max(peaks[name], memory.peak_mb())
    return times, first, peaks, outputs


def bench_config(vision: VisionConfig, state: dict[str, torch.Tensor], *, dtype: str, batch: int, threads: int,
                 device: torch.device, repeats: int, compile: bool, reference: bool, full_layers: int,
                 compile_mode: str = "default",
                 attention: Sequence[str] = (), bf16_residual: bool = False, openvino: bool = False,
                 openvino_reference: Any = None, only: Sequence[str] = (),
                 progress: Callable[[str], None] = lambda s: None) -> ConfigResult:
    """Time ours (and transformers) in one configuration.

    ``attention`` adds a runner of ours per named ``ATTENTION_VARIANTS`` entry (``ours[blocked]``, ``ours[cudnn]``);
    ``bf16_residual`` adds ours with its residual stream and LayerNorms in bf16, as transformers runs them.
    ``openvino`` adds ``ours[openvino]`` and, given ``openvino_reference`` (``convert_transformers_to_openvino``),
    ``openvino[transformers]``. ``only`` names the runners to time (default: all); ours runs once regardless, untimed
    when not named, as the reference every difference is taken from.
    """
    torch_dtype = _DTYPES[dtype]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, vision.image_size, vision.image_size, vision.num_channels, generator=g) * 2 - 1)
    pixels = pixels.to(device)  # NHWC, ours
    pixels_nchw = pixels.permute(0, 3, 1, 2).contiguous().to(torch_dtype)  # transformers'

    ours = build_ours(vision, state, torch_dtype, device)
    compute = ours.compute_dtype or torch_dtype
    runners: dict[str, Callable[[], torch.Tensor]] = {"ours": lambda: ours(pixels)}
    for name in attention:
        runners[f"ours[{name}]"] = _variant(ours, pixels, **ATTENTION_VARIANTS[name])
    if bf16_residual:
        runners["ours[bf16 residual]"] = _variant(ours, pixels, residual_dtype=torch.bfloat16)
    if openvino:
        runners.update(openvino_runners(vision, ours, openvino_reference, torch_dtype, pixels, pixels_nchw,
                                        threads))
    if compile:
        ours_c = _compiled(ours, compile_mode)
        runners["ours+compile"] = lambda: ours_c(pixels)
    theirs = build_transformers(vision, state, torch_dtype, device) if reference else None
    if reference and theirs is None:
        progress("transformers is not installed: timing ours alone (pip install 'gemma3-vision[test]' for the "
                 "reference)")
    if theirs is not None:
        runners["transformers"] = lambda: theirs(pixel_values=pixels_nchw).last_hidden_state
        if compile:
            theirs_c = _compiled(theirs, compile_mode)
            runners["transformers+compile"] = lambda: theirs_c(pixel_values=pixels_nchw).last_hidden_state

    progress(f"{dtype} batch {batch}, {threads} threads: measuring the GEMM peak")

    def fc1_peak(product_dtype: torch.dtype) -> float:
        """The fc1 product's rate, as many rows at a time as the tower runs: a GPU all of them, a CPU one MLP chunk
        (a 35 MB fp32 output would be fresh pages on every call, and oneDNN's rate fell from 0.46 to 0.37 TFLOP/s)."""
        tokens = batch * vision.num_patches
        rows = (min(tokens, 32768) if device.type == "cuda"
                else cpu_kernels.mlp_chunk(min(tokens, vision.num_patches), vision.intermediate_size,
                                           product_dtype.itemsize))
        return gemm_tflops(product_dtype, device, rows, vision.hidden_size, vision.intermediate_size)

    def measure_peak() -> float:
        return max(fc1_peak(torch_dtype), fc1_peak(torch.float32) if torch_dtype != torch.float32 else 0.0,
                   gemm_tflops(torch_dtype, device, 8192, 8192, 8192) if device.type == "cuda" else 0.0)

    peak = measure_peak()
    reference_run = runners["ours"]
    if only:
        missing = [name for name in only if name not in runners]
        if missing:
            raise OptionError(f"runner {', '.join(missing)} is not built in this run (it has {', '.join(runners)}): "
                              "add the option that builds it (--openvino, --attention, --bf16-residual, compile)")
        runners = {name: run for name, run in runners.items() if name in only}
    progress(f"{dtype} batch {batch}: warm-up and {repeats} alternating runs of {', '.join(runners)}")
    with torch.inference_mode():
        times, first, peaks, outputs = _time_runners(runners, repeats, batch, device)
        if "ours" not in outputs:
            outputs["ours"] = reference_run().float().cpu()  # untimed: the reference for the differences
    # Measured again after the runs, the higher kept: one measurement takes a second, the runs minutes, and on a
    # shared machine a slow second (0.182 against 0.211 TFLOP/s seen) would put a runner above 100% of "peak".
    peak = max(peak, measure_peak())

    gflop = gflop_per_image(vision)
    result = ConfigResult(dtype=dtype, compute_dtype=str(compute).replace("torch.", ""), batch=batch, threads=threads,
                          device=str(device), image_size=vision.image_size, layers=vision.num_hidden_layers,
                          full_layers=full_layers,
                          gflop_per_image=gflop, gemm_peak_tflops=peak,
                          compile_mode=compile_mode)
    for name, ts in times.items():
        median = statistics.median(ts)
        compile_s = first[name] - median * batch
        diff = None if name == "ours" else (outputs[name] - outputs["ours"]).abs().max().item()
        cos = None if name == "ours" else _cosine(outputs[name], outputs["ours"])
        tflops = gflop / median / 1e3
        result.runners.append(RunnerResult(
            name=name, seconds_per_image=ts, median_s=median, min_s=min(ts), max_s=max(ts),
            compile_s=compile_s if "compile" in name or "openvino" in name else None, tflops=tflops, peak_fraction=tflops / peak,
            peak_memory_mb=peaks[name], max_abs_diff=diff, cosine=cos,
        ))
    medians = {r.name: r.median_s for r in result.runners}
    for name in ("transformers", "transformers+compile", "openvino[transformers]"):
        if name in medians:
            for mine in (m for m in medians if m.startswith("ours")):
                result.ratios[f"{mine} vs {name}"] = medians[name] / medians[mine]
    if "ours[openvino]" in medians and "ours" in medians:
        result.ratios["ours[openvino] vs ours"] = medians["ours"] / medians["ours[openvino]"]
    return result


def _memory_probe(model: str, dtype: str, batch: int, image_size: int | None, threads: int) -> dict[str, Any]:
    """Run in a fresh process: RSS after importing torch, after loading, and at the peak of one forward."""
    torch.set_num_threads(threads)
    baseline_mb = _proc_status_kb("VmRSS") / 1024
    import warnings

    from .. import api

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        encoder = api.load(model, dtype=dtype, device="cpu")
        load_s = time.perf_counter() - t
    tower = encoder.model.vision_tower
    if encoder.checkpoint.is_random:  # views of a small shared pool: give each weight its memory, as a real load has
        for p in tower.parameters():
            p.data = p.data.clone()
    weights_mb = sum(p.numel() * p.element_size() for p in tower.parameters()) / 2**20
    loaded_mb = _proc_status_kb("VmRSS") / 1024
    size = image_size or encoder.vision_config.image_size
    pixels = torch.rand(batch, size, size, 3) * 2 - 1
    memory = _PeakMemory(torch.device("cpu"))
    memory.reset()
    before_mb = _proc_status_kb("VmRSS") / 1024
    with torch.inference_mode():
        tower(pixels)
    peak_mb = memory.peak_mb()
    return {
        "model": model, "dtype": dtype, "batch": batch, "image_size": size, "load_s": load_s,
        "torch_import_rss_mb": baseline_mb, "tower_weights_mb": weights_mb, "rss_after_load_mb": loaded_mb,
        "peak_rss_mb": peak_mb, "activation_peak_mb_per_image": (peak_mb - before_mb) / batch,
        "budget_mb_without_activations": baseline_mb + 1.3 * weights_mb,
    }


def measure_memory(model: str, dtype: str, batch: int, image_size: int | None = None,
                   threads: int = 1) -> dict[str, Any]:
    """``_memory_probe`` in a fresh interpreter, so nothing else this process holds is counted."""
    code = ("import json, sys; from gemma3_vision.tools.bench import _memory_probe; "
            f"print(json.dumps(_memory_probe({model!r}, {dtype!r}, {batch}, {image_size!r}, {threads})))")
    # The baseline is taken after `import torch` (the -c code imports it through gemma3_vision.tools.bench).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _torch_settings_restored(compile: bool) -> Iterator[None]:
    """Put back the process-wide settings the benchmark changes: torch's thread count, and inductor's freezing
    (``_compiled`` turns it on), so a caller in the same process (tests, a notebook) keeps its own."""
    threads = torch.get_num_threads()
    if compile:
        import torch._inductor.config as inductor_config

        freezing = inductor_config.freezing
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if compile:
            inductor_config.freezing = freezing


def run_benchmark(*, preset: str = "gemma3-4b", dtypes: Sequence[str] = ("float32",), batches: Sequence[int] = (1,),
                  threads: int | None = None, device: str | None = None, layers: int | None = None,
                  image_size: int | None = None, repeats: int = 3, compile: bool = True, reference: bool = True,
                  compile_mode: str = "default",
                  memory: bool = False, attention: Sequence[str] = (),
                  bf16_residual: bool = False, openvino: bool = False, runners: Sequence[str] = (),
                  progress: Callable[[str], None] = lambda s: None) -> BenchReport:
    """Benchmark ours against transformers for every (dtype, batch).

    Args:
        preset: a ``random`` preset (``gemma3-4b`` is the full tower; ``tiny`` for a smoke test).
        dtypes: ``float32``, ``bfloat16``, ``float16``.
        batches: images per forward.
        threads: torch intra-op threads (default: torch's).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when available).
        layers: run only the first N encoder layers (labelled in the report).
        image_size: input side in pixels (the position table is interpolated, as transformers does).
        repeats: timed calls per runner, in alternation, after one warm-up call each.
        compile: also time both under ``torch.compile`` (inductor, freezing on).
        compile_mode: ``torch.compile``'s mode for both, one of ``COMPILE_MODES``.
        reference: also time transformers (when it is installed).
        memory: also measure peak RSS of ours alone in a fresh process (CPU only).
        attention: ``ATTENTION_VARIANTS`` to time ours with, one runner each: our two attention paths (``sdpa``,
            ``blocked``) or SDPA allowed one kernel (``flash``, ``efficient``, ``cudnn``, ``math``).
        bf16_residual: also time ours with a bf16 residual stream (what our float32 one costs).
        openvino: also time our OpenVINO backend (``ours[openvino]``) and, with ``reference``, transformers'
            tower converted by ``ov.convert_model`` (``openvino[transformers]``; its conversion time and peak RSS
            go in the report's machine section). CPU only; needs the ``openvino`` extra.
        runners: time only these (names from ``RUNNERS``; default: every runner the options build). ``ours`` runs
            once regardless, untimed unless named, as the reference every difference is taken from.

    The process-wide settings the runs change, torch's thread count and inductor's freezing, are restored on return.

    Returns:
        A ``BenchReport``; ``format_report`` prints it, ``to_json`` records it.
    """
    from ..api import resolve_device

    if preset not in PRESETS:
        raise OptionError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    dev = resolve_device(device or None)
    for d in dtypes:
        if d not in _DTYPES:
            raise OptionError(f"dtype must be one of {', '.join(_DTYPES)}, got {d!r}")
    for name in attention:
        if name not in ATTENTION_VARIANTS:
            raise OptionError(f"attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {name!r}")
    for name in runners:
        if name not in RUNNERS:
            raise OptionError(f"runner must be one of {', '.join(RUNNERS)}, got {name!r}")
    vision = PRESETS[preset][0]
    if layers is not None:
        if isinstance(layers, bool) or not 1 <= layers <= vision.num_hidden_layers:
            raise OptionError(f"layers must be in 1..{vision.num_hidden_layers} (the {preset} tower's depth), "
                              f"got {layers!r}")
        vision = replace(vision, num_hidden_layers=layers)
    if image_size is not None:
        vision = replace(vision, image_size=image_size)
    n_threads = threads or torch.get_num_threads()
    progress(f"generating random weights ({preset}, {vision.num_hidden_layers} layers)")
    state = random_tower_state(preset, vision.num_hidden_layers)
    if image_size is not None and image_size != PRESETS[preset][0].image_size:
        # Same position table for both: ours interpolates in forward, transformers needs it resized up front.
        from ..model.tower import interpolate_position_embedding

        grid = vision.image_size // vision.patch_size
        state["embeddings.position_embedding.weight"] = interpolate_position_embedding(
            state["embeddings.position_embedding.weight"], grid, grid)
    report = BenchReport(machine={**machine_info(dev), "threads": n_threads}, configs=[], meta=result_meta(dev))
    converted = None
    if openvino:
        from ..backends import resolve_backend

        resolve_backend("openvino", dev)  # the extra installed, a CPU: else a clear error now
        if reference and importlib.util.find_spec("transformers") is not None:
            progress("converting transformers' tower with ov.convert_model (minutes for the full tower)")
            memory_probe = _PeakMemory(dev)
            memory_probe.reset()
            t = time.perf_counter()
            converted = convert_transformers_to_openvino(vision, state)
            report.machine["openvino_convert_s"] = time.perf_counter() - t
            report.machine["openvino_convert_peak_rss_mb"] = memory_probe.peak_mb()
    with _torch_settings_restored(compile):
        for d in dtypes:
            for b in batches:
                report.configs.append(bench_config(vision, state, dtype=d, batch=b, threads=n_threads, device=dev,
                                                   repeats=repeats, compile=compile, reference=reference,
                                                   compile_mode=compile_mode,
                                                   full_layers=PRESETS[preset][0].num_hidden_layers,
                                                   attention=attention,
                                                   bf16_residual=bf16_residual, openvino=openvino,
                                                   openvino_reference=converted, only=runners,
                                                   progress=progress))
    if memory and dev.type == "cpu":
        for d in dtypes:
            progress(f"memory probe, {d}, batch {max(batches)}")
            report.memory.append(measure_memory(f"random:{preset}" if preset != "gemma3-4b" else "random", d,
                                                max(batches), image_size, n_threads))
    return report


def _seconds(s: float) -> str:
    """Seconds with 3 decimals, or 3 significant digits under 0.1 s (a tiny model's forward takes a ms)."""
    return f"{s:.3f}" if s >= 0.1 else f"{s:.2e}"


def format_report(report: BenchReport) -> str:
    m = report.machine
    lines = [f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['cpu_capability']}, native bf16: "
             f"{m['native_bf16']}){', GPU ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, "
             f"transformers {m.get('transformers')}"
             + (f", OpenVINO {m['openvino']}" if m.get("openvino") else "")]
    if m.get("openvino_convert_s") is not None:
        lines.append(f"openvino[transformers]: ov.convert_model took {m['openvino_convert_s']:.1f} s, peak RSS "
                     f"{m['openvino_convert_peak_rss_mb']:.0f} MB")
    for c in report.configs:
        depth = f"{c.layers} layers" + ("" if c.layers == c.full_layers else
                                        f" (TRUNCATED: the full tower has {c.full_layers})")
        lines.append("")
        lines.append(f"{c.dtype} (our matmuls in {c.compute_dtype}), batch {c.batch}, {c.threads} threads, "
                     f"{c.device}, {c.image_size} px, {depth}: {c.gflop_per_image:.4g} GFLOP/image, "
                     f"GEMM peak {c.gemm_peak_tflops:.3f} TFLOP/s; compile mode: {c.compile_mode}")
        lines.append(f"  {'runner':<22}{'median s/img':>13}{'min':>9}{'max':>9}{'TFLOP/s':>9}{'% peak':>8}"
                     f"{'peak MB':>9}{'compile s':>10}{'max|diff|':>11}{'cosine':>11}")
        for r in c.runners:
            compile_s = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
            diff = f"{r.max_abs_diff:.2e}" if r.max_abs_diff is not None else "-"
            cos = f"{r.cosine:.7f}" if r.cosine is not None else "-"
            median, low, high = (_seconds(s) for s in (r.median_s, r.min_s, r.max_s))
            lines.append(f"  {r.name:<22}{median:>13}{low:>9}{high:>9}{r.tflops:>9.3f}"
                         f"{100 * r.peak_fraction:>7.0f}%{r.peak_memory_mb:>9.0f}{compile_s:>10}{diff:>11}{cos:>11}")
        for name, ratio in c.ratios.items():
            lines.append(f"  {name}: {ratio:.2f}x")
    for mem in report.memory:
        lines.append("")
        lines.append(f"memory ({mem['model']}, {mem['dtype']}, batch {mem['batch']}, fresh process): torch import "
                     f"{mem['torch_import_rss_mb']:.0f} MB, weights {mem['tower_weights_mb']:.0f} MB, peak RSS "
                     f"{mem['peak_rss_mb']:.0f} MB, activations {mem['activation_peak_mb_per_image']:.0f} MB/image, "
                     f"load {mem['load_s']:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="gemma3-vision-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma3-4b", choices=sorted(PRESETS))
    p.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable (default: float32)")
    p.add_argument("--batch", action="append", type=int, help="repeatable (default: 1)")
    p.add_argument("--threads", type=int)
    p.add_argument("--device")
    p.add_argument("--layers", type=int, help="truncate the depth (labelled in the output)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode for both towers (max-autotune: inductor's own GEMMs, fused epilogues)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers")
    p.add_argument("--memory", action="store_true", help="also probe peak RSS of ours in a fresh process")
    p.add_argument("--attention", action="append", choices=list(ATTENTION_VARIANTS), default=[],
                   help="repeatable: also time ours with this attention path (sdpa, blocked) or SDPA kernel alone")
    p.add_argument("--bf16-residual", action="store_true",
                   help="also time ours with its residual stream and LayerNorms in bf16, as transformers runs them")
    p.add_argument("--openvino", action="store_true",
                   help="also time our OpenVINO backend and OpenVINO converted from transformers (CPU)")
    p.add_argument("--runner", action="append", choices=list(RUNNERS), default=[],
                   help="repeatable: time only these runners (ours still runs once, untimed, as the reference)")
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    report = run_benchmark(preset=a.preset, dtypes=a.dtype or ["float32"], batches=a.batch or [1],
                           threads=a.threads, device=a.device, layers=a.layers, image_size=a.image_size,
                           repeats=a.repeats, compile=not a.no_compile, reference=not a.no_reference,
                           compile_mode=a.compile_mode,
                           memory=a.memory, attention=a.attention,
                           bf16_residual=a.bf16_residual, openvino=a.openvino, runners=a.runner,
                           progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(report))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
