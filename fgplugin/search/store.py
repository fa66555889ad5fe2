"""The one small interface every vector store implements.

Data flows one way: catalog -> encoder -> store -> query. A store keeps, per document (id = catalog
id): one unit vector per attribute, the typed metadata, the model version that produced the vectors
and a fingerprint of what the document was built from (``image_key``: the image source, plus size and
mtime for a local file; ``meta_key``: a hash of the metadata as stored). A resumed or repeated index
run skips what is already current, re-encodes documents whose model or image changed, and rewrites
only the metadata of documents whose catalog metadata changed (``fgplugin.indexer``).
"""

from __future__ import annotations

import abc
import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..catalog import coerce
from ..codecs import INT8_DEFAULT_SCALE, check_codec, decode, stored_codec, uses_scales
from ..errors import QueryError, StoreError
from ..images import is_url
from ..schema import AttributeSchema, require_same_schema
from ..similarity import query_form
from .spec import QuerySpec, SearchResult


@dataclass(frozen=True)
class IndexLayout:
    """What an index holds, derived from the schema and the model card."""

    schema: AttributeSchema
    dims: dict[str, int]  # vector size per attribute, from the model card
    metadata_types: dict[str, str]  # field -> keyword | text | float | integer | boolean | date
    model_version: str  # model card version hash
    # posterior = prob models: every vector ends with a slack value that a query drops (fgplugin.similarity)
    query_slack: bool = False
    codec: str = "float32"  # how the vectors are stored (fgplugin.codecs): float32 | float16 | int8 | binary
    scales: dict[str, float] = field(default_factory=dict)  # int8 and binary: the int8 scale per attribute
    # OpenSearch: the (attribute, size) blocks of the concatenated field emb_all where they are not the layout's
    # attributes (an index extended in place keeps emb_all as created; fgplugin.opensearch.mapping). Empty: all.
    combined: tuple[tuple[str, int], ...] = ()
    # Attributes removed by ``Store.drop_attribute``: queries naming them are refused (``refuse_dropped``), and
    # ``dropped_from`` is the model version whose vectors the documents hold for the other attributes.
    dropped: tuple[str, ...] = ()
    dropped_from: str = ""

    def __post_init__(self) -> None:
        try:
            check_codec(self.codec)
        except ValueError as e:
            raise StoreError(str(e)) from None
        if uses_scales(self.codec):
            missing = [a for a in self.schema.names if a not in self.scales]
            if missing:
                raise StoreError(f"codec {self.codec} needs an int8 scale per attribute; none for {', '.join(missing)}")
            bad = {a: s for a, s in self.scales.items() if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0)}
            if bad:
                raise StoreError(f"int8 scales must be positive numbers; got {bad}")

    def scale(self, attribute: str) -> float:
        """The int8 scale of ``attribute`` (127 where the codec has none)."""
        return float(self.scales.get(attribute, INT8_DEFAULT_SCALE))

    def codec_meta(self) -> dict[str, Any]:
        """What a store records about the codec beside the layout (read back by ``codec_from_meta``)."""
        return {"codec": self.codec, "scales": {a: float(self.scales[a]) for a in self.attributes}
                if uses_scales(self.codec) else {}}

    @property
    def attributes(self) -> list[str]:
        return self.schema.names

    def require_fits(self, new: "IndexLayout", *, where: str, hint: str) -> None:
        """Refuse (StoreError) writing documents of layout ``new`` into an index of this layout: another schema,
        other vector sizes, the other slack kind, or a metadata field of another type. ``where`` names the index, ``hint`` the way out. (The
        model version may differ: each document records its own.)"""
        require_same_schema(self.schema, new.schema, have_is=where, want_is="the model", error=StoreError, hint=hint)
        if self.dims != {a: int(new.dims[a]) for a in new.attributes}:
            raise StoreError(f"{where} holds vectors of sizes {self.dims}; the model gives {dict(new.dims)}; {hint}")
        slack = self.slack_mismatch(new)
        if slack:
            raise StoreError(f"{where} {slack}; {hint}")
        codec = self.codec_mismatch(new)
        if codec:
            raise StoreError(f"{where} {codec}; {hint}")
        for f, t in new.metadata_types.items():
            if f in self.metadata_types and self.metadata_types[f] != t:
                raise StoreError(f"{where} stores metadata field {f!r} as {self.metadata_types[f]}; the catalog now has "
                                 f"it as {t}; {hint}")

    def codec_mismatch(self, new: "IndexLayout") -> str | None:
        """Why vectors of ``new`` cannot join an index of this layout as to their codec (another codec, or
        int8 codes of other scales); None when they agree."""
        if self.codec != new.codec:
            return (f"holds codec {self.codec} vectors; this run writes codec {new.codec}, "
                    "and one index holds one codec")
        if uses_scales(self.codec) and self.codec_meta()["scales"] != new.codec_meta()["scales"]:
            return (f"stores {self.codec} codes with int8 scales {self.codec_meta()['scales']}; this run's scales are "
                    f"{new.codec_meta()['scales']}, which make other codes")
        return None

    def slack_mismatch(self, new: "IndexLayout") -> str | None:
        """Why vectors of ``new`` cannot join an index of this layout's vectors, as to the slack value
        (queries score the two kinds differently); None when they agree."""
        if self.query_slack == new.query_slack:
            return None
        kind = lambda slack: "posterior = prob (with the slack value)" if slack else "no slack value"  # noqa: E731
        return (f"holds vectors with {kind(self.query_slack)}; the model gives vectors with "
                f"{kind(new.query_slack)}, which queries score differently")

    def query_vector(self, attribute: str, vector: Any) -> np.ndarray:
        """The unit vector (float64) a query scores ``attribute`` with, from a stored or encoded vector:
        normalised, the slack value dropped first where the index has one. QueryError if it is zero."""
        try:
            return query_form(np.asarray(vector, dtype=np.float64), self.query_slack)
        except ValueError as e:
            raise QueryError(f"query vector for {attribute!r}: {e}") from None

    @property
    def total_dim(self) -> int:
        return sum(self.dims[a] for a in self.attributes)

    def extension_meta(self) -> dict[str, Any]:
        """What a store records about attributes added or dropped in place (read back by ``extension_from_meta``)."""
        return {"combined": [[a, int(d)] for a, d in self.combined], "dropped": list(self.dropped),
                "dropped_from": self.dropped_from}

    def refuse_dropped(self, attributes: Iterable[str], where: str) -> None:
        """QueryError naming an attribute of ``attributes`` that was dropped from the index."""
        gone = [a for a in attributes if a in self.dropped]
        if gone:
            raise QueryError(f"attribute(s) {', '.join(map(repr, gone))} were dropped from {where} (`fgplugin store "
                             f"drop-attribute`); it holds {', '.join(self.attributes)}. Index with a model that has "
                             "them to add them back")

    def extended_by(self, new: "IndexLayout", base_version: str, added: Iterable[str]) -> "IndexLayout":
        """This layout grown to ``new`` (the attributes ``added`` appended in ``new``'s schema order, its model
        version): refuses (StoreError) unless this index is ``base_version``'s with every other attribute of
        ``new`` as it is here (same sizes, codec, slack)."""
        added = list(added)
        where = "the index"
        if self.model_version != base_version:
            raise StoreError(f"{where} holds model version {self.model_version[:12] or '?'}; the model extends "
                             f"{base_version[:12]}: not an extension of the index's model")
        rest = [a for a in new.attributes if a not in added]
        if sorted(rest) != sorted(self.attributes) or any(a in self.attributes for a in added):
            raise StoreError(f"{where} holds attributes {self.attributes}; the model adds {added} to {rest}: "
                             "not an extension of the index's attributes")
        for a in rest:
            if self.schema[a].to_dict() != new.schema[a].to_dict() or int(self.dims[a]) != int(new.dims[a]):
                raise StoreError(f"{where} holds attribute {a!r} with {self.dims[a]} numbers and values "
                                 f"{list(self.schema[a].values)}; the model has it otherwise")
        for why in (self.slack_mismatch(new), self.codec_mismatch(new)):
            if why:
                raise StoreError(f"{where} {why}")
        combined = self.combined or tuple((a, int(self.dims[a])) for a in self.attributes)
        scales = {**self.scales, **{a: new.scales[a] for a in added if a in new.scales}}
        return IndexLayout(new.schema, {a: int(new.dims[a]) for a in new.attributes},
                           {**self.metadata_types, **new.metadata_types}, new.model_version, self.query_slack,
                           self.codec, scales, combined=combined)

    def without(self, attribute: str) -> "IndexLayout":
        """This layout with ``attribute`` dropped (its documents' versions become ``dropped_version``)."""
        if attribute not in self.attributes:
            known = ", ".join(self.attributes)
            raise StoreError(f"no attribute {attribute!r} in the index (it holds {known})")
        if len(self.attributes) == 1:
            raise StoreError(f"{attribute!r} is the index's only attribute; delete the index instead")
        schema = AttributeSchema(tuple(self.schema[a] for a in self.attributes if a != attribute),
                                 name=self.schema.name, metadata=dict(self.schema.metadata))
        combined = self.combined or tuple((a, int(self.dims[a])) for a in self.attributes)
        return IndexLayout(schema, {a: d for a, d in self.dims.items() if a != attribute}, dict(self.metadata_types),
                           dropped_version(self.model_version, attribute), self.query_slack, self.codec,
                           {a: s for a, s in self.scales.items() if a != attribute}, combined=combined,
                           dropped=(*self.dropped, attribute), dropped_from=self.dropped_from or self.model_version)


