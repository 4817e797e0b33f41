"""The ``gemma3-vision`` command line: a thin layer over the library.

Library errors become one line on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
Heavy imports (torch) happen inside commands, so ``--help`` is instant.

Exit codes: 0 everything done; 1 the job could not run (bad model, unwritable or locked output folder, a
model failure mid-job); 2 usage error (also an option value the model cannot take); 3 the job ran but some inputs
failed (each is recorded in index.jsonl); 4 nothing to encode (no input found, or folders holding no file with
an image suffix: nothing is written); 130 interrupted (Ctrl-C; an encode job resumes when re-run); 143
terminated (SIGTERM, handled as Ctrl-C is).
"""

from __future__ import annotations

import collections
import functools
import gc
import itertools
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .backends import CHOICES as BACKEND_CHOICES
from .model.config import PRESETS

DEFAULT_SHARD_SIZE = 256

MODEL_HELP = ("A Hugging Face folder or hub id (org/name), a GGUF file (llama.cpp mmproj, Ollama blob), an Ollama "
              "name (gemma3:4b), an MLX or SigLIP folder, or random / random:tiny for seeded random weights.")

EXIT_OK = 0
EXIT_CANNOT_RUN = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
EXIT_NOTHING_FOUND = 4  # no input at all: an empty folder, or only files whose suffix is not an image's
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, ``kill``), raised in the main thread so that the command unwinds as
    after Ctrl-C: workers stopped, the output folder's temporary files removed and its lock released."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


F = TypeVar("F", bound=Callable[..., Any])


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL, C1


