"""`fgplugin serve`: the encoder as an HTTP service (Starlette + uvicorn), for ML Commons and for people.

Endpoints
---------
``POST /encode``
    One image or many, as JSON or as multipart file uploads; returns every attribute's unit vector
    (or only the ``attributes`` asked for) and the concatenated ``emb_all``, with the model card's
    version. Request forms::

        {"url": "https://img.example.com/a.jpg"}                       single
        {"image": "<base64>"}   or   {"image": {"url": ...} | {"b64": ...}}   single
        {"images": [{"url": ...}, {"b64": ...}, ...]}                   batch (even of one)
        multipart: one file under any field name but "images" -> single;
                   files under the field name "images" -> batch
        optional everywhere: "attributes": ["sleeve_length", "emb_all"] (or "a,b"; also ?attributes=)
                             "form": "stored" (default) or "query" (also ?form=)

    ``form: "query"`` returns the vectors a query scores with (``fgplugin.similarity.query_form``): for
    a ``posterior = prob`` model (``/model`` card ``query_slack: true``) each vector's last, slack value
    zeroed and the rest re-normalised; for any other model the same vectors as ``stored``. The
    OpenSearch image-query pipeline asks for it, since ML Commons cannot drop the slack itself.

    Response of a single-image call (flat, so ML Commons' ``output_map`` reads one field per
    attribute by name: ``{"emb_sleeve_length": "sleeve_length"}``)::

        {"model_version": "<card version>", "sleeve_length": [...], "neckline": [...], ..., "emb_all": [...]}

    Response of a batch call: ``{"model_version": ..., "items": [{"sleeve_length": [...], ...}, ...]}``.

    ``emb_all`` is the concatenation, in schema order, of every attribute's unit vector (what the
    index's ``emb_all`` field holds); it is returned unless ``attributes`` leaves it out.

``GET /health``  liveness and load: ``{"status": "ok", "model_version", "in_flight", "queued"}``.
``GET /model``   the model card (it holds no secrets: paths, config, schema, metrics, version).

Errors are JSON ``{"error": {"status", "message", "item"?, "known"?, "request_id"}}``: 400 bad JSON,
base64 or image (naming the item index and the cause), 403 URL host not on the allow-list or a
redirect leaving http(s), 413 too large (body, image bytes, pixels, image count), 422 unknown
attribute (listing the known ones), 401 missing/wrong bearer token (when started with one), 415
other content types, 429 saturated (``--max-concurrency`` requests in flight), 502/504 upstream
fetch error/timeout. A 5xx never carries internals: a generic message and the
request id; the log has the traceback. Messages name URLs without user:password or query.

Limits hold against hostile clients: the request body is counted as it arrives, however it is
framed (Content-Length, chunked, a Content-Length that lies), and refused with 413 as soon as it
passes ``max_request_bytes``; multipart bodies are parsed as they stream, with bounds on the number
of files and fields, each file's bytes (the image byte limit), each field's and each part's header
bytes. An error answered before the body was read in full closes the connection, so the rest of
the body is never read.

Throughput: a micro-batcher gathers single images from concurrent requests into one model call
(up to ``max_batch`` images or ``max_wait_ms`` after the first), run in one worker thread so the
event loop keeps accepting and decoding. Decoding and preprocessing run in a thread pool.

URL fetching reuses :func:`fgplugin.images.read_bytes` (size/time limits, retries) with an httpx
client whose request hook enforces the host allow-list on every hop, redirects included. The
allow-list is EMPTY by default: URL fetching is off until hosts are allowed (``--allow-host``,
``*.example.com`` wildcards, ``*`` for any host).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence
from urllib.parse import urlparse

import anyio
import httpx
import numpy as np
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .encoding import DeployedEncoder
from .errors import ImageError, ModelCardError
from .export import ExportedEncoder
from .images import decode, read_bytes, shown_url
from .serve_api import CONCAT_FIELD, DEFAULT_HOST, DEFAULT_PORT, FORMS, SERVE_LIMITS, VERSION_KEY, ServeConfig
from .similarity import query_form

try:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ModuleNotFoundError:  # python-multipart < 0.0.13 names its module "multipart"
    from multipart.exceptions import FormParserError  # type: ignore[no-redef]
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

log = logging.getLogger("fgplugin.serve")

ITEMS_KEY = "items"
RESERVED = (CONCAT_FIELD, VERSION_KEY, ITEMS_KEY)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Multipart bounds besides the image count and byte limits: the only non-file fields are "attributes"
# and "form", so a few short ones; a part's headers are a Content-Disposition and a Content-Type.
MAX_FORM_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024
MAX_PART_HEADER_BYTES = 8 * 1024




def host_allowed(host: str | None, patterns: Sequence[str]) -> bool:
    """Exact host (case-insensitive), ``*.example.com`` (subdomains only) or ``*`` (any host)."""
    if not host:
        return False
    h = host.lower().strip("[]").rstrip(".")
    for p in patterns:
        p = p.lower().strip("[]")
        if p == "*" or p == h or (p.startswith("*.") and h.endswith(p[1:])):
            return True
    return False


class Problem(Exception):
    """A request-level error with its HTTP status (4xx messages are safe to show)."""

    def __init__(self, status: int, message: str, *, item: int | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.item = item
        self.extra = extra


_IMAGE_KIND_STATUS = {"too_large": 413, "corrupt": 400, "timeout": 504, "http": 502, "forbidden": 403}


def _problem_from_image_error(e: ImageError, item: int) -> Problem:
    status = _IMAGE_KIND_STATUS.get(e.kind, 400)
    what = {502: "upstream fetch failed: ", 504: "upstream fetch timed out: "}.get(status, "")
    return Problem(status, f"item {item}: {what}{e}", item=item)


class _BodyCap:
    """The ASGI ``receive`` of a request, counting body bytes as they arrive: past ``limit`` it raises
    a 413 before the next chunk is read, whatever the framing (Content-Length, chunked, or a
    Content-Length that lies); starlette's ``body()`` and ``stream()`` read through it."""

    def __init__(self, receive: Callable[[], Any], headers: Any, limit: int):
        self.receive = receive
        self.limit = limit
        self.seen = 0
        # No Content-Length (or 0) and no Transfer-Encoding: there is no body to wait for.
        self.done = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers

    async def __call__(self) -> Any:
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.seen > self.limit:
                raise Problem(413, f"request body is over the {self.limit}-byte limit")
        return message


