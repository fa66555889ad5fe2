"""`fgplugin demo`."""

from __future__ import annotations

from .common import not_built


def demo() -> None:
    """Not built yet."""
    not_built("demo", "see the issue tracker")
