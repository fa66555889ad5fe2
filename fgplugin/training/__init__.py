"""Training: triplet losses, samplers and the trainer behind `fgplugin train`.

    from fgplugin.training import train
    result = train(load_config("asen_v2", {...}), catalog, splits, "runs/asen_v2", budget_s=600)
"""

from __future__ import annotations

from typing import Any

__all__ = ["train", "TrainResult", "parse_budget"]


def __getattr__(name: str) -> Any:
    # Lazy: the models import training.losses, and the trainer imports the models.
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
