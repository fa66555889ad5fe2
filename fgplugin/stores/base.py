"""The one small interface every vector store implements.

Data flows one way: catalog -> encoder -> store -> query. A store keeps, per document (id = catalog
id): one unit vector per attribute, the typed metadata, and the model version that produced the
vectors (so a resumed or repeated index run skips what is already current).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np

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
