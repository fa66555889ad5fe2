"""A small in-process stand-in for an OpenSearch node with the k-NN plugin (tests only).

No OpenSearch server can run on the development machines, so the store's tests talk HTTP to this
threaded ``http.server`` on 127.0.0.1. It implements the endpoints the store uses (aliases, index
create/mapping, stored scripts, _bulk, _mget, _search with scroll, _count, _refresh) with the
documented semantics (opensearch-facts.md):

- every request body is validated against the official API spec (``validate(kind, body)``); violations
  are recorded in ``spec_errors`` and answered with 400;
- _bulk answers per item like OpenSearch: 201/200 on success, 400 ``mapper_parsing_exception`` for a
  vector of the wrong dimension, 400 ``strict_dynamic_mapping_exception`` for an unmapped field (the
  mapping is ``dynamic: strict``); faults are injected with ``bulk_statuses`` (whole-request statuses
  for the next bulk calls), ``throttle`` (id -> how many more times to answer 429 for it) and
  ``reject`` (ids answered 400);
- queries: match_all, bool, term, terms, range, exists, ids; ``knn`` (innerproduct space, faiss score
  1+dot / 1/(1-dot), efficient filter, exact neighbours); ``script_score`` running the stored
  weighted-cosine script's documented formula sum w*max(0, 1+cos) over the fields a document has
  (any other script source is refused); top-level ``rescore`` (window, query_weight,
  rescore_query_weight, score_mode total). Scores are rounded to float32 as Lucene's are.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

WEIGHTED_COSINE_MARKERS = ("doc[f].size() != 0", "Math.max(0.0, 1.0 + cosineSimilarity(params.vectors[i], doc[f]))",
                           "params.weights[i]")


class FakeError(Exception):
    def __init__(self, status: int, type_: str, reason: str):
        self.status, self.type, self.reason = status, type_, reason

    def body(self) -> dict[str, Any]:
        err = {"type": self.type, "reason": self.reason}
        return {"error": {"root_cause": [err], **err}, "status": self.status}


def f32(x: float) -> float:
    return float(np.float32(x))


class FakeOpenSearch:
    def __init__(self, validate: Callable[[str, Any], list[str]] | None = None):
        self.validate = validate
        self.indices: dict[str, dict[str, Any]] = {}
        self.aliases: dict[str, set[str]] = {}
        self.red_indices: set[str] = set()  # indices whose health reads red (tests of a lost primary)
        self.scripts: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.spec_errors: list[str] = []
        self.bulk_statuses: list[int | None] = []  # whole-request status for the next bulk calls (None: normal)
        self.throttle: dict[str, int] = {}  # id -> remaining 429 answers
        self.reject: dict[str, str] = {}  # id -> reason for a 400 mapper_parsing_exception
        self.auth: str | None = None  # the Authorization header every request must carry (None: any)
        self.lock = threading.Lock()
        self._scrolls: dict[str, list[dict[str, Any]]] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeOpenSearch":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeOpenSearch":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def bodies(self, kind: str) -> list[Any]:
        return [r["body"] for r in self.requests if r["kind"] == kind]

    # -- HTTP ---------------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args: Any) -> None:  # keep pytest output quiet
                pass

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                if self.headers.get("Content-Encoding") == "gzip" and raw:
                    raw = gzip.decompress(raw)
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                try:
                    status, body = fake.route(self.command, unquote(parts.path), query, raw,
                                             {k.lower(): v for k, v in self.headers.items()})
                except FakeError as e:
                    status, body = e.status, e.body()
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        return Handler

    def _check(self, kind: str, body: Any) -> None:
        if self.validate is None:
            return
        errs = self.validate(kind, body)
        if errs:
            self.spec_errors.extend(f"{kind}: {e}" for e in errs)
            raise FakeError(400, "x_content_parse_exception", f"{kind} body breaks the API spec: {errs[0]}")

    def route(self, method: str, path: str, query: dict[str, str], raw: bytes, headers: dict[str, str]):
        segs = [s for s in path.split("/") if s]
        body: Any = None
        kind = None
        if raw:
            if segs and segs[-1] == "_bulk":
                body = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            else:
                body = json.loads(raw)
        with self.lock:
            rec = {"method": method, "path": path, "query": query, "body": body, "headers": headers, "kind": None}
            self.requests.append(rec)
            if self.auth is not None and headers.get("authorization") != self.auth:
                raise FakeError(401, "security_exception", "missing or wrong authentication credentials")
            if segs[:1] == ["_alias"] and method == "GET":
                return self._get_alias(segs[1])
            if segs[:2] == ["_cluster", "health"] and method == "GET":
                names = self._resolve(segs[2]) if len(segs) > 2 else list(self.indices)
                red = [n for n in names if n in self.red_indices]  # a lost primary, which a real node cannot be told to show
                return 200, {"status": "red" if red else "green", "unassigned_shards": len(red)}
            if segs[:1] == ["_aliases"]:
                rec["kind"] = kind = "indices.update_aliases"
                self._check(kind, body)
                return self._update_aliases(body)
            if segs[:1] == ["_scripts"]:
                rec["kind"] = kind = "put_script"
                self._check(kind, body)
                self.scripts[segs[1]] = body["script"]
                return 200, {"acknowledged": True}
            if segs[:2] == ["_search", "scroll"]:
                if method == "DELETE":
                    return 200, {"succeeded": True, "num_freed": 1}
                sid = (body or {}).get("scroll_id") or query.get("scroll_id")
                return 200, self._scroll_page(sid)
            if segs and segs[-1] == "_bulk":
                rec["kind"] = kind = "bulk"
                self._check(kind, body)
                return self._bulk(segs[0] if len(segs) == 2 else None, body, query)
            if not segs:
                return 200, {"version": {"distribution": "opensearch", "number": "3.2.0"}}
            name = segs[0]
            if len(segs) == 1:
                if method == "HEAD":
                    return (200 if self._resolve(name, missing_ok=True) else 404), None
                if method == "PUT":
                    rec["kind"] = kind = "indices.create"
                    self._check(kind, body)
                    return self._create(name, body or {})
                if method == "DELETE":
                    for i in self._resolve(name):
                        del self.indices[i]
                        for s in self.aliases.values():
                            s.discard(i)
                    return 200, {"acknowledged": True}
            op = segs[1]
            if op == "_mapping":
                if method in ("PUT", "POST"):
                    rec["kind"] = kind = "indices.put_mapping"
                    self._check(kind, body)
                    return self._put_mapping(name, body)
                return 200, {i: {"mappings": self.indices[i]["mappings"]} for i in self._resolve(name)}
            if op == "_mget":
                rec["kind"] = kind = "mget"
                self._check(kind, body)
                return self._mget(name, body, query)
            if op == "_search":
                rec["kind"] = kind = "search"
                self._check(kind, body or {})
                return self._search(name, body or {}, query)
            if op == "_count":
                if body is not None:
                    rec["kind"] = kind = "count"
                    self._check(kind, body)
                docs = self._docs(name)
                q = (body or {}).get("query")
                return 200, {"count": sum(1 for i, s in docs.items() if q is None or self._match(q, s, self._one(name), i))}
            if op == "_refresh":
                return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        raise FakeError(400, "illegal_argument_exception", f"fake: no handler for {method} {path}")

    # -- indices and aliases ------------------------------------------------------------------------
    def _resolve(self, name: str, missing_ok: bool = False) -> list[str]:
        if name in self.indices:
            return [name]
        if self.aliases.get(name):
            return sorted(self.aliases[name])
        if missing_ok:
            return []
        raise FakeError(404, "index_not_found_exception", f"no such index [{name}]")

    def _one(self, name: str) -> str:
        got = self._resolve(name)
        if len(got) != 1:
            raise FakeError(400, "illegal_argument_exception", f"alias [{name}] has more than one index")
        return got[0]

    def _docs(self, name: str) -> dict[str, dict[str, Any]]:
        return self.indices[self._one(name)]["docs"]

    def _get_alias(self, alias: str):
        if not self.aliases.get(alias):
            return 404, {"error": f"alias [{alias}] missing", "status": 404}
        return 200, {i: {"aliases": {alias: {}}} for i in sorted(self.aliases[alias])}

    def _create(self, name: str, body: dict[str, Any]):
        if name in self.indices or name in self.aliases:
            raise FakeError(400, "resource_already_exists_exception", f"index [{name}] already exists")
        self.indices[name] = {"settings": body.get("settings", {}), "mappings": body.get("mappings", {}), "docs": {}}
        for alias in body.get("aliases", {}):
            self.aliases.setdefault(alias, set()).add(name)
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _put_mapping(self, name: str, body: dict[str, Any]):
        for i in self._resolve(name):
            m = self.indices[i]["mappings"]
            m.setdefault("properties", {}).update(body.get("properties", {}))
            if "_meta" in body:
                m["_meta"] = body["_meta"]  # _meta is replaced as a whole, as OpenSearch does
        return 200, {"acknowledged": True}

    def _update_aliases(self, body: dict[str, Any]):
        new = {k: set(v) for k, v in self.aliases.items()}
        for action in body["actions"]:
            (op, spec), = action.items()
            if spec["index"] not in self.indices:
                raise FakeError(404, "index_not_found_exception", f"no such index [{spec['index']}]")
            if op == "add":
                new.setdefault(spec["alias"], set()).add(spec["index"])
            elif op == "remove":
                if spec["index"] not in new.get(spec["alias"], set()):
                    raise FakeError(404, "aliases_not_found_exception", f"aliases [{spec['alias']}] missing")
                new[spec["alias"]].discard(spec["index"])
        self.aliases = new  # all actions or none
        return 200, {"acknowledged": True}

    # -- documents ----------------------------------------------------------------------------------
    def _validate_doc(self, index: str, src: dict[str, Any]) -> None:
        props = self.indices[index]["mappings"].get("properties", {})
        for f, v in src.items():
            if f not in props:
                raise FakeError(400, "strict_dynamic_mapping_exception",
                                f"mapping set to strict, dynamic introduction of [{f}] within [_doc] is not allowed")
            p = props[f]
            if p.get("type") == "knn_vector" and (not isinstance(v, list) or len(v) != p["dimension"]):
                raise FakeError(400, "mapper_parsing_exception",
                                f"failed to parse field [{f}] of type [knn_vector] in document. Vector dimension "
                                f"mismatch. Expected: {p['dimension']}, Given: {len(v) if isinstance(v, list) else '?'}")

    def _bulk(self, default_index: str | None, lines: list[dict[str, Any]], query: dict[str, str]):
        status = self.bulk_statuses.pop(0) if self.bulk_statuses else None
        if status:  # None or 0: answer this bulk call normally
            raise FakeError(status, "fake_unavailable" if status >= 500 else "rejected_execution_exception",
                            f"fake: whole bulk request answered {status}")
        items, i = [], 0
        while i < len(lines):
            (op, meta), = lines[i].items()
            i += 1
            src = None
            if op != "delete":
                src = lines[i]
                i += 1
            index = self._one(meta.get("_index") or default_index)
            id_ = meta["_id"]
            base = {"_index": index, "_id": id_}
            try:
                if self.throttle.get(id_, 0) > 0:
                    self.throttle[id_] -= 1
                    raise FakeError(429, "rejected_execution_exception",
                                    "rejected execution of coordinating operation [coordinating_and_primary_bytes=...]")
                if id_ in self.reject:
                    raise FakeError(400, "mapper_parsing_exception", self.reject[id_])
                docs = self.indices[index]["docs"]
                if op == "delete":
                    found = docs.pop(id_, None) is not None
                    items.append({op: {**base, "result": "deleted" if found else "not_found",
                                       "status": 200 if found else 404}})
                    continue
                self._validate_doc(index, src)
                created = id_ not in docs
                docs.pop(id_, None)
                docs[id_] = src  # insertion order = Lucene doc order for ties
                items.append({op: {**base, "_version": 1, "result": "created" if created else "updated",
                                   "status": 201 if created else 200}})
            except FakeError as e:
                items.append({op: {**base, "status": e.status, "error": {"type": e.type, "reason": e.reason}}})
        return 200, {"took": 1, "errors": any("error" in next(iter(x.values())) for x in items), "items": items}

    def _mget(self, name: str, body: dict[str, Any], query: dict[str, str]):
        index = self._one(name)
        includes = [s for s in query.get("_source_includes", "").split(",") if s]
        docs = self.indices[index]["docs"]
        out = []
        for id_ in body["ids"]:
            if id_ in docs:
                out.append({"_index": index, "_id": id_, "found": True, "_source": _pick(docs[id_], includes)})
            else:
                out.append({"_index": index, "_id": id_, "found": False})
        return 200, {"docs": out}

    # -- search -------------------------------------------------------------------------------------
    def _search(self, name: str, body: dict[str, Any], query: dict[str, str]):
        index = self._one(name)
        docs = self.indices[index]["docs"]
        q = body.get("query", {"match_all": {}})
        size = int(body.get("size", query.get("size", 10)))
        scored = [(i, s) for i, s in ((i, self._score(q, src, index, i)) for i, src in docs.items()) if s is not None]
        if isinstance(q, dict) and "knn" in q:  # a top-level knn returns its k neighbours only
            (field, params), = q["knn"].items()
            scored = sorted(scored, key=lambda t: -t[1])[: params["k"]]
        scored.sort(key=lambda t: -t[1])  # stable: ties keep document order
        total = len(scored)
        for r in ([body["rescore"]] if isinstance(body.get("rescore"), dict) else body.get("rescore", [])):
            w = r.get("window_size", 10)
            rq = r["query"]
            qw, rw = rq.get("query_weight", 1.0), rq.get("rescore_query_weight", 1.0)
            window = []
            for i, s in scored[:w]:
                rs = self._score(rq["rescore_query"], docs[i], index, i)
                window.append((i, f32(qw * s + rw * rs) if rs is not None else f32(qw * s)))
            window.sort(key=lambda t: -t[1])
            scored = window + scored[w:]
        src_filter = body.get("_source", True)
        includes = src_filter.get("includes", []) if isinstance(src_filter, dict) else (
            src_filter if isinstance(src_filter, list) else [])
        if "scroll" in query:
            sid = f"scroll-{len(self._scrolls)}"
            all_hits = [{"_index": index, "_id": i, "_score": None, "_source": _pick(docs[i], includes)} for i, _ in scored]
            self._scrolls[sid] = all_hits[size:]
            return 200, {"_scroll_id": sid, "hits": {"total": {"value": total, "relation": "eq"}, "hits": all_hits[:size]},
                         "_shards": {"total": 1, "successful": 1, "failed": 0}}
        hits = [{"_index": index, "_id": i, "_score": s, "_source": _pick(docs[i], includes)} for i, s in scored[:size]]
        return 200, {"took": 1, "timed_out": False, "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
                     "hits": {"total": {"value": total, "relation": "eq"}, "max_score": hits[0]["_score"] if hits else None,
                              "hits": hits}}

    def _scroll_page(self, sid: str):
        rest = self._scrolls.get(sid, [])
        page, self._scrolls[sid] = rest[:1000], rest[1000:]
        return {"_scroll_id": sid, "hits": {"total": {"value": len(page), "relation": "eq"}, "hits": page},
                "_shards": {"total": 1, "successful": 1, "failed": 0}}

    def _score(self, q: dict[str, Any], src: dict[str, Any], index: str, id_: str) -> float | None:
        """The document's score for query ``q`` (None: no match)."""
        (qtype, inner), = q.items()
        if qtype == "knn":
            (field, params), = inner.items()
            prop = self.indices[index]["mappings"]["properties"][field]
            if prop["method"]["space_type"] != "innerproduct":
                raise FakeError(400, "illegal_argument_exception", "fake: only innerproduct spaces")
            if field not in src or ("filter" in params and not self._match(params["filter"], src, index, id_)):
                return None
            dot = float(np.dot(np.asarray(params["vector"], np.float32), np.asarray(src[field], np.float32)))
            return f32(1.0 + dot if dot >= 0 else 1.0 / (1.0 - dot))
        if qtype == "script_score":
            if not self._match(inner["query"], src, index, id_):
                return None
            script = inner["script"]
            source = self.scripts[script["id"]]["source"] if "id" in script else script["source"]
            if not all(m in source for m in WEIGHTED_COSINE_MARKERS):
                raise FakeError(400, "script_exception", "fake: only the weighted-cosine script is implemented")
            p = script["params"]
            s = 0.0
            for f, w, v in zip(p["fields"], p["weights"], p["vectors"]):
                if src.get(f) is None:
                    continue  # doc[f].size() == 0
                x, qv = np.asarray(src[f], np.float32), np.asarray(v, np.float32)
                cos = float(np.float32(np.dot(qv, x) / (np.linalg.norm(qv) * np.linalg.norm(x))))
                s += w * max(0.0, 1.0 + cos)
            if s < 0 or s != s:
                raise FakeError(400, "illegal_argument_exception", f"script_score script returned an invalid score [{s}]")
            return f32(s)
        return 1.0 if self._match(q, src, index, id_) else None

    def _match(self, q: dict[str, Any], src: dict[str, Any], index: str, id_: str) -> bool:
        (qtype, inner), = q.items()
        props = self.indices[index]["mappings"].get("properties", {})
        if qtype == "match_all":
            return True
        if qtype == "bool":
            def many(key):
                v = inner.get(key, [])
                return v if isinstance(v, list) else [v]
            if not all(self._match(x, src, index, id_) for x in many("must") + many("filter")):
                return False
            if any(self._match(x, src, index, id_) for x in many("must_not")):
                return False
            should = many("should")
            msm = inner.get("minimum_should_match", 0 if (many("must") or many("filter")) else 1)
            return not should or sum(self._match(x, src, index, id_) for x in should) >= int(msm)
        if qtype == "ids":
            return id_ in inner["values"]
        if qtype == "exists":
            return src.get(inner["field"]) is not None
        if qtype in ("term", "terms", "range"):
            (field, arg), = ((k, v) for k, v in inner.items() if k not in ("boost", "_name"))
            t = props.get(field, {}).get("type")
            value = src.get(field)
            if value is None:
                return False
            if qtype == "term":
                return _eq(value, arg, t)
            if qtype == "terms":
                return any(_eq(value, a, t) for a in arg)
            v = _conv(value, t)
            ops = {"gt": lambda a: v > a, "gte": lambda a: v >= a, "lt": lambda a: v < a, "lte": lambda a: v <= a}
            return all(ops[k](_conv(a, t)) for k, a in arg.items() if k in ops)
        raise FakeError(400, "parsing_exception", f"fake: unknown query [{qtype}]")


def _conv(v: Any, t: str | None) -> Any:
    if t == "date":
        d = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        return d.astimezone(dt.timezone.utc) if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)
    if t in ("double", "float", "long", "integer"):
        return float(v)
    if t == "boolean":
        return v if isinstance(v, bool) else str(v).lower() == "true"
    return v


def _eq(value: Any, arg: Any, t: str | None) -> bool:
    if t == "text":
        return str(arg) in re.split(r"[^0-9a-z]+", str(value).lower())
    return _conv(value, t) == _conv(arg, t)


def _pick(src: dict[str, Any], includes: list[str]) -> dict[str, Any]:
    return {k: v for k, v in src.items() if k in includes} if includes else dict(src)
