"""`fgplugin train --extend`: teach a trained model new attributes with everything it has frozen.

The base model (from its export or a checkpoint, loaded by ``fgplugin.loading.load_extension_base``)
is wrapped in an ``ExtendedModel`` (fgplugin.models.extend) whose new part learns only what the new
attributes need; the ordinary trainer runs it (samplers, budget, progress, validation, resume). It
trains on the rows that carry a new attribute's label (partial labels are the normal case): the base
attributes' labels are left out of the training catalog, so every triplet, loss and validation MAP is
about the new attributes, and the base's vectors stay bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..catalog import Catalog, CatalogItem, find_schema, load_catalog
from ..errors import ModelCardError
from ..models import AttributeModel, ModelConfig, apply_overrides, read_checkpoint_meta
from ..models.config import ConfigError
from ..models.extend import ExtensionError, extended_schema
from ..models.factory import build_extension
from ..progress import OnProgress
from ..schema import AttributeSchema
from ..splits import Splits
from .trainer import LAST, OnStep, TrainResult, train

SCHEMA_FILE = "schema.toml"  # the extended schema, written into the run folder (for eval --schema)


def extension_config(base: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    """The base's config with training ``overrides`` (steps, lr, batch size, ...): the model's own
    keys stay the base's, and the proxy/classifier term keeps its on/off state (it shapes the parts)."""
    config = apply_overrides(base, overrides)
    changed = sorted(k for k, v in config.model_fields().items() if base.model_fields().get(k) != v)
    if changed:
        raise ConfigError(f"an extension keeps the base model's architecture; drop --set {', '.join(changed)}")
    if (config.train.cls_weight > 0) != (base.train.cls_weight > 0):
        raise ConfigError(f"the base model was trained with cls_weight {base.train.cls_weight}; an extension "
                          "cannot switch the classifier term on or off")
    return config


def training_catalog(catalog: Catalog, schema: AttributeSchema, added: list[str]) -> Catalog:
    """``catalog``'s rows under the extended ``schema``, labelled with the new attributes only."""
    items = [CatalogItem(it.id, it.image, {n: (it.labels.get(n) if n in added else None) for n in schema.names},
                         dict(it.metadata), it.row) for it in catalog]
    return Catalog(catalog.path, schema, items, dict(catalog.metadata_types), list(catalog.problems),
                   list(catalog.notes))


def _check_labels(catalog: Catalog, splits: Splits, added: list[str]) -> None:
    """Each new attribute needs training triplets: a value with two labelled items and a second value."""
    have = catalog.by_id()
    rows = [have[i] for i in splits.train if i in have]
    for n in added:
        counts: dict[str, int] = {}
        for it in rows:
            v = it.labels.get(n)
            if v is not None and v != catalog.schema[n].not_visible:
                counts[v] = counts.get(v, 0) + 1
        if len(counts) < 2 or max(counts.values()) < 2:
            raise ExtensionError(
                f"attribute {n!r} has {sum(counts.values())} labelled training items over {len(counts)} value(s) "
                f"in {catalog.path}; it needs two visible values, one of them on two or more items")


def _check_same_extension(out: Path, extends: dict[str, Any], own_stages: list[int | None]) -> None:
    """A run resumed with --extend must extend the same base with the same attributes and structure."""
    last = out / LAST
    if not (last / "config.json").is_file():
        return
    meta = read_checkpoint_meta(last).get("extension") or {}
    had = meta.get("extends")
    if had != extends:
        raise ModelCardError(f"{last}: the run {'extends ' + str(had) if had else 'is not an extension'}; "
                             f"this call extends {extends}; use a new --out folder")
    had_own = meta.get("own_stages") or [None] * len(own_stages)
    if had_own != own_stages:
        raise ModelCardError(f"{last}: the run's new part owns trunk stages {had_own[-1]} (None: shares them), "
                             f"this call's {own_stages[-1]} (train.extend_last_stage, train.freeze_stages); "
                             "resume with the run's settings or use a new --out folder")


def extend(
    base: AttributeModel,
    base_version: str | None,
    catalog: str | Path,
    attributes: list[str],
    out_dir: str | Path,
    *,
    schema: str | Path | None = None,
    splits: Splits | str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    budget_s: float | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    validate: bool = True,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> TrainResult:
    """Train the new ``attributes`` (declared with their values in the catalog's schema file, or in
    ``schema``) on top of ``base`` into the run folder ``out_dir``; ``base_version`` is the base
    export's card version (None when ``base`` comes from a checkpoint). The rest as ``train``."""
    catalog = Path(catalog)
    schema_path = Path(schema) if schema is not None else find_schema(catalog)
    declared = AttributeSchema.load(schema_path)
    ext = extended_schema(base.schema, declared, list(attributes), catalog_is=f"the schema {schema_path}")
    config = extension_config(base.config, overrides)
    full = load_catalog(catalog, declared)
    if splits is None:
        splits = full.base_dir / "splits.json"
    if not isinstance(splits, Splits):
        splits = Splits.load(splits)
    _check_labels(full, splits, list(attributes))
    torch.manual_seed(config.train.seed)  # the new part's initialisation
    np.random.seed(config.train.seed % (2**32))
    model = build_extension(base, ext, {"version": base_version, "attributes": base.schema.names,
                                        "added": list(attributes)},
                            own_stages=config.train.freeze_stages if config.train.extend_last_stage else None,
                            stages_from=config.train.extend_stage_start)
    model.config = config
    out = Path(out_dir)
    if resume:
        _check_same_extension(out, model.extends, model.own_stages)
    result = train(config, training_catalog(full, ext, list(attributes)), splits, out, budget_s=budget_s,
                   device=device, resume=resume, validate=validate, on_step=on_step, on_progress=on_progress,
                   start=model)
    ext.save(out / SCHEMA_FILE)
    for v in result.validations:  # the base attributes' labels were left out: no MAP to report for them
        v["per_attribute"] = {n: m for n, m in v["per_attribute"].items() if n in attributes}
    return result


__all__ = ["extend", "extension_config", "training_catalog", "SCHEMA_FILE"]
