"""Training: triplet samplers and the trainer behind `fgplugin train` (the losses live with the models,
in fgplugin.models.losses).

    from fgplugin.training import train
    result = train(load_config("asen_v2", {...}), catalog, splits, "runs/asen_v2", budget_s=600)
"""

from __future__ import annotations

from .trainer import TrainResult, parse_budget, train

__all__ = ["train", "TrainResult", "parse_budget"]
