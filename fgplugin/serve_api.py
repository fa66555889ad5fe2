"""The HTTP contract of ``fgplugin serve``: the names its ``/encode`` answer and request use, shared by
the service and its clients (the ML Commons wiring in ``fgplugin.opensearch.mlcommons``).

Kept apart from ``fgplugin.serve`` so that a client (and ``fgplugin serve --help``) can read the contract
and the server's settings without importing the service (torch, starlette). ``ServeConfig`` validates
the settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FgpluginError
from .images import ImageLimits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
CONCAT_FIELD = "emb_all"
VERSION_KEY = "model_version"
FORMS = ("stored", "query")  # what /encode's "form" may ask for

# Server-side defaults: tighter than the batch indexer's (a request should fail fast, not retry long).
SERVE_LIMITS = ImageLimits(max_bytes=10 * 1024 * 1024, max_pixels=40_000_000, timeout_s=5.0, retries=1, backoff_s=0.2)
HOST_PATTERN_RE = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9._:\[\]-]+)$")  # an --allow-host entry


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32  # images per model call
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_concurrency: int = 64  # /encode requests in flight; beyond that: 429
    allow_hosts: tuple[str, ...] = ()  # URL fetching allowed only to these hosts (empty: off)
    limits: ImageLimits = SERVE_LIMITS
    max_images: int = 64  # images per request
    max_request_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 3
    token: str | None = None  # when set, /encode and /model need "Authorization: Bearer <token>"

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_concurrency", "max_images", "max_request_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise FgpluginError(f"serve: {name} must be a positive integer, got {v!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 10_000):
            raise FgpluginError(f"serve: max_wait_ms must be in 0..10000, got {self.max_wait_ms!r}")
        for h in self.allow_hosts:
            if not HOST_PATTERN_RE.match(h):
                raise FgpluginError(
                    f"serve: allowed host {h!r} is not a host name, IP, '*.domain' wildcard or '*'"
                )


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "CONCAT_FIELD", "VERSION_KEY", "FORMS", "SERVE_LIMITS", "ServeConfig"]
