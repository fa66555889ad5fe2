"""Building a model from its config: the table of variant name -> model class, declared once here.

``config.VARIANTS`` holds the names (a config is validated without importing the models); this table
says which class each name builds, in the same order.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

from ..schema import AttributeSchema
from .base import AttributeModel
from .config import ModelConfig
from .extend import ExtendedModel, ExtensionError, extend_model, sub_schema
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


def build_extension(base: AttributeModel, schema: AttributeSchema, extends: dict[str, Any],
                    own_stages: int | None = None, stages_from: str = "base") -> ExtendedModel:
    """``base`` extended to ``schema`` (its attributes, then ``extends["added"]``): the new attributes'
    part freshly initialised (seed it before), everything of ``base`` shared and frozen; with
    ``own_stages`` = n, the part trains copies of its last trunk stages not among the first n, from
    the base's weights (``stages_from`` = "base") or from the trunks' own ("weights": the config's
    trunk weights files, as training from the start would; random where it names none)."""
    added = list(extends["added"])
    if schema.names != [*base.schema.names, *added]:
        raise ExtensionError(f"the extended schema {schema.names} is not the base's {base.schema.names} "
                             f"followed by {added}")
    if stages_from not in ("base", "weights"):
        raise ExtensionError(f"the extension's own stages start from 'base' or 'weights', not {stages_from!r}")
    part_schema = sub_schema(schema, added)
    source = build_model(base.config, part_schema) if own_stages is not None and stages_from == "weights" else None
    return extend_model(base, schema, build_model(_untrunked(base.config), part_schema), extends,
                        own_stages=own_stages, stages_from=source)


def _untrunked(config: ModelConfig) -> ModelConfig:
    # A part's own trunks are replaced by the base's (share_from): never load weight files for them.
    return dataclasses.replace(config, trunk_weights=None, local_trunk_weights=None)


def build_extended(config: ModelConfig, schema: AttributeSchema, groups: list[list[str]],
                   extends: dict[str, Any], own_stages: list[int | None] | None = None) -> ExtendedModel:
    """The structure of a saved extended model (weights to be loaded): its base for ``groups[0]``, a
    part for each later group of attribute names, with the trunk stages it owns (``own_stages``, per
    part; None: every part shares them, as extensions saved before parts could own stages)."""
    if len(groups) < 2 or [n for g in groups for n in g] != schema.names:
        raise ExtensionError(f"extension groups {groups} do not partition the schema's attributes {schema.names}")
    own_stages = [None] * (len(groups) - 1) if own_stages is None else list(own_stages)
    if len(own_stages) != len(groups) - 1:
        raise ExtensionError(f"{len(groups) - 1} extension parts but {len(own_stages)} own-stage entries")
    root = build_model(config, sub_schema(schema, groups[0]))
    for i, g in enumerate(groups[1:]):
        done = [n for gg in groups[:i + 2] for n in gg]
        root = extend_model(root, sub_schema(schema, done), build_model(_untrunked(config), sub_schema(schema, g)),
                            extends if i == len(groups) - 2 else {"attributes": done[:-len(g)], "added": g},
                            own_stages=own_stages[i])
    return root  # type: ignore[return-value]


__all__ = ["MODELS", "ModelBuilder", "build_model", "build_extension", "build_extended"]
