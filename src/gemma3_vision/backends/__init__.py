"""Compute backends: what runs the tower and the projector once the weights are loaded.

Everything before the model (checkpoint formats, preprocessing, Pan & Scan) and after it (jobs, resume, the
service) is backend-free: a backend takes float32 NHWC pixels ``(B, S, S, 3)`` and gives torch tensors back, so
every caller sees the same types whichever engine computed them.

- ``torch``: the reference path, on CPUs and CUDA (``backends/torch.py``).
- ``mlx``: MLX, on Apple silicon's GPU, or MLX's CPU build elsewhere (``backends/mlx.py``; the ``mlx`` extra).
- ``openvino``: OpenVINO's CPU plugin, on x86-64 CPUs, with the ``openvino`` extra (``backends/openvino.py``).

``resolve_backend`` turns the ``backend=`` argument of ``load()`` (``--backend`` on the command line) into one
of these names; ``auto`` picks the fastest exact backend present for the device.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import platform
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import OptionError

if TYPE_CHECKING:  # the command line reads CHOICES without paying for torch's import
    import torch

BACKENDS = ("torch", "openvino", "mlx")
INSTALL_OPENVINO = 'pip install "gemma3-vision[openvino]"'
# CPUs where auto picks OpenVINO: its CPU plugin's kernels beat ours there (docs/openvino.md); elsewhere (ARM) torch
X86_64 = ("x86_64", "amd64")
CHOICES = ("auto", *BACKENDS)


class Backend(Protocol):
    """Runs a loaded tower and projector. Inputs and outputs are torch tensors on the encoder's device."""

    name: str  # one of BACKENDS

    def tower(self, pixels: torch.Tensor, layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Float32 NHWC pixels ``(B, S, S, 3)`` in [-1, 1] → the tower output ``(B, N, hidden)`` in the run dtype,
        and the hidden states asked for by index (0 the embeddings, i after layer i), each ``(B, N, hidden)``."""
        ...

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tower output ``(B, N, hidden)`` → soft tokens ``(B, T, text_hidden)``."""
        ...


def openvino_installed() -> bool:
    """Whether ``openvino`` can be imported (looked up, not imported: that takes a second)."""
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: ``None`` and ``auto`` pick the fastest exact one present: MLX on Apple
    silicon where mlx imports, OpenVINO on an x86-64 CPU where it is installed, torch elsewhere (CUDA, other ARM
    CPUs, or without the extras).

    Raises:
        OptionError: a name not in ``CHOICES``; ``openvino`` or ``mlx`` not installed, or asked for a CUDA device.
    """
    on_x86_cpu = device.type == "cpu" and platform.machine().lower() in X86_64
    if backend is None or backend == "auto":
        if mlx_preferred(device):
            return "mlx"
        return "openvino" if on_x86_cpu and openvino_installed() else "torch"
    if backend not in BACKENDS:
        raise OptionError(f"backend must be one of {', '.join(CHOICES)}, got {backend!r}")
    if backend == "mlx":
        check_mlx(device)
    if backend == "openvino":
        if device.type != "cpu":
            raise OptionError(f"backend 'openvino' runs on the CPU, got device {str(device)!r}: use --device cpu, "
                              "or backend torch for a GPU")
        if not openvino_installed():
            raise OptionError(f"backend 'openvino' needs the openvino package, which is not installed: "
                              f"{INSTALL_OPENVINO}")
    return backend


# -- MLX: the default on Apple silicon

MLX_INSTALL = 'pip install "gemma3-vision[mlx]"'


@functools.lru_cache(maxsize=1)
def mlx_import_error() -> str | None:
    """Why ``mlx.core`` cannot be imported here, or None when it can (``mlx`` alone on Linux lacks the CPU
    build's library: ``mlx[cpu]`` brings it)."""
    try:
        importlib.import_module("mlx.core")
    except ImportError as e:
        return str(e)
    return None


def on_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def mlx_preferred(device: torch.device) -> bool:
    """``auto`` picks MLX on Apple silicon with mlx installed: its GPU, which torch reaches only through MPS."""
    return device.type == "cpu" and on_apple_silicon() and mlx_import_error() is None


def check_mlx(device: torch.device) -> None:
    """Raises OptionError where ``backend="mlx"`` cannot run: mlx missing, or a CUDA device asked for."""
    if device.type != "cpu":
        raise OptionError(f"backend mlx runs on MLX's own device (the Apple GPU, else the CPU) and returns CPU "
                          f"tensors: device must be cpu or left out, got {device}")
    why = mlx_import_error()
    if why is not None:
        raise OptionError(f"backend mlx needs MLX, which cannot be imported here ({why}): {MLX_INSTALL}")
