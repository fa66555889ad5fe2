"""Reading images from local paths and http(s) URLs, with limits, and clear errors.

Every failure raises :class:`ImageError` naming the source and the cause (missing file, corrupt
data, too many bytes or pixels, unsupported scheme, timeout, HTTP status). URLs are named without
user:password, query or fragment (:func:`shown_url`): messages end up in logs and failure reports.

``ImageLimits.timeout_s`` bounds each fetch attempt as a whole (connect, TLS, headers and body), not
each network read: a server that trickles a byte at a time cannot hold a fetch past it.
"""

from __future__ import annotations

import io
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpcore
import httpx
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout_s: float = 10.0  # each attempt's whole fetch: connect + headers + body
    retries: int = 2  # extra attempts for timeouts, connection errors and 5xx
    backoff_s: float = 0.2


DEFAULT_LIMITS = ImageLimits()


def is_url(source: str) -> bool:
    return "://" in source


def shown_url(url: str) -> str:
    """``scheme://host[:port]/path``: what messages show of a URL. No user:password, and no query or
    fragment (signed URLs carry their keys there)."""
    try:
        p = urlparse(url)
    except ValueError:
        return "(unparseable URL)"
    return f"{p.scheme}://{p.netloc.rpartition('@')[2]}{p.path}"


def shown_source(source: str) -> str:
    """A local path as it is; a URL as :func:`shown_url` shows it."""
    return shown_url(source) if is_url(source) else source


def check_source(source: str) -> None:
    """Refuse unsupported URL schemes early (before any I/O)."""
    if is_url(source):
        try:
            scheme = urlparse(source).scheme.lower()
        except ValueError:  # e.g. an unclosed "[" of an IPv6 host
            raise ImageError(shown_url(source), "not a valid URL", kind="bad_url") from None
        if scheme not in ALLOWED_SCHEMES:
            raise ImageError(shown_url(source), f"unsupported URL scheme {scheme!r} (only http and https)")


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


# -- the whole-fetch deadline --------------------------------------------------------------------
# httpx's timeouts bound each network operation, so a server sending a byte every half second never
# trips them. Every request _fetch sends carries httpcore's "trace" hook (a request extension: it
# works with any client, pooled or not), which clamps connect and TLS to the time left and makes the
# connections it sees opened wait, on every read and write, at most until the deadline of the fetch
# that is using them. The deadline is thread-local: sync httpx does its I/O in the calling thread,
# and a pooled connection serves one request at a time.
_deadline = threading.local()


def _time_left(timeout: float | None, expired: type[Exception]) -> float | None:
    at = getattr(_deadline, "at", None)
    if at is None:  # I/O outside a fetch (the client used for something else): untouched
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the fetch's deadline passed")
    return left if timeout is None else min(timeout, left)


def _bound_stream(stream: Any) -> None:
    if stream is None or getattr(stream, "_fgplugin_deadline", False):
        return
    read, write = stream.read, stream.write
    try:
        stream.read = lambda n, timeout=None: read(n, _time_left(timeout, httpcore.ReadTimeout))
        stream.write = lambda buf, timeout=None: write(buf, _time_left(timeout, httpcore.WriteTimeout))
        stream._fgplugin_deadline = True
    except AttributeError:  # a network backend whose streams take no attributes: per-read timeouts only
        pass


def _trace(event: str, info: dict[str, Any]) -> None:
    if event.endswith(("connect_tcp.started", "connect_unix_socket.started", "start_tls.started")):
        if "timeout" in info:  # the same dict the connect call then reads
            info["timeout"] = _time_left(info["timeout"], httpcore.ConnectTimeout)
    elif event.endswith(("connect_tcp.complete", "connect_unix_socket.complete", "start_tls.complete")):
        _bound_stream(info.get("return_value"))


def _fetch(client: httpx.Client, url: str, limits: ImageLimits) -> bytes:
    shown = shown_url(url)
    last = "no attempt"
    for attempt in range(limits.retries + 1):
        if attempt:
            time.sleep(limits.backoff_s * (2 ** (attempt - 1)))
        _deadline.at = time.monotonic() + limits.timeout_s
        try:
            with client.stream("GET", url, timeout=limits.timeout_s, extensions={"trace": _trace}) as r:
                # Redirects are followed by httpx; refuse any that left http(s).
                check_source(str(r.url))
                if r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                    continue
                if r.status_code >= 400:
                    raise ImageError(shown, f"HTTP {r.status_code}", kind="http")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageError(shown, f"{declared} bytes, over the {limits.max_bytes}-byte limit", kind="too_large")
                buf = bytearray()
                for chunk in r.iter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_bytes:
                        raise ImageError(shown, f"over the {limits.max_bytes}-byte limit", kind="too_large")
                    if time.monotonic() > _deadline.at:  # a connection opened outside _fetch is not clamped
                        raise httpx.ReadTimeout("the fetch's deadline passed")
                return bytes(buf)
        except httpx.TimeoutException:
            last = f"timed out after {limits.timeout_s:g} s"
        except httpx.TransportError as e:
            last = f"connection failed ({type(e).__name__})"
        finally:
            _deadline.at = None
    kind = "timeout" if last.startswith("timed out") else "http"
    raise ImageError(shown, f"{last} (after {limits.retries + 1} attempts)", kind=kind)


# -- decoding ------------------------------------------------------------------------------------
_REPR_RE = re.compile(r"\s*<[^<>]*(?: at 0x[0-9A-Fa-f]+|class '[^']*')>")  # <_io.BytesIO object at 0x..>
_BOMB_PIXELS_RE = re.compile(r"\((\d+) pixels\)")  # Pillow: "Image size (N pixels) exceeds limit of M pixels"


def plain_cause(e: Exception) -> str:
    """An exception as a one-line cause, without the object reprs some decoders put in messages."""
    if isinstance(e, UnidentifiedImageError):  # its message is "cannot identify image file <BytesIO ...>"
        return "not a known image format"
    text = " ".join(_REPR_RE.sub("", str(e)).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def decode(data: bytes, source: str, *, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode to RGB, refusing corrupt data and images over the pixel limit (decompression bombs)."""
    shown = shown_source(source)
    try:
        with warnings.catch_warnings():
            # Our pixel limit decides below, with the image's size; Pillow's own warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ImageError(shown, f"{w}x{h} pixels, over the {limits.max_pixels}-pixel limit", kind="too_large")
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow refuses at open (over twice Image.MAX_IMAGE_PIXELS) before the size is ours to read.
        m = _BOMB_PIXELS_RE.search(str(e))
        cap = min(limits.max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or limits.max_pixels))
        size = f"{m.group(1)} pixels" if m else "too many pixels"
        raise ImageError(shown, f"{size}, over the {cap}-pixel limit", kind="too_large") from None
    except Exception as e:  # noqa: BLE001 - a hostile file can make a decoder raise anything
        raise ImageError(shown, f"corrupt or unreadable image ({plain_cause(e)})", kind="corrupt") from None


def load_image(
    source: str,
    *,
    base_dir: str | Path | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    client: httpx.Client | None = None,
) -> Image.Image:
    src = resolve(source, base_dir)
    return decode(read_bytes(src, limits=limits, client=client), src, limits=limits)
