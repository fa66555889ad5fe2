"""Vector stores: the embedded DuckDB store (default) and OpenSearch."""

from .base import Document, Failure, IndexLayout, Store, UpsertResult

__all__ = ["Document", "Failure", "IndexLayout", "Store", "UpsertResult"]
