"""Building the model from a ``Checkpoint``: on the meta device, strict, one tensor at a time, no second copy."""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import Checkpoint
from .config import ProjectorConfig, VisionConfig
from .errors import WeightsError
from .model import VisionTower
from .projector import MultiModalProjector


class VisionModel(nn.Module):
    """The tower plus, when the checkpoint has one, the projector. Its state-dict keys are the canonical names."""

    def __init__(self, vision: VisionConfig, projector: ProjectorConfig | None):
        super().__init__()
        self.vision_tower = VisionTower(vision)
        self.multi_modal_projector = MultiModalProjector(vision, projector) if projector is not None else None


def empty_model(vision: VisionConfig, projector: ProjectorConfig | None) -> VisionModel:
    """The model with no storage behind its parameters: shapes only, instant even at full size."""
    with torch.device("meta"):
        return VisionModel(vision, projector)


def expected_shapes(vision: VisionConfig, projector: ProjectorConfig | None) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in empty_model(vision, projector).state_dict().items()}


def check_tensors(checkpoint: Checkpoint) -> None:
    """Every missing, unexpected and wrongly shaped tensor, listed in one error (nothing is read)."""
    expected = expected_shapes(checkpoint.vision, checkpoint.projector)
    found = checkpoint.tensors
    missing = sorted(set(expected) - set(found))
    unexpected = sorted([*(set(found) - set(expected)), *checkpoint.unexpected])
    wrong = [f"{name}: expected {expected[name]}, got {found[name].shape}"
             for name in sorted(set(expected) & set(found)) if tuple(found[name].shape) != expected[name]]
    if missing or unexpected or wrong:
        lines = [f"{checkpoint.description} ({checkpoint.format}) does not match the "
                 f"{checkpoint.vision.num_hidden_layers}-layer, width-{checkpoint.vision.hidden_size} model "
                 "its config describes:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        if wrong:
            lines.append(f"  wrong shape ({len(wrong)}): " + "; ".join(wrong))
        raise WeightsError("\n".join(lines))


def load_model(checkpoint: Checkpoint, *, dtype: torch.dtype, device: torch.device | str = "cpu",
               check_finite: bool = True) -> VisionModel:
    """Read every tensor once, cast it, and assign it into a model built on the meta device.

    Raises:
        WeightsError: a missing, unexpected, wrongly shaped or non-finite tensor.
    """
    check_tensors(checkpoint)
    model = empty_model(checkpoint.vision, checkpoint.projector)
    state: dict[str, torch.Tensor] = {}
    for name, source in checkpoint.tensors.items():
        t = source.read()
        if tuple(t.shape) != tuple(source.shape):  # a reader must never disagree with its own header
            raise WeightsError(f"{source.source_name}: header says {source.shape}, data is {tuple(t.shape)}")
        if not t.is_floating_point():
            raise WeightsError(f"{source.source_name}: expected a float tensor, found {t.dtype}")
        # max |t| is inf or NaN iff some element is: one reduction, ~5x faster than isfinite().all() on bf16
        if check_finite and t.numel() and not bool(torch.isfinite(t.abs().amax())):
            raise WeightsError(f"{source.source_name} ({name}) holds NaN or Inf values")
        state[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
