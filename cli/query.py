"""`fgplugin query`."""

from __future__ import annotations

from .common import not_built


def query() -> None:
    """Not built yet."""
    not_built("query", "see the issue tracker")