@dataclass
class _Part:
    name: str
    filename: str | None  # None: a plain form field
    index: int  # among the files, or among the fields
    data: bytearray = field(default_factory=bytearray)


class _MultipartReader:
    """A multipart/form-data body parsed as it streams in (python-multipart's push parser), refusing
    with 413 the moment a bound is passed: more than ``max_files`` files or MAX_FORM_FIELDS fields, a
    file over ``max_file_bytes`` (the image byte limit), a field over MAX_FIELD_BYTES, a part's headers
    over MAX_PART_HEADER_BYTES. Parts are kept in memory: the body cap bounds them all together."""

    def __init__(self, content_type: str, *, max_files: int, max_file_bytes: int):
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise Problem(400, "multipart content type has no boundary")
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.parts: list[_Part] = []
        self.files = 0
        self.fields = 0
        self.ended = False
        self._part: _Part | None = None
        self._header_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        try:
            self._parser = MultipartParser(boundary, {
                "on_part_begin": self._on_part_begin, "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end, "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished, "on_end": self._on_end,
            })
        except (FormParserError, ValueError):
            raise Problem(400, "multipart content type has an invalid boundary") from None

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError:
            raise Problem(400, "multipart body is malformed (parts must be separated by the boundary "
                          "its content type names)") from None

    def finish(self) -> list[_Part]:
        if not self.ended:
            raise Problem(400, "multipart body ends before its closing boundary")
        return self.parts

    def _on_part_begin(self) -> None:
        self._part, self._header_bytes, self._disposition = None, 0, b""

    def _header_grew(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise Problem(413, f"multipart part headers are over the {MAX_PART_HEADER_BYTES}-byte limit")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_grew(end - start)
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_grew(end - start)
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise Problem(400, "a multipart part has no name in its Content-Disposition header")
        name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self.files += 1
            if self.files > self.max_files:
                raise Problem(413, f"more than {self.max_files} images in one request, over the limit of "
                              f"{self.max_files}")
            self._part = _Part(name, options[b"filename"].decode("utf-8", "replace"), self.files - 1)
        else:
            self.fields += 1
            if self.fields > MAX_FORM_FIELDS:
                raise Problem(413, f"more than {MAX_FORM_FIELDS} form fields in one request")
            self._part = _Part(name, None, self.fields - 1)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:  # data before any headers: python-multipart reports it itself
            return
        part.data += data[start:end]
        if part.filename is not None and len(part.data) > self.max_file_bytes:
            raise Problem(413, f"item {part.index}: {part.filename or 'upload'} is over the "
                          f"{self.max_file_bytes}-byte limit", item=part.index)
        if part.filename is None and len(part.data) > MAX_FIELD_BYTES:
            raise Problem(413, f"form field {part.name!r} is over the {MAX_FIELD_BYTES}-byte limit")

    def _on_part_end(self) -> None:
        if self._part is not None:
            self.parts.append(self._part)
        self._part = None

    def _on_end(self) -> None:
        self.ended = True


# -- micro-batcher -------------------------------------------------------------------------------
class MicroBatcher:
    """Gathers single preprocessed images into batched model calls on one worker thread.

    ``encode_fn(batch [B,3,S,S]) -> {attribute: [B, d]}``. ``calls`` and ``batch_sizes`` count the
    model calls (for tests and /health).
    """

    def __init__(self, encode_fn: Callable[[torch.Tensor], dict[str, np.ndarray]], *, max_batch: int, max_wait_s: float):
        self.encode_fn = encode_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.calls = 0
        self.batch_sizes: list[int] = []
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def _ensure_started(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgplugin-model")
        if self._task is None or self._loop is not loop or self._task.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(self._queue), name="fgplugin-batcher")
        assert self._queue is not None
        return self._queue

    async def encode(self, tensors: Sequence[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """One result row per tensor, in order."""
        q = self._ensure_started()
        loop = asyncio.get_running_loop()
        futures = []
        for t in tensors:
            fut = loop.create_future()
            q.put_nowait((t, fut))
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    async def _run(self, q: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        getter: asyncio.Future | None = None  # kept across rounds: cancelling a get() can lose an item
        stopping = False
        while not stopping:
            job = await (getter if getter is not None else q.get())
            getter = None
            if job is None:
                break
            batch = [job]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not q.empty():
                    nxt = q.get_nowait()
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    getter = getter or asyncio.ensure_future(q.get())
                    done, _ = await asyncio.wait({getter}, timeout=remaining)
                    if not done:
                        break
                    nxt, getter = getter.result(), None
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            await self._run_batch(loop, batch)
        # Drain whatever arrived after the stop signal (normally nothing: uvicorn drains requests first).
        rest = []
        while not q.empty():
            j = q.get_nowait()
            if j is not None:
                rest.append(j)
        for i in range(0, len(rest), self.max_batch):
            await self._run_batch(loop, rest[i:i + self.max_batch])
        if getter is not None:
            getter.cancel()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        live = [(t, f) for t, f in batch if not f.done()]  # skip images of requests that went away
        if not live:
            return
        try:
            out = await loop.run_in_executor(self._executor, self._call, [t for t, _ in live])
        except Exception as e:  # noqa: BLE001 - handed to every waiting request, which logs it
            for _, f in live:
                if not f.done():
                    f.set_exception(e)
            return
        for i, (_, f) in enumerate(live):
            if not f.done():
                f.set_result({k: v[i] for k, v in out.items()})

    def _call(self, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
        self.calls += 1
        self.batch_sizes.append(len(tensors))
        return self.encode_fn(torch.stack(tensors))

    async def close(self) -> None:
        """Finish queued work, then stop the worker (graceful shutdown)."""
        if self._task is not None and not self._task.done() and self._queue is not None:
            self._queue.put_nowait(None)
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# -- the service ---------------------------------------------------------------------------------
@dataclass
class _Item:
    index: int
    url: str | None = None
    data: bytes | None = None


@dataclass
class _Parsed:
    items: list[_Item]
    single: bool
    attributes: list[str] | None = None
    form: str | None = None


class EncoderService:
    """Request handling around an encoder with ``preprocess``, ``encode_tensors``, ``attributes``,
    ``dims``, ``version`` and ``card`` (an :class:`fgplugin.export.ExportedEncoder`)."""

    def __init__(self, encoder: DeployedEncoder, config: ServeConfig | None = None):
        self.encoder = encoder
        self.config = config or ServeConfig()
        clash = [a for a in encoder.attributes if a in RESERVED]
        if clash:
            raise ModelCardError(
                f"attribute name(s) {', '.join(clash)} clash with the response keys {', '.join(RESERVED)}"
            )
        self.attributes: list[str] = list(encoder.attributes)
        self.known_outputs = self.attributes + [CONCAT_FIELD]
        self.query_slack = encoder.query_slack
        self.batcher = MicroBatcher(
            encoder.encode_tensors, max_batch=self.config.max_batch, max_wait_s=self.config.max_wait_ms / 1000.0
        )
        self.in_flight = 0
        self.rejected = 0
        # One client for all fetches (thread-safe); its hook checks every hop, redirects included.
        self._http = httpx.Client(
            timeout=self.config.limits.timeout_s,
            follow_redirects=True,
            max_redirects=self.config.max_redirects,
            event_hooks={"request": [self._check_hop]},
            headers={"User-Agent": "fgplugin-serve"},
        )

    # -- lifecycle
    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        log.info("encoder %s ready: %d attributes, max_batch=%d, max_wait=%gms, allow_hosts=%s",
                 self.encoder.version[:12], len(self.attributes), self.config.max_batch,
                 self.config.max_wait_ms, ",".join(self.config.allow_hosts) or "(none: URL fetching off)")
        try:
            yield
        finally:
            await self.batcher.close()

    def _check_hop(self, request: httpx.Request) -> None:
        """Runs before every request the client sends, redirects included."""
        url = shown_url(str(request.url))
        if request.url.scheme not in ("http", "https"):
            raise ImageError(url, f"redirect to a {request.url.scheme!r} URL refused (only http and https)", kind="forbidden")
        if not host_allowed(request.url.host, self.config.allow_hosts):
            raise ImageError(url, f"host {request.url.host!r} is not on the allow-list", kind="forbidden")

    # -- endpoints
    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({
            "status": "ok", VERSION_KEY: self.encoder.version, "in_flight": self.in_flight,
            "queued": self.batcher.queued, "model_calls": self.batcher.calls, "rejected": self.rejected,
        })

    async def model(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return self._error(Problem(401, "missing or wrong bearer token"), uuid.uuid4().hex[:16],
                               headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse(self.encoder.card)

    def _authorized(self, request: Request) -> bool:
        if not self.config.token:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.config.token}".encode())

    async def encode(self, request: Request) -> JSONResponse:
        rid = request.headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID_RE.match(rid) else uuid.uuid4().hex[:16]
        body_in = _BodyCap(request.receive, request.headers, self.config.max_request_bytes)
        request = Request(request.scope, body_in)
        # An answer given before the body was read in full closes the connection: otherwise the server
        # would go on reading (and dropping) whatever the client still sends, for as long as it sends.
        def closing(headers: dict[str, str] | None = None) -> dict[str, str]:
            return {**(headers or {}), **({} if body_in.done else {"Connection": "close"})}

        if not self._authorized(request):
            return self._error(Problem(401, "missing or wrong bearer token"), rid,
                               headers=closing({"WWW-Authenticate": "Bearer"}))
        if self.in_flight >= self.config.max_concurrency:
            self.rejected += 1
            return self._error(Problem(429, f"busy: {self.in_flight} requests in flight; retry shortly"), rid,
                               headers=closing({"Retry-After": "1"}))
        self.in_flight += 1
        t0 = time.perf_counter()
        try:
            body = await self._encode(request)
            return JSONResponse(body, headers={"X-Request-ID": rid})
        except Problem as p:
            log.info("request %s: %d %s", rid, p.status, p.message)
            return self._error(p, rid, headers=closing())
        except ClientDisconnect:
            return self._error(Problem(400, "client disconnected"), rid, headers=closing())
        except Exception:  # noqa: BLE001 - never leak internals; the log has the details
            log.exception("request %s: internal error", rid)
            return self._error(Problem(500, "internal error"), rid, headers=closing())
        finally:
            self.in_flight -= 1
            log.debug("request %s took %.1f ms", rid, 1000 * (time.perf_counter() - t0))

    def _error(self, p: Problem, rid: str, headers: dict[str, str] | None = None) -> JSONResponse:
        err: dict[str, Any] = {"status": p.status, "message": p.message, "request_id": rid}
        if p.item is not None:
            err["item"] = p.item
        err.update(p.extra)
        return JSONResponse({"error": err}, status_code=p.status, headers={"X-Request-ID": rid, **(headers or {})})

    async def _encode(self, request: Request) -> dict[str, Any]:
        parsed = await self._parse(request)
        wanted = self._wanted(parsed.attributes if parsed.attributes is not None
                              else request.query_params.get("attributes"))
        form = self._form(parsed.form if parsed.form is not None else request.query_params.get("form"))
        tensors = await self._load_all(parsed.items)
        rows = await self.batcher.encode(tensors)
        outs = [self._format(row, wanted, form) for row in rows]
        if parsed.single:
            return {VERSION_KEY: self.encoder.version, **outs[0]}
        return {VERSION_KEY: self.encoder.version, ITEMS_KEY: outs}

    # -- parsing
    async def _parse(self, request: Request) -> _Parsed:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.config.max_request_bytes:
            raise Problem(413, f"request body is {length} bytes, over the {self.config.max_request_bytes}-byte limit")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return await self._parse_multipart(request)
        if ctype not in ("application/json", ""):
            raise Problem(415, f"unsupported content type {ctype!r}; send application/json or multipart/form-data")
        raw = await request.body()  # bounded as it arrives by the request's _BodyCap
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Problem(400, f"body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise Problem(400, "body must be a JSON object with 'images', 'image' or 'url'")
        given = [k for k in ("images", "image", "url") if k in body]
        if len(given) != 1:
            raise Problem(400, "give exactly one of 'images' (a list), 'image' or 'url'"
                          + (f"; got {', '.join(given)}" if given else ""))
        key = given[0]
        if key == "images":
            if not isinstance(body["images"], list) or not body["images"]:
                raise Problem(400, "'images' must be a non-empty list of {\"url\": ...} or {\"b64\": ...} objects")
            self._check_count(len(body["images"]))
            items = [self._json_item(i, v) for i, v in enumerate(body["images"])]
            single = False
        elif key == "url":
            if not isinstance(body["url"], str):
                raise Problem(400, "item 0: 'url' must be a string", item=0)
            items, single = [self._url_item(0, body["url"])], True
        else:
            v = body["image"]
            items, single = [self._b64_item(0, v) if isinstance(v, str) else self._json_item(0, v)], True
        return _Parsed(items, single, self._attributes_field(body.get("attributes")), body.get("form"))

    def _check_count(self, n: int) -> None:
        if n > self.config.max_images:
            raise Problem(413, f"{n} images in one request, over the limit of {self.config.max_images}")

    def _json_item(self, i: int, v: Any) -> _Item:
        if not isinstance(v, dict) or len([k for k in ("url", "b64") if k in v]) != 1:
            raise Problem(400, f"item {i}: give an object with either 'url' or 'b64'", item=i)
        if "url" in v:
            if not isinstance(v["url"], str):
                raise Problem(400, f"item {i}: 'url' must be a string", item=i)
            return self._url_item(i, v["url"])
        if not isinstance(v["b64"], str):
            raise Problem(400, f"item {i}: 'b64' must be a string", item=i)
        return self._b64_item(i, v["b64"])

    def _url_item(self, i: int, url: str) -> _Item:
        try:
            parts = urlparse(url)
        except ValueError:  # e.g. an unclosed "[" of an IPv6 host
            raise Problem(400, f"item {i}: not a valid URL", item=i) from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise Problem(400, f"item {i}: {shown_url(url)!r} is not an http(s) URL", item=i)
        if not self.config.allow_hosts:
            raise Problem(403, f"item {i}: URL fetching is off on this server (no allowed hosts; "
                          "start it with --allow-host HOST); send the image as base64 instead", item=i)
        if not host_allowed(parts.hostname, self.config.allow_hosts):
            raise Problem(403, f"item {i}: host {parts.hostname!r} is not on the allow-list", item=i)
        return _Item(i, url=url)

    def _b64_item(self, i: int, text: str) -> _Item:
        if text.startswith("data:"):
            head, _, text = text.partition(",")
            if ";base64" not in head:
                raise Problem(400, f"item {i}: data URI is not base64-encoded", item=i)
        text = "".join(text.split())  # base64 wrapped over lines is common
        max_b = self.config.limits.max_bytes
        if len(text) > 4 * math.ceil(max_b / 3) + 4:
            raise Problem(413, f"item {i}: image is over the {max_b}-byte limit", item=i)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise Problem(400, f"item {i}: not valid base64 ({e})", item=i) from None
        if not data:
            raise Problem(400, f"item {i}: empty image", item=i)
        if len(data) > max_b:
            raise Problem(413, f"item {i}: image is {len(data)} bytes, over the {max_b}-byte limit", item=i)
        return _Item(i, data=data)

    async def _parse_multipart(self, request: Request) -> _Parsed:
        reader = _MultipartReader(request.headers.get("content-type", ""), max_files=self.config.max_images,
                                  max_file_bytes=self.config.limits.max_bytes)
        async for chunk in request.stream():
            reader.feed(chunk)
        parts = reader.finish()
        files = [p for p in parts if p.filename is not None]
        if not files:
            raise Problem(400, "multipart body has no file; upload the image as a file field")
        batch = all(p.name == "images" for p in files)
        if not batch and len(files) > 1:
            raise Problem(400, "several files: send them all under the field name 'images' for a batch")
        for p in files:
            if not p.data:
                raise Problem(400, f"item {p.index}: {p.filename or 'upload'} is empty", item=p.index)
        fields = {p.name: p.data.decode("utf-8", "replace") for p in parts if p.filename is None}
        return _Parsed([_Item(p.index, data=bytes(p.data)) for p in files], not batch,
                       self._attributes_field(fields.get("attributes")), fields.get("form"))

    def _attributes_field(self, v: Any) -> list[str] | None:
        if v is None:
            return None
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return list(v)
        raise Problem(400, "'attributes' must be a list of attribute names (or a comma-separated string)")

    def _form(self, v: Any) -> str:
        if v is None:
            return "stored"
        if not isinstance(v, str):
            raise Problem(400, f"'form' must be a string: one of {', '.join(FORMS)}")
        if v not in FORMS:
            raise Problem(422, f"unknown form {v!r}; known: {', '.join(FORMS)}", known=list(FORMS))
        return v

    def _wanted(self, requested: list[str] | str | None) -> list[str]:
        if isinstance(requested, str):
            requested = self._attributes_field(requested)
        if not requested:
            return self.known_outputs
        unknown = [a for a in requested if a not in self.known_outputs]
        if unknown:
            raise Problem(422, f"unknown attribute(s) {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(self.known_outputs)}", known=self.known_outputs)
        return [a for a in self.known_outputs if a in requested]

    # -- loading images
    async def _load_all(self, items: list[_Item]) -> list[torch.Tensor]:
        results = await asyncio.gather(*(self._load(it) for it in items), return_exceptions=True)
        for r in results:  # the first failing item (by index) names the error
            if isinstance(r, BaseException):
                raise r
        return list(results)  # type: ignore[arg-type]

    async def _load(self, item: _Item) -> torch.Tensor:
        return await anyio.to_thread.run_sync(self._load_sync, item)

    def _load_sync(self, item: _Item) -> torch.Tensor:
        source = item.url or f"item {item.index}"
        try:
            data = item.data
            if item.url is not None:
                data = read_bytes(item.url, limits=self.config.limits, client=self._http)
            assert data is not None
            image = decode(data, source, limits=self.config.limits)
        except ImageError as e:
            if item.url is None:  # name the item once, not twice
                raise _problem_from_image_error(ImageError("image", e.cause, kind=e.kind), item.index) from None
            raise _problem_from_image_error(e, item.index) from None
        except httpx.TooManyRedirects:
            raise Problem(502, f"item {item.index}: upstream fetch failed: {shown_url(item.url or '')}: more "
                          f"than {self.config.max_redirects} redirects", item=item.index) from None
        except httpx.HTTPError as e:
            raise Problem(502, f"item {item.index}: upstream fetch failed: {shown_url(item.url or '')}: "
                          f"{type(e).__name__}", item=item.index) from None
        return self.encoder.preprocess(image)

    def _format(self, row: dict[str, np.ndarray], wanted: list[str], form: str = "stored") -> dict[str, list[float]]:
        if form == "query":
            unit = {a: query_form(row[a], self.query_slack).astype(np.float32) for a in self.attributes}
        else:
            unit = {a: _unit(row[a]) for a in self.attributes}
        out: dict[str, list[float]] = {}
        for a in wanted:
            if a == CONCAT_FIELD:
                out[a] = np.concatenate([unit[x] for x in self.attributes]).tolist()
            else:
                out[a] = unit[a].tolist()
        return out


def _unit(v: np.ndarray) -> np.ndarray:
    """The export already L2-normalises; this keeps emb_all exact if a future one does not."""
    v = np.asarray(v, dtype=np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def create_app(encoder: DeployedEncoder, config: ServeConfig | None = None) -> Starlette:
    """The ASGI app for an encoder (an :class:`fgplugin.export.ExportedEncoder`)."""
    service = EncoderService(encoder, config)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:16]
        log.error("request %s: unhandled %s", rid, type(exc).__name__, exc_info=exc)
        return JSONResponse({"error": {"status": 500, "message": "internal error", "request_id": rid}}, status_code=500)

    app = Starlette(
        routes=[
            Route("/encode", service.encode, methods=["POST"]),
            Route("/health", service.health, methods=["GET"]),
            Route("/model", service.model, methods=["GET"]),
        ],
        lifespan=service.lifespan,
        exception_handlers={Exception: server_error},
    )
    app.state.service = service
    return app


def load_app(model: str, *, config: ServeConfig | None = None, device: str = "auto") -> Starlette:
    return create_app(ExportedEncoder.load(model, device=device), config)


def run(model: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, config: ServeConfig | None = None,
        device: str = "auto", log_level: str = "info", graceful_timeout_s: int = 30) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then stops accepting, finishes in-flight requests (up to
    ``graceful_timeout_s``), and the lifespan shutdown drains the batcher."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load_app(model, config=config, device=device)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s)


class BackgroundServer:
    """uvicorn on a free localhost port in a background thread (tests and benchmarks)::

        with BackgroundServer(app) as srv:
            httpx.post(f"{srv.url}/encode", ...)
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


__all__ = [
    "DEFAULT_HOST", "DEFAULT_PORT", "CONCAT_FIELD", "VERSION_KEY", "ITEMS_KEY", "SERVE_LIMITS",
    "ServeConfig", "MicroBatcher", "EncoderService", "create_app", "load_app", "run", "host_allowed",
    "BackgroundServer",
]
