"""Getting what an evaluation (or a query by a training checkpoint) works on: an encoder from a training
run/checkpoint folder or from an export, and a catalog with its splits and (generated data) boxes; the
model `train --extend` starts from.
Returns data; never prints (the caller reports ``catalog.problems``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch

from .card import CARD_FILE, WEIGHTS_FILE
from .catalog import Catalog, find_schema, load_catalog
from .encoding import Encoder
from .errors import FgpluginError, ModelCardError
from .export import ExportedEncoder
from .models import AttributeModel, ModelConfig, load_checkpoint
from .models.checkpoint import build_from_meta, read_weights
from .schema import AttributeSchema, require_same_schema
from .splits import Splits
from .synth import load_boxes

CHECKPOINT_SUBFOLDERS = ("best", "last", "checkpoint", "final")  # where a run folder keeps its checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (config.json + weights), or a run folder holding best/ or last/ ones."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    for sub in CHECKPOINT_SUBFOLDERS:
        if (p / sub / "config.json").is_file():
            return p / sub
    raise FgpluginError(f"{p}: no checkpoint here (expected config.json, or best/ or last/ inside a run folder)")


def load_encoder(checkpoint: str | Path | None = None, export_dir: str | Path | None = None, *,
                 device: str | torch.device = "auto") -> Encoder:
    """The training model of a run/checkpoint folder (loaded on CPU; evaluation moves it), or the
    export in ``export_dir`` loaded on ``device``. Exactly one of the two is given."""
    if (checkpoint is None) == (export_dir is None):
        raise FgpluginError("give exactly one of --checkpoint RUN_DIR or --model EXPORT_DIR")
    if export_dir is not None:
        return ExportedEncoder.load(export_dir, device=device)
    model, _ = load_checkpoint(resolve_checkpoint(checkpoint), map_location="cpu")
    return model


def load_extension_base(path: str | Path) -> tuple[AttributeModel, str | None]:
    """The model ``fgplugin train --extend PATH`` extends, on CPU in eval mode, and its export's card
    ``version`` (None for a checkpoint or run folder). An export is checked whole first (its version
    and integrity hashes, its encoder loads), so a damaged one is refused, not extended."""
    p = Path(path)
    if not (p / CARD_FILE).is_file():
        model, _ = load_checkpoint(resolve_checkpoint(p), map_location="cpu")
        return model, None
    enc = ExportedEncoder.load(p, device="cpu")
    card = enc.card
    if card.get("compact"):
        raise ModelCardError(f"{p}: a compact export (--dim {card['compact'].get('dim')}) cannot be extended; extend "
                             "the full-size export or its checkpoint, then export the extension with --dim")
    try:
        config = ModelConfig.from_dict(card["config"])
    except (FgpluginError, TypeError, KeyError) as e:
        raise ModelCardError(f"{p}: the card's config cannot be read ({e})") from None
    ext = card.get("extends")
    extension = None if ext is None else {"extends": {k: ext.get(k) for k in ("version", "attributes", "added")},
                                          "groups": ext.get("groups"), "own_stages": ext.get("own_stages")}
    model = build_from_meta(dataclasses.replace(config, trunk_weights=None, local_trunk_weights=None), enc.schema,
                            extension, where=p)
    model.config = config
    try:
        read_weights(model, p / WEIGHTS_FILE)
    except Exception as e:  # noqa: BLE001 - missing/unexpected keys, wrong shapes
        msg = " ".join(str(e).split())[:300]
        raise ModelCardError(f"{p}: its {WEIGHTS_FILE} does not fit the {config.variant} model its card describes "
                             f"({msg})") from None
    return model.eval(), enc.version


class EvalData(NamedTuple):
    """What an evaluation runs on; ``catalog.problems`` lists the rows that were skipped."""

    catalog: Catalog
    splits: Splits
    boxes: dict[str, dict] | None  # ground-truth boxes of generated data (boxes.jsonl), else None


def load_eval_data(catalog: str | Path, schema_path: str | Path | None, splits_path: str | Path | None,
                   model: Encoder) -> EvalData:
    """The catalog read with the model's schema (a schema file beside it, or ``schema_path``, must be
    the model's), its splits (default: splits.json beside it) and boxes.jsonl if there is one."""
    catalog = Path(catalog)
    try:
        declared = AttributeSchema.load(schema_path or find_schema(catalog))
    except FgpluginError:
        if schema_path is not None:
            raise
        declared = None
    if declared is not None:
        require_same_schema(model.schema, declared, have_is="the model", want_is=f"the catalog {catalog}",
                            error=ModelCardError)
    cat = load_catalog(catalog, model.schema, strict=False)
    splits = Splits.load(splits_path or catalog.parent / "splits.json")
    boxes = load_boxes(catalog.parent) if (catalog.parent / "boxes.jsonl").is_file() else None
    return EvalData(cat, splits, boxes)
