"""Reading images from local paths and http(s) URLs, with limits, and clear errors.

Every failure raises :class:`ImageError` naming the source and the cause (missing file, corrupt
data, too many bytes or pixels, unsupported scheme, timeout, HTTP status).
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout_s: float = 10.0
    retries: int = 2  # extra attempts for timeouts, connection errors and 5xx
    backoff_s: float = 0.2


DEFAULT_LIMITS = ImageLimits()


def is_url(source: str) -> bool:
    return "://" in source


def check_source(source: str) -> None:
    """Refuse unsupported URL schemes early (before any I/O)."""
    if is_url(source):
        scheme = urlparse(source).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise ImageError(source, f"unsupported URL scheme {scheme!r} (only http and https)")


def resolve(source: str, base_dir: str | Path | None) -> str:
    """Relative paths are relative to the catalog's folder; URLs and absolute paths pass through."""
    check_source(source)
    if is_url(source):
        return source
    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return str(p)


def read_bytes(
    source: str, *, limits: ImageLimits = DEFAULT_LIMITS, client: httpx.Client | None = None
) -> bytes:
    check_source(source)
    if not is_url(source):
        p = Path(source)
        if not p.is_file():
            raise ImageError(source, "file not found", kind="missing")
        size = p.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(source, f"file is {size} bytes, over the {limits.max_bytes}-byte limit", kind="too_large")
        return p.read_bytes()
    own = client is None
    c = client or httpx.Client(timeout=limits.timeout_s, follow_redirects=True)
    try:
        return _fetch(c, source, limits)
    finally:
        if own:
            c.close()


def _fetch(client: httpx.Client, url: str, limits: ImageLimits) -> bytes:
    last = "no attempt"
    for attempt in range(limits.retries + 1):
        if attempt:
            time.sleep(limits.backoff_s * (2 ** (attempt - 1)))
        try:
            with client.stream("GET", url, timeout=limits.timeout_s) as r:
                # Redirects are followed by httpx; refuse any that left http(s).
                check_source(str(r.url))
                if r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                    continue
                if r.status_code >= 400:
                    raise ImageError(url, f"HTTP {r.status_code}", kind="http")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageError(url, f"{declared} bytes, over the {limits.max_bytes}-byte limit", kind="too_large")
                buf = bytearray()
                for chunk in r.iter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_bytes:
                        raise ImageError(url, f"over the {limits.max_bytes}-byte limit", kind="too_large")
                return bytes(buf)
        except httpx.TimeoutException:
            last = f"timed out after {limits.timeout_s:g} s"
        except httpx.TransportError as e:
            last = f"connection failed ({type(e).__name__})"
    kind = "timeout" if last.startswith("timed out") else "http"
    raise ImageError(url, f"{last} (after {limits.retries + 1} attempts)", kind=kind)


def decode(data: bytes, source: str, *, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode to RGB, refusing corrupt data and images over the pixel limit (decompression bombs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ImageError(source, f"{w}x{h} pixels, over the {limits.max_pixels}-pixel limit", kind="too_large")
            im.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageError(source, f"corrupt or unreadable image ({type(e).__name__}: {e})", kind="corrupt") from None
    return im.convert("RGB")


def load_image(
    source: str,
    *,
    base_dir: str | Path | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    client: httpx.Client | None = None,
) -> Image.Image:
    src = resolve(source, base_dir)
    return decode(read_bytes(src, limits=limits, client=client), src, limits=limits)
