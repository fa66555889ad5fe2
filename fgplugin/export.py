"""Self-contained encoder exports for serving: TorchScript encoder, safetensors weights, model card.

An export directory holds::

    encoder.pt2          torch.export program of AttributeModel.embed_all with a dynamic batch
                         dimension: float32 images [B, 3, S, S], already preprocessed -> float32
                         [B, A, D], each attribute's vector L2-normalised, attributes in schema order
                         (encoder.pt, a TorchScript trace, if the model cannot be exported)
    weights.safetensors  the same weights as a plain state dict (inspectable without TorchScript)
    model_card.json      format tag and version, schema, dims, preprocessing, config, data, metrics,
                         storage note; ``version``: sha256 over the weights and the vector-defining
                         card fields (the same checkpoint re-exported keeps it, so stores do not
                         re-encode); ``integrity``: sha256 over encoder + weights + whole card,
                         checked on load so a tampered export is refused

Loading needs torch, torchvision (registers the ``roi_align`` op the ASEN_v2 local branch uses) and
this module's light neighbours (``preprocess``, ``schema``, ``catalog``, ``splits``, ``devices``): no
training or model code.

Why torch.export: it round-trips on CPU including torchvision's ``roi_align``, the batch dimension is
declared dynamic (export fails loudly instead of baking a batch size in), weights travel inside the
program, and ``torch.jit`` is deprecated in torch 2.14. If a model cannot be exported (data-dependent
control flow), it falls back to ``torch.jit.trace``. Either way the written export is checked: the
loaded encoder must reproduce the in-memory model on a batch size other than the one traced (max abs
diff <= ``VERIFY_ATOL``), or the export is refused. Programs are exported on CPU; loading on CUDA
rewrites their device constants with ``torch.export.passes.move_to_device_pass``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torchvision::roi_align for the TorchScript encoder)
from PIL import Image
from torch.export.passes import move_to_device_pass

from . import __version__
from .card import (CARD_FILE, ENCODER_FILES, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, compute_integrity, compute_version,
                   encoder_file, read_card)
from .catalog import Catalog, load_catalog
from .devices import resolve_device
from .errors import ModelCardError
from .preprocess import Preprocess
from .schema import AttributeSchema, require_same_schema
from .splits import Splits

if TYPE_CHECKING:  # annotations only: loading an export never imports model or evaluation code
    from .evaluation import EvalReport
    from .models import AttributeModel
    from .models.compact import CompactModel

TRACE_BATCH = 2
PROJECTION_METHOD = ("each attribute's vector minus its training mean, projected on its training vectors' top "
                     "principal axes (fitted on the training split), re-normalised")
VERIFY_ATOL = 1e-4


# -- writing ---------------------------------------------------------------------------------------
class _EmbedAll(torch.nn.Module):
    """What gets traced: one call -> every attribute's vector."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed_all(images)


def _write_encoder(model: torch.nn.Module, example: torch.Tensor, d: Path) -> tuple[str, str | None]:
    """Export (or, failing that, trace) ``embed_all``; returns (kind, why torch.export failed)."""
    wrapper = _EmbedAll(model).eval()
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(wrapper, (example,), dynamic_shapes={"images": {0: batch}})
        torch.export.save(program, str(d / ENCODER_FILES["torch.export"]))
        return "torch.export", None
    except Exception as e:  # noqa: BLE001 - any export failure falls back to tracing, recorded in the card
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    traced.save(str(d / ENCODER_FILES["torchscript-trace"]))
    return "torchscript-trace", reason


