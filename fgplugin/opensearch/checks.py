"""The project's own checks on every OpenSearch request body, stricter than the API spec.

The official spec (``../shared/opensearch-api-spec``; the tests validate against it) leaves open what
the server or our scoring needs: engine and space_type values, the exclusivity of k / max_distance /
min_score, one field per knn clause, size <= k, non-negative weights, finite vectors. The store calls
``check_request(kind, body)`` before sending; a violation raises ``RequestCheckError`` naming the path
in the body and the cause, so a bad request never leaves the process.

``kind`` is the spec's operation name: indices.create, indices.put_mapping, indices.update_aliases,
put_script, search, bulk (a list of NDJSON lines as dicts), mget, count.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..errors import FgpluginError

MAX_DIMENSION = 16_000
MAX_K = 10_000
ENGINES = ("faiss", "lucene")
# Spaces per engine for float HNSW fields (facts §1); hamming needs binary vectors, which we never send.
SPACES = {"faiss": ("innerproduct", "cosinesimil", "l2"), "lucene": ("innerproduct", "cosinesimil", "l2")}
DATA_TYPES = ("float", "byte")  # byte: the int8 codec (Lucene byte vectors)
METHODS = ("hnsw",)  # ivf needs a trained model; we never use one
HNSW_PARAMS = {"faiss": {"m", "ef_construction", "ef_search", "encoder"}, "lucene": {"m", "ef_construction", "encoder"}}
KNN_KEYS = {"vector", "k", "min_score", "max_distance", "filter", "method_parameters", "rescore",
            "expand_nested_docs", "boost", "_name"}
KNN_METHOD_PARAMS = {"ef_search", "nprobes"}
KINDS = ("indices.create", "indices.put_mapping", "indices.update_aliases", "put_script", "search", "bulk",
         "mget", "count")


class RequestCheckError(FgpluginError, ValueError):
    """A request body breaks a rule the server (or our scoring) depends on."""


def check_request(kind: str, body: Any) -> Any:
    """Raise RequestCheckError listing what is wrong with ``body`` for ``kind``; return ``body``."""
    if kind not in _CHECKS:
        raise ValueError(f"unknown request kind {kind!r}; one of {', '.join(KINDS)}")
    problems: list[str] = []
    _CHECKS[kind](body, problems)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise RequestCheckError(f"{kind} request refused: {'; '.join(problems[:5])}{more}")
    return body


# -- helpers ------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return _is_int(v) and lo <= v <= hi


def _vector_problem(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return "must be a non-empty list of numbers"
    if len(v) > MAX_DIMENSION:
        return f"has {len(v)} numbers (max {MAX_DIMENSION})"
    # the common case, a NumPy array's tolist(), checked in C (a per-number loop cost 1 ms per document)
    if set(map(type, v)) == {float} and np.isfinite(np.array(v)).all():
        return None
    for x in v:
        if not _is_num(x):
            return f"holds {x!r}, not a finite number"
    return None


def _object(body: Any, problems: list[str], what: str) -> bool:
    if not isinstance(body, dict):
        problems.append(f"{what} must be a JSON object, got {type(body).__name__}")
        return False
    return True


# -- mappings -----------------------------------------------------------------------------------------
def _settings_knn(settings: Any) -> tuple[Any, Any]:
    """(index.knn, index.knn.algo_param.ef_search) in nested or flattened form."""
    if not isinstance(settings, dict):
        return None, None
    idx = settings.get("index") if isinstance(settings.get("index"), dict) else {}
    knn = idx.get("knn", settings.get("index.knn"))
    ef = idx.get("knn.algo_param.ef_search", settings.get("index.knn.algo_param.ef_search"))
    if isinstance(idx.get("knn"), dict):  # {"index": {"knn": {"algo_param": {...}}}} is not what we send
        knn = None
    return knn, ef


def _check_properties(props: Any, path: str, problems: list[str], ann: list[str]) -> None:
    if not isinstance(props, dict):
        problems.append(f"{path} must be an object of field mappings")
        return
    for name, prop in props.items():
        p = f"{path}.{name}"
        if not isinstance(prop, dict):
            problems.append(f"{p} must be an object")
            continue
        if "properties" in prop:
            _check_properties(prop["properties"], p + ".properties", problems, ann)
        if prop.get("type") == "knn_vector":
            _check_knn_vector(prop, p, problems, ann)


def _check_knn_vector(prop: dict, p: str, problems: list[str], ann: list[str]) -> None:
    if not _int_in(prop.get("dimension"), 1, MAX_DIMENSION):
        problems.append(f"{p}.dimension must be an integer in 1..{MAX_DIMENSION}, got {prop.get('dimension')!r}")
    dt = prop.get("data_type", "float")
    if dt not in DATA_TYPES:
        problems.append(f"{p}.data_type {dt!r} is not supported here (use {', '.join(DATA_TYPES)})")
    if "model_id" in prop:
        problems.append(f"{p}: trained models (model_id) are not used by fgplugin")
    method = prop.get("method")
    if not isinstance(method, dict):
        problems.append(f"{p}.method must name the engine explicitly (faiss or lucene), so behaviour "
                        "does not depend on the server version's default")
        return
    ann.append(p)
    engine = method.get("engine")
    if engine == "nmslib":
        problems.append(f"{p}.method.engine nmslib is deprecated and cannot create new fields on OpenSearch 3.x; "
                        "use faiss or lucene")
        return
    if engine not in ENGINES:
        problems.append(f"{p}.method.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        return
    if method.get("name") not in METHODS:
        problems.append(f"{p}.method.name must be one of {', '.join(METHODS)}, got {method.get('name')!r}")
    spaces = [s for s in (prop.get("space_type"), method.get("space_type")) if s is not None]
    if not spaces:
        problems.append(f"{p}: space_type must be given (one of {', '.join(SPACES[engine])})")
    elif len(set(spaces)) > 1:
        problems.append(f"{p}: space_type given twice with different values {spaces}")
    elif spaces[0] not in SPACES[engine]:
        problems.append(f"{p}: space_type {spaces[0]!r} is not allowed for {engine}; use one of {', '.join(SPACES[engine])}")
    params = method.get("parameters", {})
    if not isinstance(params, dict):
        problems.append(f"{p}.method.parameters must be an object")
        return
    unknown = sorted(set(params) - HNSW_PARAMS[engine])
    if unknown:
        problems.append(f"{p}.method.parameters: unknown for {engine} hnsw: {', '.join(unknown)}")
    if "m" in params and not _int_in(params["m"], 2, 100):
        problems.append(f"{p}.method.parameters.m must be an integer in 2..100, got {params['m']!r}")
    if "ef_construction" in params and not _int_in(params["ef_construction"], 2, 4096):
        problems.append(f"{p}.method.parameters.ef_construction must be an integer in 2..4096, got {params['ef_construction']!r}")
    if "ef_search" in params and not _int_in(params["ef_search"], 1, MAX_K):
        problems.append(f"{p}.method.parameters.ef_search must be an integer in 1..{MAX_K}")


def _check_mapping_body(mappings: Any, path: str, problems: list[str], ann: list[str]) -> None:
    if not _object(mappings, problems, path):
        return
    if "properties" in mappings:
        _check_properties(mappings["properties"], path + ".properties", problems, ann)
    if mappings.get("dynamic", "strict") not in ("strict", "false", False, "true", True):
        problems.append(f"{path}.dynamic has an unknown value {mappings.get('dynamic')!r}")


def _check_index_create(body: Any, problems: list[str]) -> None:
    if not _object(body, problems, "body"):
        return
    ann: list[str] = []
    if "mappings" in body:
        _check_mapping_body(body["mappings"], "mappings", problems, ann)
    knn, ef = _settings_knn(body.get("settings"))
    if ann and knn not in (True, "true"):
        problems.append(f"settings.index.knn must be true: {', '.join(ann)} build(s) an ANN graph and knn "
                        "queries fail on an index without it")
    if ef is not None and not (_int_in(ef, 1, MAX_K) or (isinstance(ef, str) and ef.isdigit() and 1 <= int(ef) <= MAX_K)):
        problems.append(f"settings.index.knn.algo_param.ef_search must be an integer in 1..{MAX_K}, got {ef!r}")
    aliases = body.get("aliases", {})
    if not isinstance(aliases, dict):
        problems.append("aliases must be an object")


def _check_put_mapping(body: Any, problems: list[str]) -> None:
    _check_mapping_body(body, "body", problems, [])


# -- queries ------------------------------------------------------------------------------------------
_COMPOUND_LISTS = {"bool": ("must", "should", "filter", "must_not"), "dis_max": ("queries",)}
_COMPOUND_ONE = {"script_score": ("query",), "function_score": ("query",), "constant_score": ("filter",),
                 "nested": ("query",), "boosting": ("positive", "negative")}


def _check_query(q: Any, path: str, problems: list[str], knns: list[dict]) -> None:
    if not isinstance(q, dict) or len(q) != 1:
        problems.append(f"{path} must be an object with exactly one query type")
        return
    (qtype, inner), = q.items()
    p = f"{path}.{qtype}"
    if qtype == "knn":
        _check_knn(inner, p, problems, knns)
        return
    if not isinstance(inner, dict):
        if qtype not in ("match_all", "match_none"):
            problems.append(f"{p} must be an object")
        return
    for key in _COMPOUND_LISTS.get(qtype, ()):
        sub = inner.get(key)
        if sub is None:
            continue
        subs = sub if isinstance(sub, list) else [sub]
        for i, s in enumerate(subs):
            _check_query(s, f"{p}.{key}[{i}]", problems, knns)
    for key in _COMPOUND_ONE.get(qtype, ()):
        if key in inner:
            _check_query(inner[key], f"{p}.{key}", problems, knns)
    if qtype == "bool" and "minimum_should_match" in inner and not _is_int(inner["minimum_should_match"]) \
            and not isinstance(inner["minimum_should_match"], str):
        problems.append(f"{p}.minimum_should_match must be an integer or a string")
    if qtype == "script_score":
        if "script" not in inner:
            problems.append(f"{p}.script is required")
        else:
            _check_script(inner["script"], p + ".script", problems)
    if qtype in ("term", "terms", "range") and len(inner) - ("boost" in inner) - ("_name" in inner) != 1:
        problems.append(f"{p} must name exactly one field")
    if qtype == "terms":
        vals = [v for k, v in inner.items() if k not in ("boost", "_name")]
        if vals and (not isinstance(vals[0], list) or not vals[0]):
            problems.append(f"{p}: terms needs a non-empty list of values")
    if qtype == "range":
        for field_, bounds in inner.items():
            if field_ in ("boost", "_name"):
                continue
            if not isinstance(bounds, dict) or not set(bounds) & {"gt", "gte", "lt", "lte"}:
                problems.append(f"{p}.{field_} must give at least one of gt, gte, lt, lte")
    if qtype == "exists" and not isinstance(inner.get("field"), str):
        problems.append(f"{p}.field must be a field name")


def _check_knn(inner: Any, p: str, problems: list[str], knns: list[dict]) -> None:
    if not isinstance(inner, dict) or len(inner) != 1:
        problems.append(f"{p} must name exactly one vector field (one field per knn clause), "
                        f"got {len(inner) if isinstance(inner, dict) else type(inner).__name__}")
        return
    (fname, params), = inner.items()
    p = f"{p}.{fname}"
    if not isinstance(params, dict):
        problems.append(f"{p} must be an object")
        return
    unknown = sorted(set(params) - KNN_KEYS)
    if unknown:
        problems.append(f"{p}: unknown key(s) {', '.join(unknown)} (the server rejects them)")
    err = _vector_problem(params.get("vector"))
    if err:
        problems.append(f"{p}.vector {err}")
    given = [k for k in ("k", "max_distance", "min_score") if k in params]
    if len(given) != 1:
        problems.append(f"{p}: give exactly one of k, max_distance, min_score (got {', '.join(given) or 'none'})")
    if "k" in params and not _int_in(params["k"], 1, MAX_K):
        problems.append(f"{p}.k must be an integer in 1..{MAX_K}, got {params['k']!r}")
    for key in ("max_distance", "min_score"):
        if key in params and not _is_num(params[key]):
            problems.append(f"{p}.{key} must be a finite number")
    if "rescore" in params and given and given[0] != "k" and params["rescore"] not in (False, None):
        problems.append(f"{p}: knn rescore cannot be combined with {given[0]}")
    mp = params.get("method_parameters")
    if mp is not None:
        if not isinstance(mp, dict):
            problems.append(f"{p}.method_parameters must be an object")
        else:
            for k2, v in mp.items():
                if k2 not in KNN_METHOD_PARAMS:
                    problems.append(f"{p}.method_parameters: unknown key {k2!r}")
                elif not _int_in(v, 1, MAX_K):
                    problems.append(f"{p}.method_parameters.{k2} must be an integer in 1..{MAX_K}, got {v!r}")
    if "filter" in params:
        _check_query(params["filter"], p + ".filter", problems, [])
    knns.append(params)


def _check_script(script: Any, p: str, problems: list[str]) -> None:
    if not isinstance(script, dict):
        problems.append(f"{p} must be an object")
        return
    has_id, has_src = "id" in script, "source" in script
    if has_id == has_src:
        problems.append(f"{p} needs exactly one of id (stored script) or source (inline)")
    if has_src:
        if not isinstance(script["source"], str) or not script["source"].strip():
            problems.append(f"{p}.source must be non-empty text")
        if script.get("lang", "painless") not in ("painless", "knn"):
            problems.append(f"{p}.lang must be painless or knn, got {script.get('lang')!r}")
    params = script.get("params", {})
    if not isinstance(params, dict):
        problems.append(f"{p}.params must be an object")
        return
    if "weights" in params or "vectors" in params or "fields" in params:
        _check_weighted_params(params, p + ".params", problems)


def _check_weighted_params(params: dict, p: str, problems: list[str]) -> None:
    fields, weights, vectors = params.get("fields"), params.get("weights"), params.get("vectors")
    if not (isinstance(fields, list) and isinstance(weights, list) and isinstance(vectors, list)):
        problems.append(f"{p} must hold lists fields, weights and vectors")
        return
    if not fields or not len(fields) == len(weights) == len(vectors):
        problems.append(f"{p}: fields, weights and vectors must be non-empty lists of the same length "
                        f"(got {len(fields)}, {len(weights)}, {len(vectors)})")
    for i, f in enumerate(fields):
        if not isinstance(f, str) or not f:
            problems.append(f"{p}.fields[{i}] must be a field name")
    if len(set(map(str, fields))) != len(fields):
        problems.append(f"{p}.fields names a field twice")
    for i, w in enumerate(weights):
        if not _is_num(w) or w < 0:
            problems.append(f"{p}.weights[{i}] is {w!r}; weights must be finite numbers >= 0 "
                            "(the script adds w*(1+cos), which must not be negative)")
    for i, v in enumerate(vectors):
        err = _vector_problem(v)
        if err:
            problems.append(f"{p}.vectors[{i}] {err}")
        elif not any(v):
            problems.append(f"{p}.vectors[{i}] is all zeros; cosine similarity is undefined")


def _check_search(body: Any, problems: list[str]) -> None:
    if not _object(body, problems, "body"):
        return
    size = body.get("size", 10)
    if not _int_in(size, 0, MAX_K):
        problems.append(f"size must be an integer in 0..{MAX_K}, got {size!r}")
        size = 10
    knns: list[dict] = []
    if "query" in body:
        _check_query(body["query"], "query", problems, knns)
        top = body["query"]
        if isinstance(top, dict) and "knn" in top and knns and "k" in knns[0]:
            if "size" not in body:
                problems.append("a top-level knn query needs an explicit size <= k (the default size is 10)")
            elif _is_int(knns[0]["k"]) and size > knns[0]["k"]:
                problems.append(f"size {size} exceeds the knn k {knns[0]['k']}; use size <= k")
    if "rescore" in body:
        rescores = body["rescore"] if isinstance(body["rescore"], list) else [body["rescore"]]
        for i, r in enumerate(rescores):
            p = f"rescore[{i}]"
            if not isinstance(r, dict) or not isinstance(r.get("query"), dict):
                problems.append(f"{p} must be an object with a query")
                continue
            ws = r.get("window_size", 10)
            if not _int_in(ws, 1, MAX_K):
                problems.append(f"{p}.window_size must be an integer in 1..{MAX_K}, got {ws!r}")
            elif ws < size:
                problems.append(f"{p}.window_size {ws} is below size {size}: hits past the window keep unrescored scores")
            rq = r["query"]
            if "rescore_query" not in rq:
                problems.append(f"{p}.query.rescore_query is required")
            else:
                _check_query(rq["rescore_query"], f"{p}.query.rescore_query", problems, [])
            for key in ("query_weight", "rescore_query_weight"):
                if key in rq and not _is_num(rq[key]):
                    problems.append(f"{p}.query.{key} must be a finite number")
        sort = body.get("sort")
        if sort not in (None, "_score", ["_score"], [{"_score": "desc"}], [{"_score": {"order": "desc"}}]):
            problems.append("rescore cannot be combined with a sort other than _score")
    if "_source" in body:
        src = body["_source"]
        if not (isinstance(src, (bool, str, list)) or isinstance(src, dict)):
            problems.append("_source must be a bool, a field list or an includes/excludes object")


def _check_count(body: Any, problems: list[str]) -> None:
    if body is None:
        return
    if _object(body, problems, "body") and "query" in body:
        _check_query(body["query"], "query", problems, [])


# -- other bodies -------------------------------------------------------------------------------------
def _check_put_script(body: Any, problems: list[str]) -> None:
    if not _object(body, problems, "body"):
        return
    s = body.get("script")
    if not isinstance(s, dict):
        problems.append("script must be an object with lang and source")
        return
    if s.get("lang") != "painless":
        problems.append(f"script.lang must be painless, got {s.get('lang')!r}")
    if not isinstance(s.get("source"), str) or not s["source"].strip():
        problems.append("script.source must be non-empty text")
    if "params" in s:
        problems.append("a stored script takes its params at query time, not in its definition")


def _check_update_aliases(body: Any, problems: list[str]) -> None:
    if not _object(body, problems, "body"):
        return
    actions = body.get("actions")
    if not isinstance(actions, list) or not actions:
        problems.append("actions must be a non-empty list")
        return
    added: dict[str, int] = {}
    for i, a in enumerate(actions):
        if not isinstance(a, dict) or len(a) != 1 or next(iter(a)) not in ("add", "remove", "remove_index"):
            problems.append(f"actions[{i}] must be one of add, remove, remove_index")
            continue
        (op, spec), = a.items()
        if not isinstance(spec, dict) or not isinstance(spec.get("index"), str):
            problems.append(f"actions[{i}].{op} must name an index")
            continue
        if op != "remove_index" and not isinstance(spec.get("alias"), str):
            problems.append(f"actions[{i}].{op} must name an alias")
        if op == "add":
            added[spec.get("alias")] = added.get(spec.get("alias"), 0) + 1
    for alias, n in added.items():
        if n > 1:
            problems.append(f"alias {alias!r} is added to {n} indices in one swap; queries would read both")


def _check_bulk(lines: Any, problems: list[str]) -> None:
    if not isinstance(lines, list) or not lines:
        problems.append("bulk body must be a non-empty list of NDJSON lines")
        return
    i = 0
    while i < len(lines):
        action = lines[i]
        p = f"line {i + 1}"
        if not isinstance(action, dict) or len(action) != 1 or next(iter(action)) not in ("index", "create", "update", "delete"):
            problems.append(f"{p} must be an action (index, create, update or delete)")
            return
        (op, meta), = action.items()
        if not isinstance(meta, dict) or not isinstance(meta.get("_id"), str) or not meta["_id"]:
            problems.append(f"{p}: every {op} action needs a non-empty string _id (catalog id)")
        i += 1
        if op == "delete":
            continue
        if i >= len(lines) or not isinstance(lines[i], dict):
            problems.append(f"{p}: {op} action without a document line")
            return
        doc = lines[i].get("doc", lines[i]) if op == "update" else lines[i]
        for k, v in doc.items():
            if k.startswith("emb_"):
                err = _vector_problem(v)
                if err:
                    problems.append(f"line {i + 1} ({meta.get('_id')!r}).{k} {err}")
        i += 1


def _check_mget(body: Any, problems: list[str]) -> None:
    if not _object(body, problems, "body"):
        return
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(x, str) and x for x in ids):
        problems.append("ids must be a non-empty list of document ids")


_CHECKS: dict[str, Callable[[Any, list[str]], None]] = {
    "indices.create": _check_index_create,
    "indices.put_mapping": _check_put_mapping,
    "indices.update_aliases": _check_update_aliases,
    "put_script": _check_put_script,
    "search": _check_search,
    "bulk": _check_bulk,
    "mget": _check_mget,
    "count": _check_count,
}