@dataclass
class Document:
    id: str
    vectors: dict[str, np.ndarray]  # attribute -> float32 [d], L2-normalised (or int8 codes for an int8/binary index)
    metadata: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    image: str | None = None  # where the vectors came from (kept for display and re-encoding)
    image_key: str | None = None  # fingerprint of the image the vectors came from (see ``image_key``)
    meta_key: str | None = None  # fingerprint of ``metadata`` (see ``metadata_key``)


@dataclass(frozen=True)
class Fingerprint:
    """What a stored document was built from; None keys mean unknown (documents written without them,
    e.g. by an older fgplugin), which the index worker treats as out of date."""

    model_version: str
    image_key: str | None = None
    meta_key: str | None = None


@dataclass
class Failure:
    id: str
    stage: str  # read | decode | encode | store
    reason: str
    kind: str = ""  # machine-readable cause: missing, corrupt, too_large, timeout, http, rejected, ...


@dataclass
class UpsertResult:
    ok: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


ERRORS_FILE = "errors.jsonl"  # the index worker's record of failed items (fgplugin.indexer)


class Store(abc.ABC):
    """The one contract every store implements: the embedded DuckDB store (``fgplugin.search.embedded``)
    and OpenSearch (``fgplugin.opensearch.store``). ``fgplugin.stores.open_store`` picks one from a URL;
    tests/test_store_contract.py runs the same operations against both and compares the answers.

    Abstract methods are what a store must do; the capabilities after them have explicit defaults for a
    store without them (only OpenSearch has a separate write index to promote). Callers use these
    methods directly and never probe a store for what it has.
    """

    # -- identity and layout ---------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The store URL, without credentials (shown in every message and report)."""

    @property
    @abc.abstractmethod
    def layout(self) -> IndexLayout | None:
        """What the store holds (schema, dims, metadata types, model version); None before any index."""

    def require_layout(self) -> IndexLayout:
        """``layout``, or StoreError saying the store holds no index yet."""
        layout = self.layout
        if layout is None:
            raise StoreError(f"{self.url} holds no index yet; build one with `fgplugin index`")
        return layout

    @abc.abstractmethod
    def ensure_index(self, layout: IndexLayout) -> None:
        """Create the index/table if missing; refuse (StoreError) a layout that does not fit."""

    @abc.abstractmethod
    def get_meta(self, key: str, default: Any = None) -> Any:
        """A free-form value the index command recorded (e.g. ``model_path``), else ``default``."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: Any) -> None:
        """Record a free-form JSON value beside the index."""

    # -- writing -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def upsert(self, docs: list[Document]) -> UpsertResult:
        """Insert or replace documents. Per-document rejections are returned, never raised or dropped."""

    @abc.abstractmethod
    def delete(self, ids: Iterable[str]) -> int:
        """Remove documents by id; returns how many existed."""

    # -- attributes added or dropped in place (a model made by ``fgplugin train --extend``) --------------
    @abc.abstractmethod
    def add_attributes(self, layout: IndexLayout) -> list[str]:
        """Grow the live index to ``layout`` (made by ``IndexLayout.extended_by`` from the store's own): the
        attributes it lacks get their (empty) fields, and the layout's model version is recorded; nothing
        else changes and queries keep answering. Idempotent (a resumed run calls it again): returns the
        attributes added now."""

    @abc.abstractmethod
    def update_vectors(self, docs: list[Document]) -> UpsertResult:
        """Write only ``docs``' vectors (the attributes each carries) and model version into the stored
        documents of the same ids; every other field of them stays as it is. A document that is not stored
        or a vector the index cannot take comes back as a Failure (never raised or dropped)."""

    @abc.abstractmethod
    def drop_attribute(self, attribute: str) -> dict[str, Any]:
        """Remove ``attribute``'s vectors from the index and record it as dropped (``IndexLayout.without``):
        queries naming it are refused, and every document's version becomes the derived one, so an index run
        with the model that has it adds it back as an extension would. Returns what was done."""

    # -- reading -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def get_vectors(self, ids: Iterable[str], attributes: Iterable[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """id -> attribute -> vector, for the ids that exist."""

    @abc.abstractmethod
    def image_of(self, id_: str) -> str | None:
        """The image source a document was encoded from (None if unknown or no such id)."""

    @abc.abstractmethod
    def exists(self, id_: str) -> bool:
        """Whether a document with this id is stored."""

    @abc.abstractmethod
    def versions(self) -> Mapping[str, str]:
        """id -> model_version of every stored document (for resume and prune)."""

    @abc.abstractmethod
    def fingerprints(self) -> Mapping[str, Fingerprint]:
        """id -> Fingerprint of every stored document (the index worker's view of what is current)."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many documents are stored."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Document count, size and layout, for reports and the benches."""

    @abc.abstractmethod
    def search(self, spec: QuerySpec) -> SearchResult:
        """The top ``spec.k`` documents by the weighted sum of cosines, filters applied."""

    @abc.abstractmethod
    def verify(self) -> dict[str, Any]:
        """Read the whole store; StoreError if it is damaged, else ``{"store", "documents", "ok": True}``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and files."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- optional capabilities (explicit defaults) --------------------------------------------------------
    @property
    def pending_promotion(self) -> bool:
        """True while writes go to a new model's index that queries do not read yet (OpenSearch's alias)."""
        return False

    @property
    def write_target(self) -> str:
        """The index being written when it is not the one queries read (for messages); "" otherwise."""
        return ""

    def promote(self, *, delete_old: bool = False) -> dict[str, Any]:
        """Make queries read the index being written. Only stores with ``pending_promotion`` have one."""
        raise StoreError(f"{self.url} has no separate write index to promote")

    def refresh(self) -> None:
        """Make recent writes visible to search (a store that searches what it wrote needs nothing)."""

    def default_errors_path(self) -> Path:
        """Where the index worker keeps this store's failed items unless told otherwise."""
        return Path.cwd() / f"fgplugin.{ERRORS_FILE}"

    def browse(self, prefix: str | None = None, offset: int = 0, limit: int = 50) -> list[Document]:
        """Stored documents by id ascending (those whose id starts with ``prefix``), ``limit`` of them from
        ``offset``, with their metadata and image but no vectors (``vectors`` empty): what a person picks
        a query item from (``fgplugin explore``). A store checks its arguments with ``check_listing``."""
        raise StoreError(f"{self.url} cannot list its documents")

    def keyword_values(self, field_: str, limit: int = 100) -> list[tuple[str, int]]:
        """The most frequent values of the keyword metadata field ``field_`` with their document counts,
        most frequent first, ties by value: the choices of a filter picker."""
        raise StoreError(f"{self.url} cannot list the values of {field_!r}")

    def check_listing(self, offset: int, limit: int, field_: str | None = None) -> IndexLayout:
        """The arguments of ``browse`` and ``keyword_values`` (both stores: one rule, one message): QueryError
        for a window past ``LISTING_WINDOW`` or a field that is not a keyword field; returns the layout."""
        layout = self.require_layout()
        if not isinstance(offset, int) or not isinstance(limit, int) or offset < 0 or not 1 <= limit <= 1000:
            raise QueryError(f"listing offset={offset!r}, limit={limit!r}: offset must be >= 0 and limit 1..1000")
        if offset + limit > LISTING_WINDOW:
            raise QueryError(f"listing window ends at {offset + limit}, past the {LISTING_WINDOW} a listing pages "
                             "through; narrow it with an id prefix")
        if field_ is not None:
            t = layout.metadata_types.get(field_)
            if t is None:
                known = ", ".join(sorted(layout.metadata_types)) or "(none)"
                raise QueryError(f"no metadata field {field_!r} in {self.url} (known: {known})")
            if t != "keyword":
                raise QueryError(f"metadata field {field_!r} is {t}, not keyword: only keyword fields list their values")
        return layout


LISTING_WINDOW = 10_000  # how far browse pages (OpenSearch's default max_result_window)


# -- document checks (both stores: one rule, one message) ---------------------------------------------
UNIT_TOLERANCE = 1e-3  # vectors whose norm is further than this from 1 are normalised on upsert


def document_vectors(doc: Document, layout: IndexLayout) -> dict[str, np.ndarray]:
    """The float32 vectors of ``doc`` with the shapes the layout expects (attributes without a vector left
    out); raises ValueError naming the cause. Values are checked by ``unit_rows``."""
    if not isinstance(doc.id, str) or not doc.id:
        raise ValueError("document id must be a non-empty string")
    extra = set(doc.vectors) - set(layout.attributes)
    if extra:
        raise ValueError(f"vector for unknown attribute(s) {', '.join(sorted(map(repr, extra)))}; "
                         f"the index has {', '.join(layout.attributes)}")
    out: dict[str, np.ndarray] = {}
    for a in layout.attributes:
        if doc.vectors.get(a) is None:
            continue
        v = np.asarray(doc.vectors[a])
        if isinstance(doc.vectors[a], np.ndarray) and v.dtype.kind in "iu":  # codes: int8 ones of this index's codec
            if v.dtype != np.int8 or stored_codec(layout.codec) != "int8":
                raise ValueError(f"vector for attribute {a!r} holds {v.dtype} codes; the index stores codec "
                                 f"{layout.codec}, which takes float vectors{' or int8 codes' if uses_scales(layout.codec) else ''}")
            v = decode(v, layout.codec, layout.scale(a))
        v = v.astype(np.float32)
        if v.shape != (layout.dims[a],):
            raise ValueError(f"vector for attribute {a!r} has shape {v.shape}; the index expects {layout.dims[a]} numbers")
        out[a] = v
    return out


def dropped_version(model_version: str, attribute: str) -> str:
    """The model version of documents whose ``attribute`` was dropped: another version than the model's (so an
    index run with the model adds the attribute back to them as an extension would), derived from both."""
    return hashlib.sha256(f"{model_version}\0drop\0{attribute}".encode()).hexdigest()


def extension_from_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``IndexLayout`` keyword arguments from a recorded ``IndexLayout.extension_meta()`` (none for an index
    never extended or dropped in place)."""
    meta = meta if isinstance(meta, Mapping) else {}
    return {"combined": tuple((str(a), int(d)) for a, d in meta.get("combined") or ()),
            "dropped": tuple(str(a) for a in meta.get("dropped") or ()),
            "dropped_from": str(meta.get("dropped_from") or "")}


def codec_from_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``IndexLayout`` keyword arguments from a recorded ``IndexLayout.codec_meta()`` (float32 for an index
    written before codecs existed)."""
    meta = meta if isinstance(meta, Mapping) else {}
    return {"codec": str(meta.get("codec") or "float32"),
            "scales": {str(a): float(v) for a, v in (meta.get("scales") or {}).items()}}


def unit_rows(attribute: str, rows: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Rows of one attribute's vectors [n, d], each normalised to unit length where it is not already
    (within UNIT_TOLERANCE), and {row: why it is refused} for non-finite and all-zero rows (cosine
    similarity is undefined for them). Checked a batch at a time: per-vector NumPy calls cost more
    than the write."""
    m = np.asarray(rows, dtype=np.float32)
    with np.errstate(all="ignore"):
        finite = np.isfinite(m).all(axis=1)
        norms = np.linalg.norm(m.astype(np.float64), axis=1)
    bad = {int(j): f"vector for attribute {attribute!r} has non-finite values (NaN or inf)" for j in np.flatnonzero(~finite)}
    bad.update({int(j): f"vector for attribute {attribute!r} is all zeros; cosine similarity is undefined"
                for j in np.flatnonzero(finite & (norms == 0))})
    fix = np.flatnonzero(finite & (norms > 0) & (np.abs(norms - 1.0) > UNIT_TOLERANCE))
    if len(fix):
        m = m.copy()
        m[fix] = (m[fix] / norms[fix, None]).astype(np.float32)
    return m, bad


def to_utc(value: Any) -> dt.datetime:
    """An ISO date (string, date or datetime) -> naive UTC datetime (a date without a zone is UTC).

    Both stores compare dates in UTC, so a filter means the same thing on each.
    """
    if isinstance(value, dt.datetime):
        d = value
    elif isinstance(value, dt.date):
        d = dt.datetime(value.year, value.month, value.day)
    else:
        d = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    if d.tzinfo is not None:
        d = d.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return d


def typed_metadata(layout: IndexLayout, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Coerce a document's metadata to the layout's field types (dates as naive UTC datetimes).

    Raises ValueError naming the field and the cause: the stores turn it into a per-document Failure.
    """
    out: dict[str, Any] = {}
    for f, value in (metadata or {}).items():
        if f not in layout.metadata_types:
            known = ", ".join(sorted(layout.metadata_types)) or "(none)"
            raise ValueError(f"metadata field {f!r} is not in the index (known: {known})")
        t = layout.metadata_types[f]
        try:
            value = coerce(value, t)
            if t == "float" and value is not None and not math.isfinite(value):
                raise ValueError(f"{value!r} is not a finite number")
            if t == "date" and value is not None:
                value = to_utc(value)
        except ValueError as e:
            raise ValueError(f"metadata field {f!r}: {e} (type {t})") from None
        out[f] = value
    return out


# -- document fingerprints -------------------------------------------------------------------------
def image_key(source: str) -> str:
    """The image part of a document's fingerprint: the source string and, for a local file, its size and
    mtime in nanoseconds (one cheap ``stat``), so a file replaced in place is re-encoded. A URL is
    keyed by the URL alone (fetching it to compare would cost what re-encoding costs); a file that
    cannot be stat'ed is keyed ``<path>|missing`` (its re-encoding then fails and is reported)."""
    if is_url(source):
        return source
    try:
        st = os.stat(source)
    except OSError:
        return f"{source}|missing"
    return f"{source}|{st.st_size}|{st.st_mtime_ns}"


def same_image(stored_key: str | None, current_key: str) -> bool:
    """Whether a stored image key and the current one name the same image. Besides equal keys: a key
    written before image sources were made absolute ("images/a.jpg|size|mtime", relative to the
    working directory of that run) and the absolute source of the same file, recognised by the
    relative path being a tail of the absolute one with the same size and mtime (nanoseconds)."""
    if stored_key is None:
        return False
    if stored_key == current_key:
        return True
    old, new = stored_key.rsplit("|", 2), current_key.rsplit("|", 2)
    if len(old) != 3 or len(new) != 3 or old[1:] != new[1:] or "missing" in new[1:] or is_url(new[0]):
        return False
    rel = os.path.normpath(old[0])
    if os.path.isabs(rel) or rel.startswith(".."):
        return False
    return os.path.normpath(new[0]).endswith(os.sep + rel)


def _canonical(value: Any) -> Any:
    return {"$date": value.isoformat()} if isinstance(value, dt.datetime) else value


def metadata_key(layout: IndexLayout, metadata: Mapping[str, Any] | None) -> str:
    """The metadata part of a document's fingerprint: a stable hash of the metadata as the stores keep it
    (typed by ``typed_metadata``, dates in UTC, missing values dropped, fields in sorted order).

    Attribute labels are not part of it: the stores do not keep them (they only train and evaluate).
    Metadata that does not type-check is hashed as given (the store will reject the document anyway).
    """
    try:
        typed = typed_metadata(layout, metadata)
    except ValueError:
        typed = dict(metadata or {})
    canon = {k: _canonical(v) for k, v in sorted(typed.items()) if v is not None}
    text = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def reference_vectors(spec: QuerySpec, get_vectors: Any, where: str) -> dict[str, np.ndarray]:
    """The query's per-attribute vectors: the stored ones of ``spec.like_id`` (via ``get_vectors(ids,
    attrs)``) or ``spec.vectors``. ``where`` names the store in errors."""
    attrs = list(spec.attributes)
    if spec.like_id is None:
        return {a: np.asarray(spec.vectors[a], dtype=np.float32) for a in attrs}  # type: ignore[index]
    got = get_vectors([spec.like_id], attrs)
    if spec.like_id not in got:
        raise QueryError(f"no document with id {spec.like_id!r} in {where}")
    missing = [a for a in attrs if a not in got[spec.like_id]]
    if missing:
        raise QueryError(f"document {spec.like_id!r} has no vector for {', '.join(missing)}")
    return got[spec.like_id]
