"""The model card of an export (``model_card.json``): its format, how an export's ``version`` and
``integrity`` hashes are computed, and reading a card. Light on purpose (json and hashlib): the
OpenSearch setup and any client read cards without loading torch; ``fgplugin.export`` writes and
loads whole exports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import ModelCardError

FORMAT = "fgplugin-encoder"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
CARD_FILE = "model_card.json"
ENCODER_FILES = {"torch.export": "encoder.pt2", "torchscript-trace": "encoder.pt"}
WEIGHTS_FILE = "weights.safetensors"


# -- hashing ---------------------------------------------------------------------------------------
# Two hashes. ``version`` identifies the vectors: the weights and the card fields that decide what an
# image maps to. Re-exporting the same checkpoint (new date, fresh metrics) keeps it, so a store does
# not re-encode a catalog for nothing. ``integrity`` covers every byte (encoder, weights, whole card)
# and is checked on load, so a modified export is refused.
VERSION_FIELDS = ("format", "format_version", "variant", "config", "schema", "attributes", "dims",
                  "embedding_dim", "preprocess", "extends")  # "extends": only on extended models' cards


def _canonical(card: dict[str, Any], keys: Sequence[str] | None = None) -> bytes:
    body = {k: v for k, v in card.items() if k not in ("version", "integrity") and (keys is None or k in keys)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def encoder_file(card: dict[str, Any]) -> str:
    enc = card.get("encoder") if isinstance(card.get("encoder"), dict) else {}
    kind = enc.get("kind")
    if kind not in ENCODER_FILES or enc.get("file") != ENCODER_FILES[kind]:
        raise ModelCardError(f"model card names an unknown encoder {enc!r} (known kinds: {', '.join(ENCODER_FILES)})")
    return ENCODER_FILES[kind]


def _hash_files(d: Path, names: Sequence[str], extra: bytes) -> str:
    h = hashlib.sha256()
    for name in names:
        with (d / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(extra)
    return h.hexdigest()


def compute_version(export_dir: str | Path, card: dict[str, Any]) -> str:
    """The model's identity: sha256 over the weights file and the card's vector-defining fields.

    Exports written before ``integrity`` existed hashed everything into ``version``; those are still
    verified that way.
    """
    d = Path(export_dir)
    if "integrity" not in card:  # an older export
        return _hash_files(d, (encoder_file(card), WEIGHTS_FILE), _canonical(card))
    return _hash_files(d, (WEIGHTS_FILE,), _canonical(card, VERSION_FIELDS))


def compute_integrity(export_dir: str | Path, card: dict[str, Any]) -> str:
    """sha256 over the encoder file, the weights file and the whole card (sans the two hashes)."""
    return _hash_files(Path(export_dir), (encoder_file(card), WEIGHTS_FILE), _canonical(card))


def read_format_file(folder: str | Path, name: str, *, what: str, fmt: str, versions: Sequence[int],
                     required: Sequence[str]) -> dict[str, Any]:
    """The JSON header file ``name`` of an fgplugin folder (an export's card, a checkpoint's config),
    refused (ModelCardError naming the file) unless it is there, parses, carries format ``fmt`` in one of
    ``versions`` and has every ``required`` key."""
    d = Path(folder)
    f = d / name
    if not f.is_file():
        raise ModelCardError(f"{d}: no {name}; not an fgplugin {what}")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelCardError(f"{f}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else None
        raise ModelCardError(f"{f}: not an fgplugin {what} (format {got!r}, expected {fmt!r})")
    if data.get("format_version") not in versions:
        raise ModelCardError(
            f"{f}: format_version {data.get('format_version')!r} is not supported by fgplugin {__version__} "
            f"(supported: {', '.join(map(str, versions))}); {'re-export' if what == 'export' else 'retrain'} "
            "or upgrade fgplugin")
    for key in required:
        if key not in data:
            raise ModelCardError(f"{f}: the {what}'s {name} lacks {key!r}")
    return data


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of an export folder, format-checked (no hash check; see ExportedEncoder.load)."""
    return read_format_file(path, CARD_FILE, what="export", fmt=FORMAT, versions=SUPPORTED_FORMAT_VERSIONS,
                            required=("schema", "attributes", "dims", "preprocess", "version"))


def extension_of(card: dict[str, Any]) -> tuple[str | None, list[str], list[str]] | None:
    """What an export made by ``fgplugin train --extend`` extends, from its card: (the base export's
    ``version``, None when it was extended from a training checkpoint; the base's attributes, in
    order; the attributes it added, in order), or None for a model that extends nothing.

    The extended model gives the base attributes bit-identical vectors, so a store indexed with the
    base ``version`` needs only the added attributes' vectors. Refuses (ModelCardError) an entry that
    does not fit the card's own attribute list."""
    ext = card.get("extends")
    if ext is None:
        return None
    attributes = list(card.get("attributes") or [])
    try:
        version, base, added = ext.get("version"), list(ext["attributes"]), list(ext["added"])
    except (AttributeError, KeyError, TypeError):
        raise ModelCardError(f"model card: malformed 'extends' entry {ext!r}") from None
    if (version is not None and not isinstance(version, str)) or not added or attributes != base + added:
        raise ModelCardError(f"model card: 'extends' (base {base}, added {added}) does not fit the card's "
                             f"attributes {attributes}")
    return version, base, added
