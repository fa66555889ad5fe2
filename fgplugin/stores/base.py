"""The one small interface every vector store implements.

Data flows one way: catalog -> encoder -> store -> query. A store keeps, per document (id = catalog
id): one unit vector per attribute, the typed metadata, and the model version that produced the
vectors (so a resumed or repeated index run skips what is already current).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np

from ..catalog import coerce
from ..query.spec import QuerySpec, SearchResult
from ..schema import AttributeSchema


@dataclass(frozen=True)
class IndexLayout:
    """What an index holds, derived from the schema and the model card."""

    schema: AttributeSchema
    dims: dict[str, int]  # vector size per attribute, from the model card
    metadata_types: dict[str, str]  # field -> keyword | text | float | integer | boolean | date
    model_version: str  # model card version hash

    @property
    def attributes(self) -> list[str]:
        return self.schema.names

    @property
    def total_dim(self) -> int:
        return sum(self.dims[a] for a in self.attributes)


@dataclass
class Document:
    id: str
    vectors: dict[str, np.ndarray]  # attribute -> float32 [d], L2-normalised
    metadata: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    image: str | None = None  # where the vectors came from (kept for display and re-encoding)


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


@runtime_checkable
class Store(Protocol):
    def ensure_index(self, layout: IndexLayout) -> None:
        """Create the index/table if missing; refuse (StoreError) a layout that does not fit."""

    def upsert(self, docs: list[Document]) -> UpsertResult:
        """Insert or replace documents. Per-document rejections are returned, never raised or dropped."""

    def delete(self, ids: Iterable[str]) -> int:
        ...

    def get_vectors(self, ids: Iterable[str], attributes: Iterable[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """id -> attribute -> vector, for the ids that exist."""

    def versions(self) -> Mapping[str, str]:
        """id -> model_version of every stored document (for resume and prune)."""

    def count(self) -> int:
        ...

    def search(self, spec: QuerySpec) -> SearchResult:
        ...

    def close(self) -> None:
        ...


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