def _training_summary(
    catalog: Catalog | str | Path | None, state: dict[str, Any], schema: AttributeSchema
) -> dict[str, Any] | None:
    """Catalog path, item counts and label counts (of the training split when splits.json is known)."""
    if catalog is None:
        data = state.get("data") if isinstance(state, dict) else None
        return dict(data) if isinstance(data, dict) else None
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog, schema, strict=False)
    out: dict[str, Any] = {"catalog": str(catalog.path), "n_items": len(catalog)}
    items = catalog
    splits_path = catalog.base_dir / "splits.json"
    if splits_path.is_file():
        train_ids = Splits.load(splits_path).train
        have = catalog.by_id()
        items = catalog.subset([i for i in train_ids if i in have])
        out["n_train"] = len(items)
    out["label_counts"] = items.summary()["attributes"]
    return out


def _storage(names: Sequence[str], eval_report: "EvalReport | None") -> dict[str, Any]:
    max_abs = dict(eval_report.max_abs_component) if eval_report is not None else {}
    scale = {n: round(127.0 / max(float(max_abs.get(n, 1.0)), 1e-6), 4) for n in names}
    return {
        "dtype": "float32",
        # what `fgplugin index` stores unless --codec says otherwise (fgplugin.codecs: float32, float16, int8, binary)
        "codec": "float32",
        "normalised": "each attribute's vector has unit L2 norm; cosine = dot product",
        "fp16": "safe: components lie in [-1, 1]; expect ~1e-3 cosine error",
        "int8": {
            "scheme": "symmetric per attribute: q = clip(round(v * scale), -127, 127); v ~= q / scale",
            "scale": scale,
            "scale_from": "max |component| on the evaluated catalog" if max_abs else "unit-norm bound (|v_i| <= 1)",
        },
    }


def _write_card(d: Path, card: dict[str, Any]) -> None:
    card["integrity"] = ""  # marks the two-hash format (see compute_version)
    card["version"] = compute_version(d, card)
    card["integrity"] = compute_integrity(d, card)
    (d / CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n", encoding="utf-8")


def _model_card(model: "AttributeModel", encoder: dict[str, Any], embedding_dim: int, checkpoint_dir: Path,
                training: dict[str, Any] | None, eval_report: "EvalReport | None") -> dict[str, Any]:
    """The card of an export of ``model`` (without its two hashes: see ``_write_card``)."""
    names = list(model.schema.names)
    config = model.config.to_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fgplugin_version": __version__,
        "torch_version": torch.__version__,
        "variant": config.get("variant"),
        "config": config,
        "schema": model.schema.to_dict(),
        "schema_fingerprint": model.schema.fingerprint(),
        "attributes": names,
        "dims": {n: int(model.dims[n]) for n in names},
        "embedding_dim": embedding_dim,
        # whether each vector ends with the slack value that a query drops (fgplugin.similarity)
        "query_slack": model.query_slack,
        "preprocess": model.preprocess.to_dict(),
        "encoder": encoder,
        "weights": {"file": WEIGHTS_FILE, "format": "safetensors", "keys": "AttributeModel.state_dict()"},
        "checkpoint": str(checkpoint_dir),
        "training": training,
        "metrics": eval_report.to_dict() if eval_report is not None else None,
        "storage": _storage(names, eval_report),
    }


def _encoder_entry(kind: str, export_failure: str | None, size: int) -> dict[str, Any]:
    return {
        "file": ENCODER_FILES[kind],
        "kind": kind,
        "torch_export_failure": export_failure,
        "input": f"float32 [B, 3, {size}, {size}], preprocessed as in 'preprocess'",
        "output": "float32 [B, A, D]; attribute i is output[:, i, :dims[name]]",
    }


