"""The explore page's server: static files (no build step, nothing from elsewhere) and JSON endpoints over a store.

Endpoints (all JSON but ``/``, ``/static/*`` and ``/api/image``)::

    GET  /api/info                       store, attributes (with values), metadata fields and types, what is on
    GET  /api/items?prefix=&offset=&limit=   stored items by id ascending (``Store.browse``)
    GET  /api/values?field=&limit=       a keyword field's values by count (``Store.keyword_values``)
    GET  /api/image?id=ID&size=N         an item's image as a JPEG thumbnail
    POST /api/search                     {"like_id" | "image" (base64), "attributes": {a: w}, "filters": [...],
                                          "k", "mode"} -> the hits (``fgplugin.query.execute.run_query``)
    POST /api/attention                  {"attributes": [...], "id" | "image"} -> heat map / ROI per attribute

A filter is a CLI filter string (``price<100``) or an object: ``{"field": f, "any": [v, ...]}``,
``{"field": f, "is": v}``, ``{"field": f, "gte"/"gt"/"lte"/"lt": v}``, ``{"field": f, "exists": bool}``.
Errors answer ``{"error": {"status", "cause", "message"}}``; ``cause`` is one of ``query`` (bad query
or filter, 400), ``unknown_id`` (404), ``image`` (400), ``model`` (the encoder or checkpoint, 503),
``store`` (the store cannot answer, 503), ``internal`` (500, details only in the log).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..catalog import load_catalog
from ..encoding import AttentionModel, DeployedEncoder
from ..errors import FgpluginError, ImageError, QueryError, StoreError
from ..images import ImageLimits, decode, load_image
from ..query.execute import load_encoder, result_to_dict, run_query
from ..query.html import attention_overlays, thumbnail_data_uri
from ..search.spec import Bool, Exists, Filter, QuerySpec, Range, Term, Terms, parse_filter
from ..search.store import Store

log = logging.getLogger("fgplugin.web")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 24 * 1024 * 1024  # an uploaded photo (20 MiB, the image limit) in base64 fits
IMAGE_LIMITS = ImageLimits(timeout_s=5.0, retries=0)
Labels = Mapping[str, Mapping[str, Any]]


class ApiError(Exception):
    def __init__(self, status: int, cause: str, message: str):
        super().__init__(message)
        self.status, self.cause, self.message = status, cause, message


def catalog_labels(path: str | Path, store: Store) -> dict[str, dict[str, Any]]:
    """id -> attribute labels from a catalog read with the store's schema (rows with problems are skipped:
    labels are shown, never relied on)."""
    catalog = load_catalog(path, store.require_layout().schema, strict=False)
    return {it.id: dict(it.labels) for it in catalog.items}


def filters_from_json(items: Any) -> list[Filter]:
    """The request's filters (strings in the CLI syntax or objects, see the module docstring); the store
    types their values against the layout and names an unknown field."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise QueryError("filters must be a list")
    return [_one_filter(f) for f in items]


def _one_filter(f: Any) -> Filter:
    if isinstance(f, str):
        return parse_filter(f)
    if not isinstance(f, dict) or not isinstance(f.get("field"), str) or not f["field"]:
        raise QueryError(f"filter {json.dumps(f)[:200]} must be a string or an object with a field")
    name, keys = f["field"], set(f) - {"field"}
    bounds = {k: f[k] for k in ("gt", "gte", "lt", "lte") if f.get(k) is not None}
    if keys == {"any"} and isinstance(f["any"], list) and f["any"]:
        return Term(name, f["any"][0]) if len(f["any"]) == 1 else Terms(name, tuple(f["any"]))
    if keys == {"is"}:
        return Term(name, f["is"])
    if keys == {"exists"} and isinstance(f["exists"], bool):
        return Exists(name) if f["exists"] else Bool(must_not=(Exists(name),))
    if bounds and keys <= {"gt", "gte", "lt", "lte"}:
        return Range(name, **bounds)
    raise QueryError(f"filter on {name!r}: give one of any: [values], is: value, gte/gt/lte/lt: bound, "
                     f"exists: true|false (got {', '.join(sorted(keys)) or 'nothing'})")


