"""``gemma3-vision encode --ray``: the encode job spread over a Ray cluster with Ray Data.

The same job as ``pipeline.run_job``, built from the same steps, so it writes the same files and records:

- the driver (the process that calls ``encode_with_ray``) discovers the inputs, names their outputs and looks up
  each one's last index record (``prior``), holding the output folder's lock, exactly as ``run_job`` does;
- CPU tasks (``num_cpus=1`` each) run ``prepare_input``: the resume decision (stat, then content hash), the
  decode and the preprocessing. They never load the model;
- actors, one model each (one GPU each when the cluster has GPUs), encode ``batch_size`` rows at a time and write
  the ``.npy`` files through ``shards.NpyFiles``: saved under ``OUT/.gemma3-vision-tmp/`` with a unique name,
  renamed into place, and only then reported back;
- with ``shard_size`` (safetensors shards), the actors cast the arrays to the output dtype and send them back, and
  the driver writes the shards (``shards.ShardFiles``): a shard gathers the images of many actor batches, and only
  the driver sees them all in order;
- the driver is the only writer of ``index.jsonl``: it appends each returned record in input order (Ray Data's
  ``preserve_order``), so an ``ok`` record always names a complete file, and a killed job resumes like a local one.

Why the actors write the arrays rather than the driver: a Gemma 3 output is 2.6 MB an image (10 MB with
``--no-project``), so a cluster encoding hundreds of images a second would funnel GB/s through one process; the
actors write in parallel, and only small records travel back. Shards give that up for fewer, larger files: every
output passes through the driver, whose write rate (``benchmarks/pipeline_bench.py --write-only``) then bounds
the job. The price of actors writing: the output folder (and the inputs) must
be on storage every node sees at the same path (NFS, a shared mount), as must the model unless it is a hub id or a
``random`` model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api import (
    Gemma3Vision,
    RandomWeightsWarning,
    compute_dtype_for,
    kept_storage_dtypes,
    load,
    parse_device,
    resolve_dtype,
)
from ..backends import resolve_backend
from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.resolve import resolve
from ..checkpoints.weights import empty_model
from ..errors import ConfigError, Gemma3VisionError, OptionError
from ..model.preprocessing import DEFAULT_MAX_PIXELS
from .discovery import InputItem, discover
from .job import EncodeOptions, check_options, encode_batch_for, job_key, make_input_for
from .output_folder import TMP_DIR_NAME, OutputFolder, save_npy
from .pipeline import (
    JobSummary,
    MakeInput,
    _name_outputs,
    _Prepared,
    encode_prepared,
    error_key_for,
    finish_input,
    plain_input,
    prepare_input,
    report_failed_before,
    split_outputs,
)
from .shards import Encoded, NpyFiles, ShardFiles, check_out_dtype

_RUNTIME_BYTES = 512 << 20  # Python, torch and one batch's activations on top of the weights, roughly
_CONNECT_TIMEOUT_S = 5.0  # a reachable head answers a TCP connection in milliseconds, even across regions
_STORED_NAME = {torch.bfloat16: "BF16", torch.float16: "F16"}  # TensorSource.stored_dtype of a 16-bit tensor


@dataclass(frozen=True)
class RayResources:
    """How the job asks Ray for resources: ``actors`` model copies, each with ``cpus_per_actor`` CPUs and
    ``gpus_per_actor`` GPUs; decoding takes one CPU per task from what is left."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float