def _refuse_foreign_folder(out: Path) -> None:
    """An existing export at ``out`` may be replaced; any other file or non-empty folder may not."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CARD_FILE).is_file())):
        raise ModelCardError(f"{out}: exists and is not an fgplugin export; choose an empty or new folder")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into: it replaces ``out`` when the block succeeds and is
    removed when it fails, so ``out`` never holds half an export."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _verify(d: Path, schema: AttributeSchema, probe: torch.Tensor, expected: torch.Tensor,
            checkpoint_dir: str | Path, variant: str | None) -> None:
    """The written artifact (not the in-memory trace) must reproduce the model on ``probe``."""
    got = ExportedEncoder.load(d, schema=schema, device="cpu").embed_all(probe)
    diff = float((got - expected).abs().max())
    if not diff <= VERIFY_ATOL:
        raise ModelCardError(
            f"export of {checkpoint_dir} does not reproduce the model (max abs diff {diff:.2e} > "
            f"{VERIFY_ATOL:g}); the {variant} model may not be traceable"
        )


def export_model(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    eval_report: "EvalReport | None" = None,
    catalog: Catalog | str | Path | None = None,
    compact: "CompactModel | None" = None,
) -> Path:
    """Write an export of the checkpoint in ``checkpoint_dir`` to ``out_dir``; returns ``out_dir``.

    ``eval_report`` (from :func:`fgplugin.evaluation.evaluate`) is recorded as the card's metrics;
    ``catalog`` (the training catalog) gives the training data summary; ``compact`` (the checkpoint's
    model with a fitted projection, ``fgplugin.training.compact.compact_model``) is exported instead of
    the full-size model, and the card's ``compact`` entry says how it was fitted. An existing export at
    ``out_dir`` is replaced; any other non-empty folder there is refused.
    """
    # local: the model code is needed to write an export, never to load one (serving imports this
    # module without the training stack; tests/test_export.py checks it in a fresh process)
    from .models import load_checkpoint, read_checkpoint_meta
    from .models.checkpoint import write_weights

    out = Path(out_dir)
    _refuse_foreign_folder(out)
    if compact is None:
        model, state = load_checkpoint(checkpoint_dir, map_location="cpu")
    else:  # the checkpoint's model with its projection, loaded by the caller (the training data come from ``catalog``)
        model, state = compact, {}
    model = model.eval().float()
    size = model.preprocess.image_size
    torch.manual_seed(0)
    example = torch.randn(TRACE_BATCH, 3, size, size)
    with _staging(out) as tmp:
        kind, export_failure = _write_encoder(model, example, tmp)
        with torch.no_grad():
            probe = torch.randn(TRACE_BATCH + 1, 3, size, size)  # a batch size the trace never saw
            expected = model.embed_all(probe)
        write_weights(model, tmp / WEIGHTS_FILE)
        card = _model_card(model, _encoder_entry(kind, export_failure, size), int(expected.shape[-1]),
                           Path(checkpoint_dir), _training_summary(catalog, state, model.schema), eval_report)
        extension = read_checkpoint_meta(checkpoint_dir).get("extension")
        # `fgplugin train --extend`: what it extends (card.extension_of) and its parts; not for a compact
        # export, whose projection (fitted anew) changes the base attributes' vectors too
        if extension and compact is None:
            card["extends"] = {**extension["extends"], "groups": extension["groups"],
                               "own_stages": extension.get("own_stages")}
        if compact is not None:  # what the stores' vectors are: a projection of the full-size model's
            card["compact"] = {**compact.projection_info, "method": PROJECTION_METHOD}
        _write_card(tmp, card)
        _verify(tmp, model.schema, probe, expected, checkpoint_dir, card["variant"])
    return out


# -- loading ---------------------------------------------------------------------------------------
def _check_contents(d: Path, card: dict[str, Any], program: str) -> None:
    """The export's files are all there and are the ones its card was written for (version, integrity)."""
    for name in (program, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise ModelCardError(f"{d}: export is missing {name}")
    checks = [("version", compute_version(d, card))]
    if "integrity" in card:
        checks.append(("integrity", compute_integrity(d, card)))
    for key, actual in checks:
        if actual != card[key]:
            raise ModelCardError(
                f"{d}: contents do not match the card's {key} {str(card[key])[:12]} (got {actual[:12]}); "
                "the export was modified after it was written, re-export it"
            )


def _load_module(file: Path, dev: torch.device) -> Any:
    """The encoder program (torch.export) or trace (TorchScript) in ``file``, ready on ``dev``."""
    try:
        if file.name == ENCODER_FILES["torch.export"]:
            program = torch.export.load(str(file))
            if dev.type != "cpu":
                program = move_to_device_pass(program, dev)
            return program.module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(file), map_location=dev)
        module.eval()
        return module
    except Exception as e:  # noqa: BLE001 - corrupt file, unknown op, ...
        raise ModelCardError(f"{file}: cannot load the encoder ({type(e).__name__}: {e})") from None