class Explorer:
    """The state behind the page: the store, the encoder (loaded on the first photo query), the attention
    model, the catalog labels."""

    def __init__(self, store: Store, *, model: str | None = None, encoder: DeployedEncoder | None = None,
                 explainer: AttentionModel | None = None, explainer_note: str = "", labels: Labels | None = None):
        self.store, self.model, self.encoder, self.explainer = store, model, encoder, explainer
        self.explainer_note = explainer_note or (
            "" if explainer else "attention maps need a training checkpoint: start with --checkpoint RUN_DIR "
                                 "(an export keeps only the encoder)")
        self.labels = labels or {}
        self._lock = threading.Lock()

    # -- handlers (blocking; run in the thread pool) -----------------------------------------------
    def info(self) -> dict[str, Any]:
        layout = self.store.require_layout()
        return {
            "store": self.store.url,
            "documents": self.store.count(),
            "model_version": layout.model_version,
            "attributes": [{"name": a.name, "values": list(a.values), "description": a.description}
                           for a in layout.schema.attributes],
            "metadata": dict(layout.metadata_types),
            "labels": bool(self.labels),
            "image_queries": bool(self.encoder or self.model or self.store.get_meta("model_path")),
            "attention": self.explainer is not None,
            "attention_note": self.explainer_note,
        }

    def items(self, prefix: str | None, offset: int, limit: int) -> dict[str, Any]:
        docs = self.store.browse(prefix or None, offset, limit)
        return {"items": [{"id": d.id, "metadata": d.metadata, "labels": self.labels.get(d.id)} for d in docs],
                "offset": offset, "prefix": prefix or ""}

    def values(self, field: str, limit: int) -> dict[str, Any]:
        return {"field": field, "values": [{"value": v, "count": n} for v, n in self.store.keyword_values(field, limit)]}

    def thumbnail(self, id_: str, size: int) -> bytes:
        source = self._image_source(id_)
        im = load_image(source, limits=IMAGE_LIMITS).convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def search(self, body: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        spec = QuerySpec(attributes=_weights(body.get("attributes")), like_id=_opt_str(body, "like_id"),
                         image=_image_bytes(body.get("image")), filters=filters_from_json(body.get("filters")),
                         k=body.get("k", 20), mode=body.get("mode", "exact"))
        if spec.like_id is not None and not self.store.exists(spec.like_id):
            raise ApiError(404, "unknown_id", f"no item with id {spec.like_id!r} in {self.store.url}")
        encoder = self._encoder() if spec.image is not None else None
        run = run_query(self.store, spec, encoder=encoder)
        out = result_to_dict(run)
        for h in out["hits"]:
            h["labels"] = self.labels.get(h["id"])
            h.pop("image", None)  # a local path: the page asks /api/image by id
        out["query"]["like_id"] = spec.like_id
        out["query"]["labels"] = self.labels.get(spec.like_id) if spec.like_id else None
        out["took_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return out

    def attention(self, body: Mapping[str, Any]) -> dict[str, Any]:
        attrs = body.get("attributes")
        if not isinstance(attrs, list) or not attrs or not all(isinstance(a, str) for a in attrs):
            raise QueryError("attributes must be a non-empty list of attribute names")
        self.store.require_layout().schema.check_names(attrs)
        if self.explainer is None:
            return {"panels": [], "reason": self.explainer_note}
        id_, data = _opt_str(body, "id"), _image_bytes(body.get("image"))
        if (id_ is None) == (data is None):
            raise QueryError("give exactly one of id or image")
        image = decode(data, "<uploaded photo>") if data is not None else \
            load_image(self._image_source(id_), limits=IMAGE_LIMITS)
        with self._lock:  # one forward pass at a time: the model is shared
            panels = attention_overlays(self.explainer, image, attrs)
        return {"panels": [{"attribute": a, "image": thumbnail_data_uri(im, 192)} for a, im in panels.items()],
                "reason": "" if panels else "this model variant has no attention maps or ROI boxes"}

    # -- helpers -------------------------------------------------------------------------------------
    def _image_source(self, id_: str) -> str:
        if not self.store.exists(id_):
            raise ApiError(404, "unknown_id", f"no item with id {id_!r} in {self.store.url}")
        source = self.store.image_of(id_)
        if not source:
            raise ApiError(404, "image", f"item {id_!r} has no image recorded in the store")
        return source

    def _encoder(self) -> DeployedEncoder:
        with self._lock:
            if self.encoder is None:
                try:
                    self.encoder = load_encoder(self.model, self.store, self.store.require_layout())
                except ModuleNotFoundError as e:
                    raise ApiError(503, "model", f"photo queries need torch ({e.name} is not installed): "
                                                 "install fgplugin[train]") from None
                except FgpluginError as e:
                    raise ApiError(503, "model", f"cannot load the encoder for photo queries: {e}") from None
            return self.encoder


def _weights(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise QueryError('attributes must be an object {"attribute": weight}')
    return {str(a): w for a, w in value.items()}


def _opt_str(body: Mapping[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise QueryError(f"{key} must be a string")
    return v


def _image_bytes(value: Any) -> bytes | None:
    """An uploaded photo: base64, optionally as a data URI."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise QueryError("image must be a base64 string")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("<uploaded photo>", "not valid base64", kind="corrupt") from None


def _int_arg(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, got {raw!r}") from None


def _error_response(e: Exception) -> JSONResponse:
    if isinstance(e, ApiError):
        status, cause, message = e.status, e.cause, e.message
    elif isinstance(e, StoreError):
        status, cause, message = 503, "store", str(e)
    elif isinstance(e, ImageError):
        status, cause, message = 400, "image", str(e)
    elif isinstance(e, FgpluginError):
        status, cause, message = 400, "query", str(e)
    else:
        rid = uuid.uuid4().hex[:16]
        log.error("request %s: unhandled %s", rid, type(e).__name__, exc_info=e)
        status, cause, message = 500, "internal", f"internal error (request {rid}; see the server log)"
    return JSONResponse({"error": {"status": status, "cause": cause, "message": message}}, status_code=status)


def _endpoint(work: Callable[[Request, Any], Any], *, json_body: bool = False) -> Callable[[Request], Any]:
    """An async handler: read the JSON body if asked, run ``work`` in the thread pool, answer JSON or the error."""

    async def handler(request: Request) -> Response:
        try:
            body = await _read_json(request) if json_body else None
            out = await run_in_threadpool(work, request, body)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error the page shows
            return _error_response(e)
        return out if isinstance(out, Response) else JSONResponse(out)

    return handler


async def _read_json(request: Request) -> dict[str, Any]:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise ApiError(413, "query", f"request of {int(size)} bytes is over the {MAX_BODY}-byte limit")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, "query", f"request of {len(raw)} bytes is over the {MAX_BODY}-byte limit")
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QueryError(f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise QueryError("request body must be a JSON object")
    return body


def create_app(store: Store, *, model: str | None = None, encoder: DeployedEncoder | None = None,
               explainer: AttentionModel | None = None, explainer_note: str = "",
               labels: Labels | None = None) -> Starlette:
    """The explore page over ``store``. ``model``: the export for photo queries (default: the one the
    store was indexed with), or an ``encoder`` already loaded; ``explainer``: a training model whose
    attention maps the page draws; ``labels``: id -> attribute labels shown beside the hits."""
    ex = Explorer(store, model=model, encoder=encoder, explainer=explainer, explainer_note=explainer_note,
                  labels=labels)

    def image(request: Request, _: Any) -> Response:
        id_ = request.query_params.get("id") or ""
        size = max(32, min(_int_arg(request, "size", 256), 1024))
        return Response(ex.thumbnail(id_, size), media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app = Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/api/info", _endpoint(lambda r, b: ex.info()), methods=["GET"]),
        Route("/api/items", _endpoint(lambda r, b: ex.items(r.query_params.get("prefix"), _int_arg(r, "offset", 0),
                                                            _int_arg(r, "limit", 50))), methods=["GET"]),
        Route("/api/values", _endpoint(lambda r, b: ex.values(r.query_params.get("field") or "",
                                                              _int_arg(r, "limit", 100))), methods=["GET"]),
        Route("/api/image", _endpoint(image), methods=["GET"]),
        Route("/api/search", _endpoint(lambda r, b: ex.search(b), json_body=True), methods=["POST"]),
        Route("/api/attention", _endpoint(lambda r, b: ex.attention(b), json_body=True), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    app.state.explorer = ex
    return app


__all__ = ["create_app", "catalog_labels", "filters_from_json", "Explorer", "ApiError", "STATIC"]