def plan_resources(cluster: dict[str, float], device: str | None, actors: int | None = None,
                   cpus_per_actor: float | None = None) -> RayResources:
    """Default resources for a cluster (``ray.cluster_resources()``).

    With GPUs (and ``device`` unset or CUDA): one actor per GPU, one CPU each. Without: actors of up to 4 CPUs
    (torch's intra-op threads; Ray sets ``OMP_NUM_THREADS`` to an actor's CPUs), as many as fit once an eighth of
    the CPUs (at least one) is left for decoding; encoding costs far more than decoding on CPUs.

    Raises:
        OptionError: a CUDA device asked for on a cluster without GPUs, or actor sizes that cannot be scheduled.
        ConfigError: a cluster of fewer than 2 CPUs.
    """
    gpus = int(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 0))
    wants_cuda = device is not None and device.startswith("cuda")
    if wants_cuda and gpus == 0:
        raise OptionError(f"device {device!r} asked for, but the Ray cluster has no GPUs")
    if actors is not None and actors < 1:
        raise OptionError(f"actors must be at least 1, got {actors}")
    if gpus and (device is None or wants_cuda):
        return RayResources(actors or gpus, cpus_per_actor or 1, 1)
    if cpus < 2:
        raise ConfigError(f"the Ray cluster has {cpus} CPUs: at least 2 are needed (decoding and one model)")
    per_actor = cpus_per_actor or min(4, cpus - 1)
    if actors is None:
        actors = max(1, int((cpus - max(1, cpus // 8)) // per_actor))
    if actors * per_actor > cpus - 1:  # the defaults always fit: only the caller's numbers get here
        raise OptionError(f"{actors} actors x {per_actor} CPUs leave no CPU for decoding on a cluster of {cpus}")
    return RayResources(actors, per_actor, 0)


def encode_with_ray(
    inputs: Iterable[str],
    out_dir: str | os.PathLike[str],
    model: str,
    options: EncodeOptions | None = None,
    *,
    address: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    backend: str | None = "auto",
    image_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    follow_symlinks: bool = False,
    shard_size: int | None = None,
    items: Iterable[InputItem] | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    rows_per_task: int = 32,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_failed_before: Callable[[str, str | None], None] | None = None,
    on_progress: Callable[[JobSummary], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> JobSummary:
    """Encode files, folders and glob patterns on a Ray cluster into ``out_dir``, as ``gemma3-vision encode``.

    Writes the same ``<relative path>.npy`` files and ``index.jsonl`` records as the local job, resumes the same
    way (either job can resume the other's folder) and records bad inputs without stopping.

    Args:
        inputs: files, folders or glob patterns, as the CLI takes them; discovered on the driver.
        out_dir: the output folder; on a multi-node cluster, shared storage at the same path on every node.
        model: anything ``load`` takes; every actor loads it, so a path must exist on every node.
        options: what to compute (projection, batch size, layers, pooling, Pan & Scan, output dtype).
        address: the cluster to join (``auto``, ``ray://HOST:10001``, ``HOST:6379``); None joins the one in
            ``RAY_ADDRESS`` or starts a local one. Ignored when ``ray.init`` was already called.
        dtype: compute dtype; None picks bfloat16 on GPU actors, and on CPU actors what ``load`` picks for this
            machine's CPU (pass it explicitly on a cluster of other CPUs).
        device: ``cpu`` to keep a GPU cluster's actors on CPUs; None uses GPUs when the cluster has them.
        shard_size: write safetensors shards of that many images, from the driver; None: ``.npy`` files.
        items: the inputs already discovered (``discovery.discover``), in place of discovering ``inputs``.
        backend: the engine the actors run (``load``'s ``backend``), resolved here for the actors' device.
        actors, cpus_per_actor: model copies and their CPUs; see ``plan_resources`` for the defaults.
        rows_per_task: inputs per decoding task (and per Ray block).
        on_record: sees every record the driver appends.
        on_failed_before: sees every unchanged input that failed before, as in ``pipeline.run_job``.
        on_progress: sees the summary after each input.
        on_start: told, once the cluster is joined, what runs: model, dtype, device, backend and actors.

    Returns:
        The job's ``JobSummary``.

    Raises:
        ConfigError: Ray is not installed, the cluster cannot be reached or joined, or it has too few CPUs.
        OptionError: a device or actor counts the cluster cannot take.
        OutputError: the output folder cannot be used (not writable, or another job holds it).
    """
    if device is not None:
        parse_device(device)  # whether the nodes have it is plan_resources' question
    options = options or EncodeOptions()
    check_out_dtype(options.out_dtype, shard_size is not None)
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'gemma3-vision[ray]'") from None
    if not ray.is_initialized():
        _join_cluster(ray, address)
    resources = plan_resources(ray.cluster_resources(), device, actors, cpus_per_actor)
    actor_device = "cuda" if resources.gpus_per_actor else "cpu"
    run_dtype = resolve_dtype(dtype, torch.device(actor_device))
    backend = resolve_backend(backend, torch.device(actor_device))  # the actors are taken to be like this machine

    # The model as the actors will see it, built on the meta device: options and the job key without the weights.
    checkpoint = resolve(model)
    shapes = Gemma3Vision(empty_model(checkpoint.vision, checkpoint.projector), checkpoint, run_dtype,
                          torch.device("meta"), image_size=image_size)
    # As load() sets it on the actors, which are taken to have this machine's kind of CPU.
    shapes.model.vision_tower.compute_dtype = compute_dtype_for(run_dtype, torch.device(actor_device))
    if checkpoint.is_random:
        warnings.warn(f"{checkpoint.description} has seeded RANDOM weights: its embeddings mean nothing",
                      RandomWeightsWarning, stacklevel=2)
    options = check_options(shapes, options)
    if on_start:
        on_start(f"model {checkpoint.description}, {str(run_dtype).removeprefix('torch.')} on {actor_device}, "
                 f"backend {backend}; Ray: {resources.actors} "
                 f"actor{'s' * (resources.actors > 1)}")
    key = job_key(shapes, options, backend=backend)
    error_key = error_key_for(key, max_pixels, options.exif_transpose)
    to_input: MakeInput = make_input_for(shapes.preprocess_config, options) or _PlainInput(shapes)
    weight_bytes = actor_weight_bytes(checkpoint, run_dtype, torch.device(actor_device))

    out = Path(out_dir).absolute()  # workers have other working folders
    summary = JobSummary(backend=backend)
    start = time.perf_counter()
    folder = OutputFolder(out, overwrite=overwrite)
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order

    def append(record: dict[str, Any]) -> None:
        folder.append(record)
        if on_record:
            on_record(record)

    with contextlib.ExitStack() as stack:
        stack.callback(folder.close)
        shards = ShardFiles(out, folder.tmp, shard_size) if shard_size is not None else None
        if shards is not None:  # the last shard, however full, also after a failure or Ctrl-C: it is encoded
            stack.callback(_flush, shards, append)
        stack.callback(setattr, context.execution_options, "preserve_order", preserve_order)
        stack.enter_context(_quiet_ray_data(context))
        # One small row per input, named on the driver as run_job names them.
        tasks = [{"task": _task_text(item, output, folder.state.prior(item.key) or b"")}
                 for item, output in _name_outputs(
                     discover(inputs, follow_symlinks=follow_symlinks) if items is None else items, folder.state)]
        if tasks:
            context.execution_options.preserve_order = True  # records in input order, as the local job
            ds: ray.data.Dataset = ray.data.from_items(
                tasks, override_num_blocks=max(1, math.ceil(len(tasks) / rows_per_task)))
            ds = ds.map_batches(
                functools.partial(_decode, out_dir=out, to_input=to_input, job_key=key, error_key=error_key,
                                  exif_transpose=options.exif_transpose, max_pixels=max_pixels),
                batch_size=rows_per_task, batch_format="numpy", num_cpus=1,
            )
            ds = ds.map_batches(
                _Encoder, batch_size=options.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=resources.actors),
                num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor,
                memory=weight_bytes + _RUNTIME_BYTES,  # a floor, so Ray packs no more copies than a node holds
                fn_constructor_kwargs={"model": model, "dtype": run_dtype, "device": actor_device, "backend": backend,
                                       "image_size": image_size, "options": options, "out_dir": out,
                                       "job_key": key, "error_key": error_key, "sharded": shards is not None},
            )
            rows = iter(tasks)  # in step with the results, which come in input order
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for text, kind, encoded in zip(batch["record"], batch["kind"], batch["encoded"], strict=True):
                        task = next(rows)
                        if text:
                            append(json.loads(text))
                        elif isinstance(encoded, Encoded):  # a column of only Nones may come back as NaNs
                            assert shards is not None
                            for record in shards.write(encoded):
                                append(record)
                        elif kind == "failed_before" and on_failed_before:
                            report_failed_before(folder, _task(task["task"])[0], on_failed_before)
                        summary.count(str(kind))
                        if on_progress:
                            on_progress(summary)
            except ray.exceptions.RayError as e:
                raise _worker_failure(e) from e
    summary.seconds = time.perf_counter() - start
    return summary


def _flush(shards: ShardFiles, append: Callable[[dict[str, Any]], None]) -> None:
    for record in shards.flush():
        append(record)


def check_reachable(address: str | None, timeout: float = _CONNECT_TIMEOUT_S) -> bool:
    """Refuse, within ``timeout`` seconds, a cluster address nothing answers at: ``ray.init`` retries one for
    minutes, printing only "Failed to connect to GCS" lines.

    ``HOST:PORT`` (the GCS) and ``ray://HOST:PORT`` (Ray Client), given or in ``RAY_ADDRESS``, get a TCP
    connection; ``auto``, ``local`` and no address at all are left to Ray. Returns whether a GCS address
    (``HOST:PORT``, no ``ray://``) answered.

    Raises:
        ConfigError: the host name does not resolve, or the port refuses or does not answer the connection.
    """
    named = address if address is not None else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '')}"
    address = address if address is not None else os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return False
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return False  # not HOST:PORT: ray.init says what is wrong with it
    host = host.strip("[]")  # an IPv6 literal
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except socket.gaierror as e:
        reason = f"the host name {host!r} does not resolve ({e.strerror})"
    except ConnectionRefusedError:
        reason = f"{host}:{port} refused the connection (is Ray running there, on that port?)"
    except TimeoutError:
        reason = f"{host}:{port} did not answer within {timeout:g} s"
    except OSError as e:
        reason = f"cannot connect to {host}:{port} ({e.strerror or e})"
    else:
        return not address.startswith("ray://")
    raise ConfigError(f"cannot reach the Ray cluster at {named}: {reason}")


def _join_cluster(ray: Any, address: str | None) -> None:
    """``ray.init`` as one typed error: its failures are multi-line tracebacks or, for an address that answers
    but is no Ray head, minutes of retries."""
    gcs = check_reachable(address)
    # Joining a running cluster's GCS: one connection attempt (Ray makes 20 by default, each up to ~40 s), unless
    # the user set the budget. Never when Ray starts a local cluster: the processes it starts would inherit the
    # variable, which also bounds how long a new head waits for its GCS to come up (30 s by default).
    wait = {} if not gcs or "RAY_gcs_server_port_wait_time_s" in os.environ else {
        "RAY_gcs_server_port_wait_time_s": "1"}
    os.environ.update(wait)
    # ray.init installs its own SIGTERM handler (sys.exit(15)): keep ours, which unwinds the job as Ctrl-C does.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        # Ray's INFO lines would bury the job's own one line per failure and summary.
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ValueError, ConnectionError, RuntimeError, TimeoutError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        where = address or "RAY_ADDRESS or a new local cluster"
        raise ConfigError(f"cannot join the Ray cluster at {where}: "
                          f"{lines[0] if lines else type(e).__name__}") from None
    finally:
        for name in wait:
            del os.environ[name]
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


@contextlib.contextmanager
def _quiet_ray_data(context: Any) -> Iterator[None]:
    """Ray Data's console output off for the job: its progress lines, and the ERROR lines and traceback of a
    failed execution, which comes back as the exception the job reports in one line. Its warnings (a job that
    cannot be scheduled, say) still show, and its log file under the Ray session keeps everything."""
    settings = {"enable_progress_bars": False, "print_on_execution_start": False}
    before = {name: getattr(context, name) for name in settings}
    consoles = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in consoles]
    for name, value in settings.items():
        setattr(context, name, value)
    for h in consoles:
        h.setLevel(logging.WARNING)
        h.addFilter(_console_filter)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(context, name, value)
        for h, level in zip(consoles, levels, strict=True):
            h.setLevel(level)
            h.removeFilter(_console_filter)


def _console_filter(record: logging.LogRecord) -> bool:
    # The progress module's warning says only that progress bars are off, as asked.
    return record.levelno < logging.ERROR and not record.name.startswith("ray.data._internal.progress")


def _worker_failure(e: Exception) -> Gemma3VisionError:
    """A failed actor or task as one line. Ray keeps only the text of a worker's exception (e.g. a ``WeightsError``
    from weights that hold NaN), and Ray Data chains its own after it, so the line is the last line of the first
    traceback in that text: the root cause's ``type: message``."""
    return Gemma3VisionError(f"a Ray worker failed, the job stopped (records so far are kept): "
                             f"{root_cause(str(e)) or type(e).__name__}")


def root_cause(text: str) -> str | None:
    """The root cause in a Ray error's text: the last non-blank line of its first traceback (None if blank)."""
    root = text.split("The above exception was the direct cause of the following exception:")[0]
    lines = [line.strip() for line in root.splitlines() if line.strip()]
    return lines[-1] if lines else None


class _PlainInput:
    """``pipeline.plain_input`` bound to a preprocessing config, picklable for CPU tasks."""

    def __init__(self, encoder: Gemma3Vision):
        self.config = encoder.preprocess_config

    def __call__(self, img: Any) -> tuple[np.ndarray, dict[str, Any]]:
        return plain_input(img, self.config)


def actor_weight_bytes(checkpoint: Checkpoint, run_dtype: torch.dtype, device: torch.device) -> int:
    """What one actor's copy of the weights takes: float32 CPU actors keep bf16/fp16 tensors as stored
    (``kept_storage_dtypes``), every other tensor is held in ``run_dtype``."""
    kept = {_STORED_NAME[d] for d in kept_storage_dtypes(run_dtype, device)}
    return sum(math.prod(t.shape) * (2 if t.stored_dtype in kept else run_dtype.itemsize)
               for t in checkpoint.tensors.values())


def _task_text(item: InputItem, output: str, prior: bytes) -> str:
    """An input, its output name and its prior record as ASCII JSON: a plain Arrow string column, and file
    names that are not valid UTF-8 survive as ``\\udcXX`` escapes."""
    return json.dumps([str(item.path), item.display, item.rel, item.skip, item.key, output, prior.hex(), item.error])


def _task(text: str) -> tuple[InputItem, str, bytes]:
    path, display, rel, skip, key, output, prior, error = json.loads(text)
    return InputItem(Path(path), display, rel, skip, key, error), output, bytes.fromhex(prior)


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array: ``np.array`` would try to stack the arrays inside."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _decode(batch: dict[str, np.ndarray], *, out_dir: Path, to_input: MakeInput, job_key: str, error_key: str,
            exif_transpose: bool, max_pixels: int | None) -> dict[str, np.ndarray]:
    """A CPU task: each input's resume decision and, when it must be encoded, its views ``(V, S, S, 3)``."""
    return {"prepared": _objects([
        prepare_input(item, output, out_dir, prior, to_input, job_key, error_key, exif_transpose, max_pixels)
        for item, output, prior in map(_task, batch["task"])
    ])}


class _Encoder:
    """A Ray actor holding one model: encodes a batch's inputs and writes their files into the shared folder."""

    def __init__(self, model: str, dtype: torch.dtype, device: str, backend: str, image_size: int | None,
                 options: EncodeOptions, out_dir: Path, job_key: str, error_key: str, sharded: bool = False):
        self.out_dir = out_dir
        self.job_key, self.error_key = job_key, error_key
        self.out_dtype, self.sharded = options.out_dtype, sharded
        self.files = NpyFiles(out_dir, self.save)
        # A model this actor cannot load fails its first batch instead of the constructor: Ray restarts an actor
        # whose constructor raised, without end, and its raylet prints each failure's traceback on the driver's
        # stdout (about 100 lines), whatever log_to_driver says. A failed batch stops the job with the error.
        self.load_error: Exception | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)  # the driver has said so once
                encoder = load(model, dtype=dtype, device=device, image_size=image_size, backend=backend)
        except Exception as e:  # any of them, raised again by __call__
            self.load_error = e.with_traceback(None)  # its frames would keep partly loaded weights alive
            return
        self.encode_batch = encode_batch_for(encoder, options)

    def save(self, rel: str, array: np.ndarray, unlike: bytes = b"") -> None:
        # A unique temporary name: actors on several nodes share one temporary folder.
        save_npy(self.out_dir, rel, array, self.out_dir / TMP_DIR_NAME / f"{uuid.uuid4().hex}.npy", unlike=unlike)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.load_error is not None:
            raise self.load_error
        prepared: list[_Prepared] = list(batch["prepared"])
        outputs = encode_prepared(self.encode_batch, prepared)
        records: list[str] = []
        encoded: list[Encoded | None] = []  # sharded: the arrays, for the driver to write
        for p, rows in split_outputs(prepared, outputs):
            done = finish_input(p, rows, self.job_key, self.error_key, self.out_dtype)
            if isinstance(done, Encoded) and self.sharded:
                records.append("")
                encoded.append(done)
                continue
            written = self.files.write(done) if isinstance(done, Encoded) else [done] if done else []
            records.append(json.dumps(written[0]) if written else "")
            encoded.append(None)
        return {"record": np.array(records, dtype=object), "kind": np.array([p.kind for p in prepared]),
                "encoded": _objects(encoded)}
