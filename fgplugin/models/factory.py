"""Building a model from its config: the table of variant name -> model class, declared once here.

``config.VARIANTS`` holds the names (a config is validated without importing the models); this table
says which class each name builds, in the same order.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from ..schema import AttributeSchema
from .base import AttributeModel
from .config import ModelConfig
from .variants import AGMLAN, ASEN, CSN, GlobalEmbedding, MultiTaskClassifier

ModelBuilder = Callable[[ModelConfig, AttributeSchema], AttributeModel]

MODELS: dict[str, ModelBuilder] = {
    "asen_v2": partial(ASEN, local=True),
    "asen": partial(ASEN, local=False),
    "csn": CSN,
    "ag_mlan": AGMLAN,
    "global": GlobalEmbedding,
    "mtc": MultiTaskClassifier,
}


def build_model(config: ModelConfig, schema: AttributeSchema) -> AttributeModel:
    """A freshly initialised model of ``config.variant`` for ``schema`` (trunk weights from config)."""
    config.validate()  # an unknown variant is refused here, by name
    return MODELS[config.variant](config, schema)


__all__ = ["MODELS", "ModelBuilder", "build_model"]
