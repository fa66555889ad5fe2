"""`fgplugin serve`."""

from __future__ import annotations

from .common import not_built


def serve() -> None:
    """Not built yet."""
    not_built("serve", "see the issue tracker")
