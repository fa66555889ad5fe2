"""`fgplugin export`."""

from __future__ import annotations

from .common import not_built


def export() -> None:
    """Not built yet."""
    not_built("export", "see the issue tracker")
