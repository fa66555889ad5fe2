"""Training checkpoints: ``weights.safetensors`` + ``config.json`` (+ ``optimizer.pt`` to resume).

config.json holds the ModelConfig, the schema (and its fingerprint), the per-attribute dims and the
training state (step, stage, history). A checkpoint is written to a temporary folder and renamed
into place, so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .. import __version__
from ..card import read_format_file
from ..errors import FgpluginError, ModelCardError
from ..schema import AttributeSchema, require_same_schema
from .base import AttributeModel
from .config import ModelConfig
from .extend import ExtendedModel
from .factory import build_extended, build_model

FORMAT = "fgplugin-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"


def save_checkpoint(
    dir: str | Path,
    model: AttributeModel,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> Path:
    """Write ``model`` (and optionally the optimiser/scheduler/scaler states) to ``dir``; returns ``dir``."""
    out = Path(dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_weights(model, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fgplugin_version": __version__,
            "variant": model.config.variant,
            "config": model.config.to_dict(),
            "schema": model.schema.to_dict(),
            "schema_fingerprint": model.schema.fingerprint(),
            "dims": dict(model.dims),
            "state": state or {},
        }
        if isinstance(model, ExtendedModel):  # what it extends, and its parts' attributes to rebuild it
            meta["extension"] = {"extends": dict(model.extends), "groups": model.groups, "own_stages": model.own_stages}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n", encoding="utf-8")
        if optimizer is not None:
            torch.save({
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
            }, tmp / OPTIMIZER_FILE)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def write_weights(model: AttributeModel, file: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The model's weights as safetensors. An extended model's parts share the base's modules: each
    shared tensor is written once, under the base's name (the first one ``named_parameters`` gives)."""
    if not isinstance(model, ExtendedModel):
        save_model(model, str(file), metadata=metadata)
        return
    save_file({k: v.contiguous() for k, v in _unique_state(model).items()}, str(file), metadata=metadata)


def read_weights(model: AttributeModel, file: str | Path, device: str = "cpu") -> None:
    """Load what ``write_weights`` wrote into a model of the same structure (strict: a missing or an
    unexpected tensor raises)."""
    if not isinstance(model, ExtendedModel):
        load_model(model, str(file), strict=True, device=device)
        return
    state = load_file(str(file), device=device)
    want = set(_unique_state(model))
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:5], sorted(set(state) - want)[:5]
        raise RuntimeError(f"missing keys {missing}, unexpected keys {extra}")
    model.load_state_dict(state, strict=False)  # the shared modules' other names are the same tensors


def _unique_state(model: AttributeModel) -> dict[str, torch.Tensor]:
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def read_checkpoint_meta(dir: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint, format-checked."""
    return read_format_file(dir, CONFIG_FILE, what="checkpoint", fmt=FORMAT, versions=(FORMAT_VERSION,),
                            required=("config", "schema"))


def load_checkpoint(
    dir: str | Path, *, map_location: str | torch.device = "cpu", schema: AttributeSchema | None = None
) -> tuple[AttributeModel, dict[str, Any]]:
    """(model in eval mode, training state) from a checkpoint folder.

    Refuses (ModelCardError) a checkpoint whose schema does not match its fingerprint or the given
    ``schema``, whose config is invalid, or whose weights do not fit the architecture the config builds.
    Trunk weight files named in the config are not needed: the checkpoint holds every weight.
    """
    d = Path(dir)
    meta = read_checkpoint_meta(d)
    try:
        config = ModelConfig.from_dict(meta["config"])
        own = AttributeSchema.from_dict(meta["schema"], source=f"{d / CONFIG_FILE}")
    except (FgpluginError, TypeError) as e:
        raise ModelCardError(f"{d}: invalid checkpoint config: {e}") from None
    if meta.get("schema_fingerprint") not in (None, own.fingerprint()):
        raise ModelCardError(f"{d}: the checkpoint's schema does not match its recorded fingerprint")
    if schema is not None:
        require_same_schema(own, schema, have_is=f"the checkpoint {d}", want_is="the data it is loaded for",
                            error=ModelCardError)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelCardError(f"{d}: checkpoint is missing {WEIGHTS_FILE}")
    build_cfg = dataclasses.replace(config, trunk_weights=None, local_trunk_weights=None)
    model = build_from_meta(build_cfg, own, meta.get("extension"), where=d)
    model.config = config
    try:
        read_weights(model, weights, device=str(map_location))
    except Exception as e:  # noqa: BLE001 - missing/unexpected keys, wrong shapes, corrupt file
        msg = " ".join(str(e).split())[:400]
        raise ModelCardError(f"{d}: weights do not fit the {config.variant} model its config describes ({msg})") from None
    if dict(meta.get("dims") or model.dims) != model.dims:
        raise ModelCardError(f"{d}: recorded dims {meta.get('dims')} differ from the model's {model.dims}")
    model.to(map_location).eval()
    return model, dict(meta.get("state") or {})


def build_from_meta(config: ModelConfig, schema: AttributeSchema, extension: dict[str, Any] | None, *,
                    where: Path | str) -> AttributeModel:
    """A freshly built model of the structure a checkpoint or an export card describes (its
    ``extension`` entry: None for a plain model), for its weights to be loaded into."""
    if extension is None:
        return build_model(config, schema)
    try:
        return build_extended(config, schema, [list(g) for g in extension["groups"]], dict(extension["extends"]),
                              extension.get("own_stages"))
    except (KeyError, TypeError) as e:
        raise ModelCardError(f"{where}: malformed extension entry ({type(e).__name__}: {e})") from None
    except FgpluginError as e:
        raise ModelCardError(f"{where}: {e}") from None


def load_training_state(dir: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                        scaler: Any = None, *, map_location: str | torch.device = "cpu") -> bool:
    """Restore optimiser (and scheduler/scaler) state saved beside a checkpoint; False if none was saved."""
    f = Path(dir) / OPTIMIZER_FILE
    if not f.is_file():
        return False
    try:
        saved = torch.load(f, map_location=map_location, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])
    except Exception as e:  # noqa: BLE001
        raise ModelCardError(f"{f}: cannot restore the optimiser state ({type(e).__name__}: {e})") from None
    return True


__all__ = ["save_checkpoint", "load_checkpoint", "load_training_state", "read_checkpoint_meta", "build_from_meta",
           "write_weights", "read_weights",
           "WEIGHTS_FILE", "CONFIG_FILE", "OPTIMIZER_FILE"]
