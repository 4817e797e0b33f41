"""The torch backend: the reference path (``model.py``, ``projector.py``), on CPUs and CUDA."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checkpoints.weights import VisionModel


class TorchBackend:
    """Calls the loaded torch modules; the one backend that also gives gradients (through ``model``)."""

    name = "torch"

    def __init__(self, model: VisionModel, device: torch.device):
        self.model = model
        self.device = device

    def tower(self, pixels: torch.Tensor, layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        x = pixels.to(self.device, non_blocking=True)
        if not layers:
            return self.model.vision_tower(x), {}
        out = self.model.vision_tower(x, hidden_layers=layers)  # only these states are kept
        return out.last_hidden_state, out.layers

    def project(self, x: torch.Tensor) -> torch.Tensor:
        assert self.model.multi_modal_projector is not None  # callers check has_projector first
        return self.model.multi_modal_projector(x)  # (B, T, text_hidden)
