"""Vector helpers shared by the models and their losses: unit normalisation, a classifier posterior as a
unit vector, zero padding to the common width."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def posterior_vector(logits: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """Logits [..., V] -> the posterior as a unit vector (``ModelConfig.posterior``): softmax / |softmax|,
    sqrt(softmax), or prob: [softmax, sqrt(1 - |softmax|^2)], [..., V + 1], whose last (slack) value
    a query drops (``fgplugin.similarity``)."""
    p = torch.softmax(logits.float(), dim=-1)
    if kind == "sqrt":
        return p.clamp_min(0).sqrt()
    if kind == "prob":
        return torch.cat([p, (1 - (p * p).sum(-1, keepdim=True)).clamp_min(0).sqrt()], dim=-1)
    return l2n(p)


def pad_to(x: torch.Tensor, d: int) -> torch.Tensor:
    """Zero-pad the last dim of ``x`` to ``d`` (no-op when already ``d``)."""
    return F.pad(x, (0, d - x.shape[-1])) if x.shape[-1] < d else x


__all__ = ["l2n", "posterior_vector", "pad_to"]
