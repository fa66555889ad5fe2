"""Attribute-specific embedding models: configs, trunks, the variants, and checkpoints.

    config = load_config("asen_v2", {"trunk": "resnet18", "image_size": 128})
    model = build_model(config, schema)
    vecs = model.embed_all(images)            # [B, A, D], each attribute's vector L2-normalised
    save_checkpoint(run / "last", model)
    model, state = load_checkpoint(run / "last")
"""

from __future__ import annotations

from ..schema import AttributeSchema
from .base import AttributeModel
from .checkpoint import load_checkpoint, load_training_state, read_checkpoint_meta, save_checkpoint
from .config import VARIANTS, ConfigError, ModelConfig, TrainConfig, apply_overrides, load_config, parse_overrides
from .trunks import TRUNKS, Trunk, TrunkError, build_trunk, register_trunk, trunk_names


def build_model(config: ModelConfig, schema: AttributeSchema) -> AttributeModel:
    """A freshly initialised model of ``config.variant`` for ``schema`` (trunk weights from config)."""
    from .variants import build_variant

    config.validate()
    return build_variant(config, schema)


__all__ = [
    "AttributeModel", "ModelConfig", "TrainConfig", "ConfigError", "VARIANTS", "load_config", "apply_overrides",
    "parse_overrides", "build_model", "save_checkpoint", "load_checkpoint", "load_training_state",
    "read_checkpoint_meta", "Trunk", "TrunkError", "TRUNKS", "build_trunk", "register_trunk", "trunk_names",
]
