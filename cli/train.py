"""`fgplugin train`."""

from __future__ import annotations

from .common import not_built


def train() -> None:
    """Not built yet."""
    not_built("train", "see the issue tracker")
