"""Compute backends: what runs the tower and the projector once the weights are loaded.

Everything before the model (checkpoint formats, preprocessing, Pan & Scan) and after it (jobs, resume, the
service) is backend-free: a backend takes float32 NHWC pixels ``(B, S, S, 3)`` and gives torch tensors back, so
every caller sees the same types whichever engine computed them.

- ``torch``: the reference path, on CPUs and CUDA (``backends/torch.py``).

``resolve_backend`` turns the ``backend=`` argument of ``load()`` (``--backend`` on the command line) into one
of these names; ``auto`` picks the fastest exact backend present for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import OptionError

if TYPE_CHECKING:  # the command line reads CHOICES without paying for torch's import
    import torch

BACKENDS = ("torch",)
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


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: ``None`` and ``auto`` pick the fastest exact one present.

    Raises:
        OptionError: a name not in ``CHOICES``.
    """
    if backend is None or backend == "auto":
        return "torch"
    if backend not in BACKENDS:
        raise OptionError(f"backend must be one of {', '.join(CHOICES)}, got {backend!r}")
    return backend
