"""Store URLs: ``embedded:DIR`` (the default; a DuckDB file in DIR) or ``opensearch:URL``."""

from __future__ import annotations

from pathlib import Path

from ..errors import StoreError
from .base import Store

DEFAULT_STORE = "embedded:fgplugin-store"
SCHEMES = ("embedded", "opensearch")


def parse_store_url(url: str) -> tuple[str, str]:
    """``embedded:DIR`` -> ("embedded", DIR); ``opensearch:http://h:9200`` -> ("opensearch", "http://h:9200").

    A bare path (no scheme) means an embedded store in that directory.
    """
    text = (url or "").strip()
    if not text:
        raise StoreError(f"empty store URL; write embedded:DIR or opensearch:URL (default {DEFAULT_STORE})")
    scheme, sep, rest = text.partition(":")
    if sep and scheme in SCHEMES:
        if not rest.strip():
            raise StoreError(f"store URL {url!r} names no {'directory' if scheme == 'embedded' else 'cluster URL'}")
        return scheme, rest.strip()
    if sep and scheme in ("http", "https"):
        raise StoreError(f"store URL {url!r}: write opensearch:{text} for an OpenSearch cluster")
    if sep and len(scheme) > 1 and "/" not in scheme and "\\" not in scheme:
        raise StoreError(f"unknown store kind {scheme!r} in {url!r}; use embedded:DIR or opensearch:URL")
    return "embedded", text


def open_store(url: str = DEFAULT_STORE, *, index: str | None = None, read_only: bool = False) -> Store:
    """Open the store a URL names. ``index``: the OpenSearch index name (ignored by embedded stores).

    ``read_only`` opens an embedded store for queries only (several readers may share it; a store has
    a single writer); OpenSearch ignores it.
    """
    scheme, rest = parse_store_url(url)
    if scheme == "embedded":
        from .duckdb_store import DuckDBStore

        return DuckDBStore(Path(rest), read_only=read_only)
    try:
        from ..opensearch.store import OpenSearchStore
    except ImportError as e:
        raise StoreError(f"the OpenSearch store is not available in this install ({e})") from None
    return OpenSearchStore.from_url(rest if "://" in rest else f"http://{rest}", index=index)
