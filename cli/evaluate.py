"""`fgplugin eval`."""

from __future__ import annotations

from .common import not_built


def evaluate() -> None:
    """Not built yet."""
    not_built("eval", "see the issue tracker")
