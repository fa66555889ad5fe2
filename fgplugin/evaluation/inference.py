"""Running an encoder for evaluation: where it runs, in eval mode, what it is, and whether it can show
its attention.

Two kinds of encoder are evaluated (``fgplugin.encoding.Encoder``): a training model
(``fgplugin.models.AttributeModel``, a torch module that is moved to the requested device and put in
eval mode for the run) and a loaded export (runs where it was loaded). Only a training model keeps its
attention branch: ``fgplugin.encoding.AttentionModel`` declares that capability.
"""

from __future__ import annotations


import torch

from ..devices import resolve_device
from ..encoding import AttentionModel, DeployedEncoder, Encoder
from ..models import AttributeModel

__all__ = ["AttentionModel", "EvalMode", "run_device", "variant_of"]


def run_device(model: Encoder, device: str | torch.device) -> torch.device:
    """Where ``model`` runs for an evaluation: a torch module (a training model) runs on ``device``
    ("auto": CUDA if there is one); an export runs where it was loaded."""
    if isinstance(model, torch.nn.Module):
        return resolve_device(device)
    return model.device


def variant_of(model: Encoder) -> str | None:
    """The model variant (``asen_v2``, ``csn``...): from a training model's config or an export's card."""
    if isinstance(model, AttributeModel):
        return model.config.variant
    if isinstance(model, DeployedEncoder):
        return model.card.get("variant")
    return None


class EvalMode:
    """``with EvalMode(model, device):`` a torch module on ``device`` in eval mode, its training flag
    restored afterwards; anything else (an export) is left as it is."""

    def __init__(self, model: object, device: torch.device):
        self.model, self.device = model, device
        self.was_training = False

    def __enter__(self) -> "EvalMode":
        if isinstance(self.model, torch.nn.Module):
            self.was_training = self.model.training
            self.model.to(self.device).eval()
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.model, torch.nn.Module) and self.was_training:
            self.model.train()