def printable(text: str) -> str:
    """``text`` with its control characters (C0, DEL, C1) escaped as Python writes them (``\\n``, ``\\x1b``).

    Lines name files, and a file name may hold anything but ``/`` and NUL: a newline would split a line in two,
    a CR or ESC could overwrite it with a fake message or recolour the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def named(name: str, reason: str | None) -> str:
    """``NAME: REASON`` with the input named once: most reasons start with the name already, though folded to one
    line (whitespace runs as one space, none at either end), as ``one_line`` folds them."""
    from .model.preprocessing import without_name

    if reason is None:
        return name
    rest = without_name(name, reason)
    return f"{name}: {reason if rest is None else rest}"


def _say(line: str) -> None:
    """One line on stderr, above encode's progress bar when one is drawn there (tqdm.write clears the bar, prints
    the line and draws the bar again; a plain print would land on the bar's line). Control characters are escaped:
    whatever a file name holds, the line stays one line."""
    line = printable(line)
    tqdm = sys.modules.get("tqdm")  # imported only once a bar is made
    if tqdm is not None:
        tqdm.tqdm.write(line, file=sys.stderr)  # without file=, tqdm.write prints to stdout
    else:
        click.echo(line, err=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    _say(f"warning: {message}")


def reports_errors(fn: F) -> F:
    """Run a command, turning library errors into one line on stderr and exit code 1, or 2 (usage) for an option
    value the library refused (``OptionError``: a bad device, or layers beyond the model's depth)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import Gemma3VisionError, OptionError

        debug = click.get_current_context().find_root().params.get("debug", False)
        # Only the main thread may set handlers; a SIGTERM a launcher set to be ignored stays ignored.
        handles_sigterm = (threading.current_thread() is threading.main_thread()
                           and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN)
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if handles_sigterm else None
        try:
            return fn(*args, **kwargs)
        except (Gemma3VisionError, OSError) as e:
            if debug:
                raise
            if isinstance(e, OSError) and e.strerror:
                message = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
            else:
                message = " ".join(str(e).split()) or type(e).__name__
            click.echo(printable(f"error: {message}"), err=True)
            sys.exit(EXIT_USAGE if isinstance(e, OptionError) else EXIT_CANNOT_RUN)
        except KeyboardInterrupt as e:
            if debug:
                raise
            terminated = isinstance(e, Terminated)
            click.echo("terminated" if terminated else "interrupted", err=True)
            sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
        finally:
            if handles_sigterm:  # None: a handler set outside Python, which cannot be put back
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper  # type: ignore[return-value]


def _ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--ray`` takes an optional value, so ``--ray photos/`` would read the folder as the address: refuse
    anything that does not look like one."""
    if not value or value in ("auto", "local") or value.startswith("ray://") or ":" in value:
        return value
    raise click.BadParameter(f"{value!r} is not a Ray address (auto, ray://HOST:10001, HOST:6379); without an "
                             "address, put --ray after the inputs or write --ray=")


def _max_num_crops(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """``PanAndScanConfig``'s upper limit, refused as a usage error that names the option, with the reason."""
    from .model.pan_and_scan import MAX_NUM_CROPS, TOO_MANY_CROPS

    if value > MAX_NUM_CROPS:
        raise click.BadParameter(f"at most {MAX_NUM_CROPS}, got {value}: {TOO_MANY_CROPS}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="gemma3-vision")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Gemma 3 vision embeddings: the SigLIP tower and multimodal projector, exact and fast.

    Example: gemma3-vision encode examples/images --model random --out out
    """
    if not debug:
        warnings.showwarning = _show_warning


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("-m", "--model", required=True,
              help=MODEL_HELP)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: one .npy per image plus index.jsonl.")
@click.option("--from-file", "lists", multiple=True, metavar="LIST",
              help="Read inputs from LIST, one path per line ('-' for standard input). Repeatable.")
@click.option("--overwrite", is_flag=True,
              help="Encode every input again, even those an earlier run finished (the index keeps their records, "
                   "after which it appends an 'overwrite' line).")
@click.option("--follow-symlinks", is_flag=True,
              help="Follow links to folders and links leaving an input folder (cycles are still refused).")
@click.option("--no-project", is_flag=True,
              help="Save the tower output (B, 4096, 1152) instead of the projected soft tokens (B, 256, D).")
@click.option("-b", "--batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass; with --pan-and-scan, views (each image and each crop counts one).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype. Default: bfloat16 where the hardware runs it fast, else float32.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda if available.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Engine that runs the tower: auto picks the fastest exact one installed for the device.")
@click.option("--no-exif-transpose", is_flag=True, help="Do not rotate files by their EXIF orientation tag.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse images above this many pixels, checked from the header (decompression-bomb guard). "
                   "Default: 89,478,485.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Threads reading and preprocessing ahead of the model.")
@click.option("--pan-and-scan", is_flag=True,
              help="Also encode Gemma 3 Pan & Scan crops of non-square images: NAME.crop1.npy, ... "
                   "(boxes in the index record).")
@click.option("--pan-and-scan-min-crop-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Pan & Scan: no crop smaller than this many pixels.")
@click.option("--pan-and-scan-max-num-crops", type=click.IntRange(min=2), default=4, show_default=True,
              callback=_max_num_crops, help="Pan & Scan: at most this many crops (32 at most).")
@click.option("--pan-and-scan-min-ratio", type=click.FloatRange(min=1.0), default=1.2, show_default=True,
              help="Pan & Scan: only for images at least this much longer than wide (or wider than long).")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Input size in pixels (position embeddings interpolated; (size/56)^2 tokens). Default: the "
                   "model's.")
@click.option("--layers", default=None, metavar="I,J,...",
              help="Also save these hidden states (0 = embeddings, i = after layer i): NAME.layerI.npy.")
@click.option("--pool", type=click.Choice(["mean"]), default=None,
              help="Also save the mean over rows of the output, one vector per image: NAME.pooled.npy.")
@click.option("--normalize", is_flag=True, help="L2-normalise the pooled vectors (needs --pool).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              callback=_ray_address,
              help="Run on a Ray cluster (pip install 'gemma3-vision[ray]'): ADDRESS is auto, ray://HOST:10001 "
                   "or HOST:6379; alone, RAY_ADDRESS or a new local cluster. OUT and the inputs must be on "
                   "storage every node shares.")
@click.option("--ray-actors", type=click.IntRange(min=1), default=None,
              help="With --ray: model copies (default: one per GPU, else by the cluster's CPUs).")
@click.option("--format", "out_format", type=click.Choice(["npy", "safetensors"]), default="npy", show_default=True,
              help="npy: one file per array; safetensors: shards of --shard-size images under OUT/shards/.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help=f"Images per safetensors shard (default {DEFAULT_SHARD_SIZE}); one shard is held in memory "
                   "until written.")
@click.option("--out-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True,
              help="dtype of the written arrays. float16: an image whose output exceeds ±65504 fails (recorded); "
                   "bfloat16 needs --format safetensors.")
@reports_errors
def encode(inputs: tuple[str, ...], model: str, out_dir: Path, lists: tuple[str, ...], overwrite: bool,
           follow_symlinks: bool, no_project: bool, batch_size: int, dtype: str | None, device: str | None,
           backend: str, no_exif_transpose: bool, max_pixels: int | None, workers: int, pan_and_scan: bool,
           pan_and_scan_min_crop_size: int, pan_and_scan_max_num_crops: int, pan_and_scan_min_ratio: float,
           image_size: int | None, layers: str | None, pool: str | None, normalize: bool,
           ray_address: str | None, ray_actors: int | None, out_format: str, shard_size: int | None,
           out_dtype: str) -> None:
    """Encode images into .npy embeddings (or safetensors shards) under OUT, resumably.

    INPUTS are files, folders (recursed in sorted order, image suffixes only), quoted glob patterns
    ('photos/**/*.jpg') or '-' for a list on standard input. Writes OUT/{relative path}.npy per image and appends
    one record per input to OUT/index.jsonl: status ok, error (with the reason) or skipped (FIFOs, devices,
    links leaving a folder: never opened).

    Re-running the same command skips inputs already encoded with the same bytes, model and options, and
    inputs that failed unchanged; a killed job leaves no partial file. Exit codes: 0 all encoded, 3 some inputs
    failed, 4 nothing to encode, 1 the job could not run, 2 usage error, 130 interrupted and 143 terminated
    (re-run to resume). Read the outputs with gemma3_vision.open_embeddings(OUT).

    Example: gemma3-vision encode photos/ --model random:tiny --out embeddings/
    """
    started = _pause_gc_during_start_up()
    from PIL import Image

    from .api import load
    from .jobs.discovery import discover, read_list
    from .jobs.job import EncodeOptions, check_options, encode_batch_for, job_key, make_input_for
    from .jobs.pipeline import run_job
    from .jobs.progress import Progress, count_inputs
    from .model.pan_and_scan import PanAndScanConfig
    from .model.preprocessing import DEFAULT_MAX_PIXELS

    if not inputs and not lists:
        raise click.UsageError("give at least one input (file, folder, pattern or '-') or --from-file LIST")
    if (inputs.count("-") + lists.count("-")) > 1:
        raise click.UsageError("standard input can be read only once ('-')")
    # The header check below refuses these; Pillow's warning on the way would only be noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    if normalize and pool is None:
        raise click.UsageError("--normalize applies to pooled vectors: add --pool mean")
    if ray_actors is not None and ray_address is None:
        raise click.UsageError("--ray-actors applies to Ray jobs: add --ray")
    if shard_size is not None and out_format != "safetensors":
        raise click.UsageError("--shard-size applies to safetensors shards: add --format safetensors")
    if out_dtype == "bfloat16" and out_format != "safetensors":
        raise click.UsageError("--out-dtype bfloat16 needs --format safetensors: .npy has no bfloat16")
    shards = (shard_size or DEFAULT_SHARD_SIZE) if out_format == "safetensors" else None
    given = click.get_current_context().get_parameter_source
    tuned = [f"--{name.replace('_', '-')}" for name in ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                                                       "pan_and_scan_min_ratio")
             if given(name) != click.core.ParameterSource.DEFAULT]
    if tuned and not pan_and_scan:
        raise click.UsageError(f"{', '.join(tuned)} appl{'ies' if len(tuned) == 1 else 'y'} to Pan & Scan: add "
                               "--pan-and-scan")
    pas = PanAndScanConfig(pan_and_scan_min_crop_size, pan_and_scan_max_num_crops,
                           pan_and_scan_min_ratio) if pan_and_scan else None
    options = EncodeOptions(project=not no_project, batch_size=batch_size,
                            layers=tuple(_int_list(layers, "--layers")) if layers is not None else (), pool=pool,
                            normalize=normalize, pan_and_scan=pas, exif_transpose=not no_exif_transpose,
                            out_dtype=out_dtype)
    max_pixels = max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS

    def arguments() -> Any:
        for arg in inputs:
            yield from (read_list("-") if arg == "-" else (arg,))
        for source in lists:
            yield from read_list(source)

    left_out: collections.Counter[str] = collections.Counter()
    items = discover(arguments(), follow_symlinks=follow_symlinks, left_out=left_out)
    first = next(items, None)  # before the model loads and the folder is locked: nothing found, nothing written
    if first is None:
        click.echo(printable(f"warning: {nothing_found(left_out)}"), err=True)
        sys.exit(EXIT_NOTHING_FOUND)
    items = itertools.chain([first], items)

    progress = Progress(sys.stderr)
    if "-" not in inputs and "-" not in lists:  # standard input can be read once: no total for it
        stop_count = count_inputs(lambda: discover(arguments(), follow_symlinks=follow_symlinks), progress.set_total)
    else:
        stop_count = None

    def on_record(record: dict[str, Any]) -> None:
        if record["status"] == "error":
            _say(f"failed: {named(record['input'], record['error'])}")
        elif record["status"] == "skipped":
            _say(f"skipped: {named(record['input'], record['reason'])}")

    def on_failed_before(name: str, reason: str | None) -> None:
        _say(f"failed (unchanged since an earlier run): {named(name, reason)}")

    try:
        if ray_address is not None:
            started()
            from .jobs.ray_encode import encode_with_ray

            summary = encode_with_ray(
                [], out_dir, model, options, address=ray_address or None, dtype=dtype, device=device,
                backend=backend, image_size=image_size, max_pixels=max_pixels, overwrite=overwrite,
                shard_size=shards, items=items,
                actors=ray_actors, on_record=on_record, on_failed_before=on_failed_before,
                on_progress=progress.update,
                on_start=lambda line: _say(f"{line}; writing {_layout(out_dtype, shards)}"),
            )
        else:
            encoder = load(model, dtype=dtype, device=device, image_size=image_size, backend=backend)
            started()
            options = check_options(encoder, options)
            _say(f"model {encoder.checkpoint.description}, {str(encoder.dtype).removeprefix('torch.')} on "
                 f"{encoder.device}, backend {encoder.backend.name}; writing {_layout(out_dtype, shards)}")
            summary = run_job(
                items, out_dir, encode_batch_for(encoder, options),
                encoder.preprocess_config, make_input=make_input_for(encoder.preprocess_config, options),
                job_key=job_key(encoder, options), batch_size=batch_size, exif_transpose=options.exif_transpose,
                max_pixels=max_pixels, workers=workers, overwrite=overwrite, out_dtype=out_dtype,
                shard_size=shards, on_record=on_record, on_failed_before=on_failed_before,
                on_progress=progress.update,
            )
            summary.backend = encoder.backend.name
    finally:
        if stop_count is not None:
            stop_count.set()
        progress.close()
    click.echo(summary.line(), err=True)
    sys.exit(EXIT_SOME_FAILED if summary.any_failed else EXIT_OK)


def _pause_gc_during_start_up() -> Callable[[], None]:
    """Turn the cyclic garbage collector off until the returned ``started()`` is called, once the model is loaded.

    Importing torch and building the model make some 250k objects and almost no cyclic garbage (under 1 MB), yet
    they set off ~400 collections that walk them: 0.3-0.5 s of a ~3 s start-up. ``started()`` freezes what exists
    (later collections skip it) and turns collection back on. When the command ends, the objects are unfrozen and
    the collector left as it was found, for in-process callers (tests).
    """
    enabled = gc.isenabled()
    gc.disable()

    def started() -> None:
        gc.freeze()
        if enabled:
            gc.enable()

    def restore() -> None:
        gc.unfreeze()
        if enabled:
            gc.enable()

    click.get_current_context().call_on_close(restore)
    return started


def _layout(out_dtype: str, shard_size: int | None) -> str:
    return f"{out_dtype} safetensors shards of {shard_size} images" if shard_size else f"{out_dtype} .npy files"


def nothing_found(left_out: collections.Counter[str]) -> str:
    """Why an encode job has nothing to do, naming the suffixes its folders held instead of images."""
    from .jobs.discovery import IMAGE_SUFFIXES

    message = "nothing to encode: no input found"
    if left_out:
        held = ", ".join(f"{n} {suffix or '(no suffix)'}" for suffix, n in left_out.most_common())
        message += (f"; the folders hold only files without an image suffix ({held}), left out. Image suffixes: "
                    f"{' '.join(sorted(IMAGE_SUFFIXES))}; name a file itself to read it whatever its suffix")
    return message + "; nothing was written"


@main.command()
@click.option("-m", "--model", required=True, help=MODEL_HELP)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype. Default: bfloat16 where the hardware runs it fast, else float32.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda if available.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Engine that runs the tower: auto picks the fastest exact one installed for the device.")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Input size in pixels (position embeddings interpolated). Default: the model's.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(min=0, max=65535))
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Views per forward pass, gathered from concurrent requests.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long the worker waits for more images once it has one.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images admitted and not yet computed; beyond it, 429 with Retry-After.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body; beyond it, 413.")
@click.option("--max-bodies-mb", default=256.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Request bodies held at once, all requests together (at least one --max-body-mb); beyond "
                   "it, 429.")
@click.option("--max-images", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most images in one request; beyond it, 413.")
@click.option("--max-response-mb", default=512.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest /v1/encode response (its tensors, base64 counted in JSON); beyond it, 413 before any "
                   "compute.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds from a request's arrival to its answer: 504 after it (408 if its body is still "
                   "arriving).")
@click.option("--cache-mb", default=256.0, show_default=True, type=click.FloatRange(min=0),
              help="Result cache, keyed on image bytes, model and options; 0 turns it off.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse images above this many pixels, checked from the header (decompression-bomb guard). "
                   "Default: 89,478,485.")
@click.option("--decode-threads", type=click.IntRange(min=1), default=None,
              help="Threads decoding and preprocessing images. Default: the CPU count, at most 4.")
@click.option("--api-key", envvar="GEMMA3_VISION_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--served-model-name", default=None,
              help="The model's name in /v1/models and in responses. Default: the --model argument.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              callback=_ray_address,
              help="Serve from Ray Serve replicas (pip install 'gemma3-vision[ray]'): ADDRESS is auto, "
                   "ray://HOST:10001 or HOST:6379; alone, RAY_ADDRESS or a new local Ray instance. The model must "
                   "load on every node.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: model copies, each with its own batching worker (default: one per GPU, else 1).")
@reports_errors
def serve(model: str, dtype: str | None, device: str | None, backend: str, image_size: int | None, host: str,
          port: int, max_batch_size: int, max_wait_ms: float, max_queue: int, max_body_mb: float,
          max_bodies_mb: float, max_images: int, max_response_mb: float, timeout: float, cache_mb: float,
          max_pixels: int | None, decode_threads: int | None, api_key: str | None, served_model_name: str | None,
          log_level: str, ray_address: str | None, replicas: int | None) -> None:
    """Serve image embeddings over HTTP (pip install 'gemma3-vision[serve]'); docs/serving.md has the routes.

    POST /v1/embeddings (OpenAI), POST /v1/encode (token matrices as .npy or safetensors), GET /v1/models,
    /health, /ready, /metrics. SIGTERM or Ctrl-C drains: requests in flight finish, then exit 0. Exit 1 if the
    model worker dies.

    Example: gemma3-vision serve --model random:tiny --port 8000
    """
    if replicas is not None and ray_address is None:
        raise click.UsageError("--replicas applies to --ray: add --ray")
    # Before torch loads its OpenMP runtime: its threads then sleep between forward passes instead of spinning on
    # the cores that decode images and answer requests (docs/serving.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"serve needs the serve extra ({e.name} is missing): "
                                   "pip install 'gemma3-vision[serve]'") from None
    from PIL import Image

    from .api import load, resolve_device, resolve_dtype
    from .backends import resolve_backend
    from .model.preprocessing import DEFAULT_MAX_PIXELS
    from .serve import ServeSettings, run

    if ray_address is None:  # a Ray cluster's devices are the replicas' to check, not this machine's
        resolved = resolve_device(device)  # bad options fail here, before the server starts listening
        resolve_dtype(dtype, resolved)
        resolve_backend(backend, resolved)

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # the header check refuses these
    settings = ServeSettings(
        model_name=served_model_name or model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
        max_queue=max_queue, max_body_mb=max_body_mb, max_bodies_mb=max_bodies_mb, max_images=max_images,
        max_response_mb=max_response_mb, timeout=timeout, cache_mb=cache_mb,
        api_key=api_key or None, max_pixels=max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS,
        **({"decode_threads": decode_threads} if decode_threads is not None else {}),
    )

    load_options: dict[str, Any] = {"dtype": dtype, "device": device, "image_size": image_size, "backend": backend}
    if ray_address is not None:
        from .serve.ray_serve import run_with_ray

        sys.exit(run_with_ray(model, load_options, settings, replicas=replicas, address=ray_address or None,
                              host=host, port=port, device=device))

    def loader() -> Any:  # runs in the model worker once the server listens: /ready is 503 until it returns
        return load(model, **load_options)

    sys.exit(run(loader, settings, host=host, port=port, log_level=log_level))


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@reports_errors
def info(model: str, as_json: bool) -> None:
    """Show what MODEL is: format, files, configs, stored dtypes, parameter counts, conventions undone, and the
    backend that encode would run it on here.

    MODEL is anything --model accepts (folder, GGUF file, Ollama name, Hugging Face id, random:tiny).
    Reads headers only, no tensor data.
    """
    import json

    from .api import default_device
    from .backends import resolve_backend
    from .checkpoints.info import checkpoint_info, format_info
    from .checkpoints.resolve import resolve

    data = checkpoint_info(resolve(model))
    device = default_device()
    data["backend"] = {"device": str(device), "auto": resolve_backend("auto", device)}  # what encode would run
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@main.command()
@click.argument("model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["hf", "mmproj"]), required=True,
              help="hf: a Hugging Face folder (config.json, preprocessor_config.json, model.safetensors); "
                   "mmproj: a llama.cpp mmproj GGUF.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default=None,
              help="Storage dtype. Default: each tensor's stored precision (lossless).")
@reports_errors
def convert(model: str, out: Path, to: str, dtype: str | None) -> None:
    """Write MODEL's vision tower and projector to OUT as a Hugging Face folder or an mmproj GGUF.

    Example: gemma3-vision convert gemma3:4b mmproj-gemma3-4b.gguf --to mmproj
    """
    from .checkpoints.convert import convert as convert_checkpoint
    from .checkpoints.resolve import resolve

    path = convert_checkpoint(resolve(model), out, to, dtype)
    click.echo(printable(f"wrote {path}"), err=True)


def _int_list(value: str, option: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}",
                                 param_hint=option) from None


def _int_pair(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        a, b = (int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two integers A,B, got {value!r}") from None
    return a, b


@main.command()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-m", "--model", required=True, help=MODEL_HELP)
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Picture to write; its extension picks the format (.png, .jpg, .webp, ...; none: PNG).")
@click.option("--layer", "features_layer", type=click.IntRange(min=0), default=None,
              help="PCA of hidden state N (0 = embeddings) instead of the tower output.")
@click.option("--attention", callback=_int_pair, metavar="LAYER,HEAD", default=None,
              help="Add the attention of LAYER (1-based) and HEAD (0-based) from one patch.")
@click.option("--patch", callback=_int_pair, metavar="ROW,COL", default=None,
              help="Query patch of the attention panel, in the patch grid. Default: the centre.")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Input size in pixels (position embeddings interpolated). Default: the model's.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Compute dtype.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda if available.")
@reports_errors
def show(image: Path, model: str, out: Path, features_layer: int | None, attention: tuple[int, int] | None,
         patch: tuple[int, int] | None, image_size: int | None, dtype: str, device: str | None) -> None:
    """Write a picture of what the tower sees: the preprocessed IMAGE beside a PCA of its patch features (first three
    components as RGB), optionally with one layer's and head's attention from one patch.

    Example: gemma3-vision show examples/images/landscape.jpg --model random:tiny -o show.png --attention 2,0
    """
    if patch is not None and attention is None:
        raise click.UsageError("--patch needs --attention LAYER,HEAD")
    from .api import load
    from .tools.visualize import AttentionQuery
    from .tools.visualize import show as write_picture

    encoder = load(model, dtype=dtype, device=device)
    query = AttentionQuery(attention[0], attention[1], patch) if attention is not None else None
    width, height = write_picture(encoder, str(image), str(out), features_layer=features_layer, attention=query,
                                  image_size=image_size)
    click.echo(printable(f"wrote {out} ({width}x{height})"), err=True)


@main.command()
@click.option("--preset", default="gemma3-4b", show_default=True, type=click.Choice(list(PRESETS)),
              help="random model preset: gemma3-4b is the full tower, tiny a smoke test.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Repeatable. Default: float32.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), help="Repeatable. Default: 1.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads. Default: torch's.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda if available.")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Run only the first N layers (labelled TRUNCATED in the report).")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Input side in pixels.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed calls per runner, in alternation, after a warm-up call.")
@click.option("--no-compile", is_flag=True, help="Skip the torch.compile runners.")
@click.option("--compile-mode", type=click.Choice(["default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"]), default="default", show_default=True,
              help="torch.compile mode for both towers (max-autotune: inductor's own GEMMs, with fused epilogues).")
@click.option("--no-reference", is_flag=True, help="Skip transformers.")
@click.option("--memory", is_flag=True, help="Also probe peak RSS of ours alone in a fresh process.")
@click.option("--attention", "attention", multiple=True,
              type=click.Choice(["sdpa", "blocked", "flash", "efficient", "cudnn", "math"]),
              help="Repeatable: also time ours with this attention path (sdpa, blocked), or with SDPA allowed only "
                   "this kernel (flash, efficient, cudnn, math; CUDA has all four).")
@click.option("--bf16-residual", is_flag=True,
              help="Also time ours with its residual stream and LayerNorms in bf16, as transformers runs them.")
@click.option("--openvino", is_flag=True,
              help="Also time our OpenVINO backend (ours[openvino]) and transformers' tower converted to OpenVINO "
                   "(openvino[transformers]); CPU, needs the openvino extra.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "openvino"]),
              help="Repeatable: the backends ours runs on. torch is always timed (runner ours, the reference); "
                   "openvino is --openvino. MLX has its own script, benchmarks/mlx_bench.py.")
@click.option("--runner", "runners", multiple=True,
              type=click.Choice(["ours", "ours+compile", "transformers", "transformers+compile", "ours[openvino]",
                                 "openvino[transformers]", "ours[bf16 residual]", "ours[sdpa]", "ours[blocked]",
                                 "ours[flash]", "ours[efficient]", "ours[cudnn]", "ours[math]"]),
              help="Repeatable: time only these runners. ours still runs once, untimed, as the reference every "
                   "difference is taken from.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report as JSON here.")
@reports_errors
def bench(preset: str, dtypes: tuple[str, ...], batches: tuple[int, ...], threads: int | None, device: str | None,
          layers: int | None, image_size: int | None, repeats: int, no_compile: bool, compile_mode: str,
          no_reference: bool, memory: bool, attention: tuple[str, ...], bf16_residual: bool, openvino: bool,
          backends: tuple[str, ...], runners: tuple[str, ...], json_path: Path | None) -> None:
    """Time our tower against transformers' (same random weights, one process, alternating).

    Example: gemma3-vision bench --dtype float32 --dtype bfloat16 --layers 2 --json bench.json
    """
    from .tools.bench import format_report, run_benchmark

    report = run_benchmark(preset=preset, dtypes=dtypes or ("float32",), batches=batches or (1,), threads=threads,
                           device=device, layers=layers, image_size=image_size, repeats=repeats,
                           compile=not no_compile, compile_mode=compile_mode, reference=not no_reference,
                           memory=memory, attention=attention, bf16_residual=bf16_residual,
                           openvino=openvino or "openvino" in backends, runners=runners,
                           progress=lambda s: click.echo(s, err=True))
    click.echo(format_report(report))
    if json_path is not None:
        json_path.write_text(report.to_json(), encoding="utf-8")
