"""`fgplugin index`."""

from __future__ import annotations

from .common import not_built


def index() -> None:
    """Not built yet."""
    not_built("index", "see the issue tracker")
