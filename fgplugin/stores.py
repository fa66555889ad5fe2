"""The store facade: a store URL, ``embedded:DIR`` (the default; a DuckDB file in DIR) or ``opensearch:URL``,
opens the ``Store`` it names.

A store URL may carry a password (``opensearch:https://user:pass@host:9200``): every message shows it
through ``redact_url`` only."""

from __future__ import annotations

from pathlib import Path

from .errors import StoreError
from .redact import redact_url, url_secrets
from .opensearch.client import split_url
from .opensearch.store import OpenSearchStore
from .search.embedded import DuckDBStore
from .search.store import Store

DEFAULT_STORE = "embedded:fgplugin-store"
SCHEMES = ("embedded", "opensearch")


def parse_store_url(url: str) -> tuple[str, str]:
    """``embedded:DIR`` -> ("embedded", DIR); ``opensearch:http://h:9200`` -> ("opensearch", "http://h:9200").

    A bare path (no scheme) means an embedded store in that directory.
    """
    text = (url or "").strip()
    shown = redact_url(text)
    if not text:
        raise StoreError(f"empty store URL; write embedded:DIR or opensearch:URL (default {DEFAULT_STORE})")
    scheme, sep, rest = text.partition(":")
    if sep and scheme in SCHEMES:
        if not rest.strip():
            raise StoreError(f"store URL {shown!r} names no {'directory' if scheme == 'embedded' else 'cluster URL'}")
        if scheme == "embedded" and url_secrets(rest):
            raise StoreError(f"store URL {shown!r} holds a user and password, which an embedded store has no use "
                             "for; write opensearch:URL for an OpenSearch cluster")
        return scheme, rest.strip()
    if sep and scheme in ("http", "https"):
        raise StoreError(f"store URL {shown!r}: put opensearch: in front of an OpenSearch cluster's URL "
                         f"(opensearch:{shown})")
    if url_secrets(text):  # "user:pass@host:9200": never a directory name (it would show the password)
        raise StoreError(f"store URL {shown!r} holds a user and password; write opensearch:http://HOST:PORT for an "
                         "OpenSearch cluster")
    if sep and len(scheme) > 1 and "/" not in scheme and "\\" not in scheme:
        raise StoreError(f"unknown store kind {redact_url(scheme)!r} in {shown!r}; use embedded:DIR or opensearch:URL")
    return "embedded", text


def check_store_url(url: str) -> None:
    """Raise StoreError (one line, no credentials) for a store URL that cannot be opened as written."""
    scheme, rest = parse_store_url(url)
    if scheme == "opensearch":
        split_url(rest if "://" in rest else f"http://{rest}")


def open_store(url: str = DEFAULT_STORE, *, index: str | None = None, read_only: bool = False,
               interactive: bool = False, engine: str | None = None) -> Store:
    """Open the store a URL names. ``index``: the OpenSearch index name (ignored by embedded stores).

    ``read_only`` opens an embedded store for queries only (several readers may share it; a store has
    a single writer); OpenSearch ignores it. ``interactive``: someone waits (a query), so an unreachable
    OpenSearch fails within seconds (``opensearch.client.INTERACTIVE``); embedded stores ignore it.
    ``engine``: the k-NN engine of new OpenSearch indices (None: FGPLUGIN_OPENSEARCH_ENGINE, else faiss).
    """
    scheme, rest = parse_store_url(url)
    if scheme == "embedded":
        return DuckDBStore(Path(rest), read_only=read_only)
    return OpenSearchStore.from_url(rest if "://" in rest else f"http://{rest}", index=index, interactive=interactive,
                                   engine=engine)
