"""The ``gemma3-vision`` command line: a thin layer over the library.

Library errors become one line on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
Heavy imports (torch) happen inside commands, so ``--help`` is instant.

Exit codes: 0 everything done; 1 the job could not run (bad model, unwritable output, bad option value);
2 usage error; 3 the job ran but some inputs failed (each is recorded in index.jsonl).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__

EXIT_OK = 0
EXIT_CANNOT_RUN = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3

F = TypeVar("F", bound=Callable[..., Any])


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    click.echo(f"warning: {message}", err=True)


def reports_errors(fn: F) -> F:
    """Run a command, turning library errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import Gemma3VisionError

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except (Gemma3VisionError, OSError) as e:
            if debug:
                raise
            message = " ".join(str(e).split()) if not isinstance(e, OSError) else f"{e.strerror or e}: {e.filename}"
            click.echo(f"error: {message}", err=True)
            sys.exit(EXIT_CANNOT_RUN)

    return wrapper  # type: ignore[return-value]


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
@click.argument("inputs", nargs=-1, required=True)
@click.option("-m", "--model", required=True,
              help="Checkpoint folder, or random / random:tiny for seeded random weights.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: one .npy per image plus index.jsonl.")
@click.option("--no-project", is_flag=True,
              help="Save the tower output (B, 4096, 1152) instead of the projected soft tokens (B, 256, D).")
@click.option("-b", "--batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype. Default: bfloat16 where the hardware runs it fast, else float32.")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0. Default: cuda if available.")
@click.option("--no-exif-transpose", is_flag=True, help="Do not rotate files by their EXIF orientation tag.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse images above this many pixels (decompression-bomb guard). Default: 89,478,485.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Threads decoding and preprocessing ahead of the model.")
@reports_errors
def encode(inputs: tuple[str, ...], model: str, out_dir: Path, no_project: bool, batch_size: int,
           dtype: str | None, device: str | None, no_exif_transpose: bool, max_pixels: int | None,
           workers: int) -> None:
    """Encode images (files or folders, recursed) into .npy embeddings under OUT.

    Writes OUT/<relative path>.npy per image and OUT/index.jsonl with one record per input.
    """
    import numpy as np
    import torch

    from .api import load
    from .errors import ConfigError
    from .pipeline import discover, run_job
    from .preprocess import DEFAULT_MAX_PIXELS

    encoder = load(model, dtype=dtype, device=device)
    if not no_project and not encoder.has_projector:
        raise ConfigError(f"{model} has no multimodal projector (a standalone SigLIP tower): use --no-project")

    def encode_batch(pixels: np.ndarray) -> np.ndarray:
        out = encoder.encode_pixels(torch.from_numpy(pixels), project=not no_project)
        return out.float().cpu().numpy()

    progress = _progress_bar()
    try:
        summary = run_job(
            discover(inputs), out_dir, encode_batch, encoder.preprocess_config, batch_size=batch_size,
            exif_transpose=not no_exif_transpose,
            max_pixels=max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS,
            workers=workers, on_progress=progress.update if progress else None,
        )
    finally:
        if progress:
            progress.close()
    for display, reason in summary.failures:
        click.echo(f"failed: {reason}" if display in reason else f"failed: {display}: {reason}", err=True)
    click.echo(summary.line(), err=True)
    sys.exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)


def _progress_bar() -> Any:
    """A tqdm bar on an interactive terminal; nothing when stderr is a file or pipe."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(unit="img", desc="encoding", file=sys.stderr, dynamic_ncols=True)
