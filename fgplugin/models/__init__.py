"""Attribute-specific embedding models: configs, trunks, the variants, their losses, and checkpoints.

    config = load_config("asen_v2", {"trunk": "resnet18", "image_size": 128})
    model = build_model(config, schema)
    vecs = model.embed_all(images)            # [B, A, D], each attribute's vector L2-normalised
    save_checkpoint(run / "last", model)
    model, state = load_checkpoint(run / "last")

Layers, lowest first: config, vectors, losses and trunks (+ pretrained, which registers the
EfficientNet-Lite trunks) -> base (the AttributeModel interface) -> variants -> factory (build_model)
-> checkpoint. Nothing here imports fgplugin.training.
"""

from __future__ import annotations

from . import pretrained  # noqa: F401 - registers the EfficientNet-Lite trunks
from .base import AttributeModel
from .checkpoint import load_checkpoint, load_training_state, read_checkpoint_meta, save_checkpoint
from .config import VARIANTS, ConfigError, ModelConfig, TrainConfig, apply_overrides, load_config, parse_overrides
from .factory import MODELS, build_model
from .trunks import TRUNKS, Trunk, TrunkError, build_trunk, register_trunk, trunk_names

__all__ = [
    "AttributeModel", "ModelConfig", "TrainConfig", "ConfigError", "VARIANTS", "MODELS", "load_config",
    "apply_overrides", "parse_overrides", "build_model", "save_checkpoint", "load_checkpoint",
    "load_training_state", "read_checkpoint_meta", "Trunk", "TrunkError", "TRUNKS", "build_trunk",
    "register_trunk", "trunk_names",
]