class ExportedEncoder:
    """An export loaded for serving: images in, one float32 vector per attribute out."""

    def __init__(self, path: Path, card: dict[str, Any], module: Any, device: torch.device):
        self.path = path
        self.card = card
        self.module = module
        self.device = device
        self.schema = AttributeSchema.from_dict(card["schema"], source=f"{path}/{CARD_FILE}")
        self.attributes: list[str] = list(card["attributes"])
        self.dims: dict[str, int] = {k: int(v) for k, v in card["dims"].items()}
        self.version: str = card["version"]
        self.preprocess = Preprocess.from_dict(card["preprocess"])
        # posterior = prob: each vector ends with the slack value a query drops (fgplugin.similarity)
        self.query_slack: bool = bool(card.get("query_slack", False))  # cards before it: never

    @classmethod
    def load(
        cls, path: str | Path, *, schema: AttributeSchema | None = None, device: str | torch.device = "auto"
    ) -> "ExportedEncoder":
        """Load an export. ``schema``: refuse the export unless it was trained for this schema."""
        d = Path(path)
        card = read_card(d)
        program = encoder_file(card)
        _check_contents(d, card, program)
        own = AttributeSchema.from_dict(card["schema"], source=f"{d}/{CARD_FILE}")
        if own.fingerprint() != card.get("schema_fingerprint", own.fingerprint()):
            raise ModelCardError(f"{d}: card schema does not match its recorded fingerprint")
        if own.names != list(card["attributes"]) or set(card["dims"]) != set(own.names):
            raise ModelCardError(f"{d}: card attributes/dims do not match its schema")
        if schema is not None:
            require_same_schema(own, schema, have_is=f"the export {d}", want_is="the data it is loaded for",
                                error=ModelCardError)
        dev = resolve_device(device)
        return cls(d, card, _load_module(d / program, dev), dev)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        s = self.preprocess.image_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, s, s):
            raise ModelCardError(f"encoder input must be [B, 3, {s}, {s}]; got {list(batch.shape)}")
        with torch.no_grad():
            return self.module(batch.to(self.device, torch.float32)).float().cpu()

    def embed_all(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [B, A, D] (the evaluation code's common interface with AttributeModel)."""
        return self._forward(images)

    def encode_tensors(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """Preprocessed images [B, 3, S, S] -> {attribute: float32 [B, dims[attribute]]}."""
        out = self._forward(batch).numpy()
        return {n: np.ascontiguousarray(out[:, i, : self.dims[n]], dtype=np.float32) for i, n in enumerate(self.attributes)}

    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> dict[str, np.ndarray]:
        """PIL images -> {attribute: float32 [B, dims[attribute]]}, preprocessed as the card says."""
        parts = [self.encode_tensors(self.preprocess.batch(list(images[i:i + batch_size])))
                 for i in range(0, len(images), batch_size)]
        if not parts:
            return {n: np.zeros((0, self.dims[n]), np.float32) for n in self.attributes}
        return {n: np.concatenate([p[n] for p in parts]) for n in self.attributes}

    def __repr__(self) -> str:
        return f"ExportedEncoder({self.path}, variant={self.card.get('variant')}, version={self.version[:12]})"


__all__ = ["ExportedEncoder", "export_model", "read_card", "compute_version", "compute_integrity", "FORMAT", "FORMAT_VERSION"]
