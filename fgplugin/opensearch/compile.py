"""QuerySpec -> OpenSearch search body (through a per-query plan), and the response back to Hits with raw
weighted cosines.

Three modes (all filtered by the same compiled filters):

- ``exact``: ``script_score`` over ``bool.filter`` of the filters, scored by the painless script
  (``scripts.py``): ``sum w (1 + cos)`` over the chosen fields. Client side: ``score - sum w``; a
  document missing an attribute's vector counts cosine -1 for it.
- ``ann``: knn clauses chosen per query by ``plan_query`` (the plan ``fgplugin query --explain``
  shows), each with the filters as its efficient ``filter``:
  * one weighted attribute: one clause on that attribute's own field ``emb_<a>`` with ``w_a * q_a``;
  * weight carried by few of many attributes (one dominating): a ``bool.should`` of clauses on each
    weighted attribute's ``emb_<a>`` and on ``emb_all``, whose union is re-scored exactly (as in
    ``ann+rescore``), because summed knn scores of a union say nothing;
  * otherwise: one clause on ``emb_all`` with ``concat(w_a * q_a)`` (zeros for
    attributes not asked for; ``fgplugin.search.spec.combined_query_vector``).
  Against unit per-attribute vectors the inner product is exactly ``sum w_a cos_a``. The server
  reports faiss/lucene's inner-product score s = 1 + dot (dot >= 0) or 1 / (1 - dot) (dot < 0);
  ``innerproduct_dot`` inverts it: dot = s - 1 if s >= 1 else 1 - 1/s. A missing attribute is a zero
  block in ``emb_all``, so there it counts cosine 0, not -1 (and a document without ``emb_<a>`` is
  not in that attribute's graph).
- ``ann+rescore``: the same plans with each clause asking for the window (default 5 * k) of
  candidates; a top-level ``rescore`` re-scores them with the exact script (``query_weight`` 0,
  ``rescore_query_weight`` 1), so each returned score is exactly the script's value and converts
  like ``exact``.

Codecs (``fgplugin.codecs``): on an ``int8`` index (Lucene byte vectors) the script and every knn clause
get the query as int8 codes (``query_codes``; the server takes nothing else for a byte field), so the
script's score is ``cos(q8, c)``, the same as the embedded store's; a knn score on bytes is no weighted
cosine, so ``ann`` on such an index always rescores its candidates with the script.

Per-attribute cosines: ``docvalue_fields`` does not return knn vectors, so the body asks for the chosen
``emb_<a>`` fields in ``_source`` (with derived source, the 3.x default, the server rebuilds them from
the vector data) and ``parse_hits`` computes ``cos = q.x / |x|`` client side. Hits come back ordered by
score, ties by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..codecs import query_codes, scoring_query, stored_codec
from ..errors import QueryError
from ..search.spec import (Bool, Exists, Filter, Hit, QuerySpec, Range, Term, Terms, coerce_filters,
                          combined_query_vector)
from ..search.store import IndexLayout, to_utc
from .checks import MAX_K, RequestCheckError, check_request
from .mapping import ALL_FIELD, combined_blocks, emb_field
from .scripts import SCRIPT_ID, script_params, script_to_weighted_cosine, weighted_cosine_script

DEFAULT_RESCORE_FACTOR = 5  # ann+rescore window = 5 * k unless the spec says otherwise
# The HNSW beam of a knn clause when the spec names none (lucene would search with k alone). Measured
# at 100k items, 8 x 64-d, lucene, 24 segments, unfiltered: ef 100 gives recall@20 0.95 / 0.98 / 0.97
# for 1 / 2 / 4 attributes (own graph / emb_all / emb_all), ef 256 gives 0.99 / 0.995 / 0.997.
DEFAULT_EF_SEARCH = 256
# Union the weighted attributes' own graphs with emb_all when the weights point away from the direction
# emb_all's graph was built for (all attributes equal): effective attributes / all attributes below this.
# Measured (100k, 8 x 64-d, lucene, one segment, ef 256, recall@20 unfiltered): weights (1, 0.1) emb_all
# 0.90, union 0.99; (1, 0.5) 0.97 / 0.99 (ratio 0.225); (1, 0.5, 0.25, 0.125) 0.975 / 0.985 (ratio
# 0.33, union 13 ms slower); one attribute: emb_all 0.83, its own graph 0.995.
UNION_BELOW = 0.3
UNION_FACTOR = 5  # ann mode's candidates per clause of a union, in multiples of k (at least ef_search)


# -- score conversions --------------------------------------------------------------------------------
def innerproduct_score(dot: float) -> float:
    """The score faiss/lucene report for an inner product (k-NN docs, innerproduct space)."""
    return 1.0 + dot if dot >= 0 else 1.0 / (1.0 - dot)


def innerproduct_dot(score: float) -> float:
    """Invert ``innerproduct_score``: dot = s - 1 if s >= 1 else 1 - 1/s."""
    s = float(score)
    if s <= 0:
        raise QueryError(f"an inner-product k-NN score must be > 0, got {s!r}")
    return s - 1.0 if s >= 1.0 else 1.0 - 1.0 / s


# -- filters ------------------------------------------------------------------------------------------
def iso_utc(value: Any) -> str:
    """An ISO date (a date without a zone is UTC) -> ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``.

    OpenSearch's ``strict_date_optional_time`` refuses Python's ``2024-01-01 10:00`` form, and the
    embedded store also compares in UTC.
    """
    return to_utc(value).isoformat() + "Z"


def _value(v: Any, type_: str | None) -> Any:
    if type_ == "date" and v is not None:
        return iso_utc(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def compile_filter(f: Filter, types: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One filter -> query DSL (term, terms, range, exists, bool)."""
    types = types or {}
    if isinstance(f, Bool):
        body: dict[str, Any] = {}
        if f.must:
            body["must"] = [compile_filter(x, types) for x in f.must]
        if f.should:
            body["should"] = [compile_filter(x, types) for x in f.should]
            body["minimum_should_match"] = 1  # "at least one", even beside must (else should is optional)
        if f.must_not:
            body["must_not"] = [compile_filter(x, types) for x in f.must_not]
        return {"bool": body} if body else {"match_all": {}}
    t = types.get(f.field)
    if isinstance(f, Term):
        return {"term": {f.field: _value(f.value, t)}}
    if isinstance(f, Terms):
        return {"terms": {f.field: [_value(v, t) for v in f.values]}}
    if isinstance(f, Range):
        bounds = {k: _value(v, t) for k, v in (("gt", f.gt), ("gte", f.gte), ("lt", f.lt), ("lte", f.lte)) if v is not None}
        return {"range": {f.field: bounds}}
    if isinstance(f, Exists):
        return {"exists": {"field": f.field}}
    raise QueryError(f"unsupported filter {f!r}")


def compile_filters(filters: Sequence[Filter], types: Mapping[str, str] | None = None,
                    exclude_ids: Sequence[str] = ()) -> dict[str, Any] | None:
    """All filters ANDed (non-scoring ``bool.filter``), minus ``exclude_ids``; None when nothing filters."""
    body: dict[str, Any] = {}
    if filters:
        body["filter"] = [compile_filter(f, types) for f in filters]
    if exclude_ids:
        body["must_not"] = [{"ids": {"values": [str(i) for i in exclude_ids]}}]
    return {"bool": body} if body else None


# -- the plan: how an ANN query finds its candidates ---------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How a query runs on the server (``describe`` is what ``fgplugin query --explain`` shows).

    ``fields``: the knn fields searched, one clause each (empty: exact scan); ``candidates``: what each
    clause asks for (its ``k``); ``ef_search``: the HNSW beam each clause searches with; ``rescore``: the
    window the exact script re-scores (0: the knn score is the result's score).
    """

    route: str  # exact | attribute | attributes | attributes+all | all
    fields: tuple[str, ...] = ()
    candidates: int = 0
    ef_search: int | None = None
    rescore: int = 0

    def describe(self) -> str:
        if self.route == "exact":
            return "plan: exact (script_score over every document that passes the filters)"
        what = {"attribute": "the attribute's own HNSW graph",
                "attributes": "each weighted attribute's own graph, union (emb_all lacks one of them)",
                "attributes+all": "each weighted attribute's own graph and the concatenated emb_all, union",
                "all": "the concatenated emb_all graph"}[self.route]
        ef = f", ef_search {self.ef_search}" if self.ef_search else ""
        tail = f"; the {self.rescore} candidates re-scored exactly" if self.rescore else "; knn scores as they are"
        return f"plan: {self.route}: knn on {', '.join(self.fields)} ({what}), k {self.candidates} each{ef}{tail}"


def effective_attributes(weights: Mapping[str, float]) -> float:
    """(sum w)^2 / sum w^2: how many attributes carry the score (1 when one weight dominates)."""
    w = np.asarray([x for x in weights.values() if x > 0], dtype=np.float64)
    return float(w.sum() ** 2 / (w ** 2).sum()) if w.size else 0.0


def plan_query(spec: QuerySpec, layout: IndexLayout) -> Plan:
    """The measured rule (tests/test_opensearch_ann.py; bench numbers in the issue 26 report): one
    weighted attribute searches that attribute's own graph (emb_all navigated with zero blocks
    misses a part of it); weights carried by few of many attributes (``UNION_BELOW``) union the
    weighted attributes' own graphs with emb_all and re-score the union exactly; otherwise emb_all,
    where the weighted concatenation is a faithful proxy."""
    if spec.mode == "exact":
        return Plan("exact")
    k = int(spec.k)
    window = min(MAX_K, max(k, int(spec.rescore_window or DEFAULT_RESCORE_FACTOR * k)))
    ef = int(spec.ef_search) if spec.ef_search is not None else max(DEFAULT_EF_SEARCH, k)
    weighted = [a for a in layout.attributes if spec.attributes.get(a, 0) > 0]
    # byte vectors' knn scores are not weighted cosines: their candidates are always rescored
    rescored = spec.mode == "ann+rescore" or stored_codec(layout.codec) == "int8"
    if len(weighted) == 1:
        cand = window if rescored else k
        return Plan("attribute", (emb_field(weighted[0]),), cand, max(ef, cand), window if rescored else 0)
    in_all = {a for a, _ in combined_blocks(layout)}
    if any(a not in in_all for a in weighted):  # an attribute added in place: emb_all does not hold it
        fields = tuple(emb_field(a) for a in weighted)
        cand = min(max(window if rescored else UNION_FACTOR * k, ef), MAX_K // len(fields))
        return Plan("attributes", fields, cand, cand, cand * len(fields))
    if effective_attributes(spec.attributes) / len(layout.attributes) < UNION_BELOW:
        fields = tuple(emb_field(a) for a in weighted) + (ALL_FIELD,)
        # lucene returns max(k, ef_search) hits per clause: ask for as many as are searched, and
        # re-score them all (every clause's candidates fit in the window)
        cand = min(max(window if rescored else UNION_FACTOR * k, ef), MAX_K // len(fields))
        return Plan("attributes+all", fields, cand, cand, cand * len(fields))
    cand = window if rescored else k
    return Plan("all", (ALL_FIELD,), cand, max(ef, cand), window if rescored else 0)


# -- the query ----------------------------------------------------------------------------------------
def query_unit_vectors(spec: QuerySpec, layout: IndexLayout,
                       query_vectors: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Unit query vectors (float64) for the chosen attributes, from ``query_vectors`` or ``spec.vectors``
    (``IndexLayout.query_vector``: the slack value dropped where the index has one; on an int8 index the
    direction of its int8 codes, ``fgplugin.codecs.scoring_query``)."""
    vectors = query_vectors if query_vectors is not None else spec.vectors
    if vectors is None:
        raise QueryError("no query vectors: resolve the like-id or image reference first (pass query_vectors)")
    out = {}
    for a in spec.attributes:
        if a not in layout.dims:
            raise QueryError(f"unknown attribute {a!r}; the index has {', '.join(layout.attributes)}")
        if a not in vectors or vectors[a] is None:
            raise QueryError(f"no query vector for attribute {a!r}")
        x = np.asarray(vectors[a], dtype=np.float64).reshape(-1)
        if x.shape[0] != layout.dims[a]:
            raise QueryError(f"query vector for {a!r} has {x.shape[0]} numbers; the index holds {layout.dims[a]}")
        out[a] = scoring_query(layout.query_vector(a, x), layout.codec)
    return out


def script_vector(q: np.ndarray, layout: IndexLayout) -> list[float]:
    """A unit query vector as the script takes it for the index's fields (int8: its codes)."""
    return _floats(query_codes(q) if stored_codec(layout.codec) == "int8" else q)


def _floats(v: np.ndarray) -> list[float]:
    return np.asarray(v, dtype=np.float32).tolist()


def source_fields(spec: QuerySpec, layout: IndexLayout) -> list[str]:
    """What each hit should carry: metadata, image, model version and the chosen attributes' vectors."""
    return list(layout.metadata_types) + ["image", "model_version"] + [emb_field(a) for a in spec.attributes]


def to_opensearch(
    spec: QuerySpec,
    layout: IndexLayout,
    *,
    query_vectors: dict[str, np.ndarray] | None = None,
    stored_script_id: str | None = SCRIPT_ID,
) -> dict[str, Any]:
    """The ``_search`` body for ``spec`` (see the module docstring for the modes, ``plan_query`` for
    how an ANN query finds its candidates).

    ``spec.vectors`` or ``query_vectors`` supply the per-attribute query vectors (a like-id reference
    must be resolved by the caller; its id is excluded from the results when ``spec.exclude_self``).
    Filter values are typed by ``layout.metadata_types`` (unknown fields raise QueryError).
    """
    check_spec(spec)
    q = query_unit_vectors(spec, layout, query_vectors)
    filters = coerce_filters(spec.filters, layout.metadata_types)
    exclude = [spec.like_id] if spec.like_id is not None and spec.exclude_self else []
    filt = compile_filters(filters, layout.metadata_types, exclude)
    attrs = list(spec.attributes)
    script = weighted_cosine_script(
        script_params([emb_field(a) for a in attrs], [spec.attributes[a] for a in attrs],
                      [script_vector(q[a], layout) for a in attrs]),
        stored_script_id,
    )
    plan = plan_query(spec, layout)
    body: dict[str, Any] = {"size": int(spec.k), "_source": {"includes": source_fields(spec, layout)}}
    if plan.route == "exact":
        body["track_total_hits"] = True
        body["query"] = {"script_score": {"query": filt or {"match_all": {}}, "script": script}}
    else:
        clauses = [{"knn": {f: knn_clause(plan, knn_vector(f, spec, layout, q), filt)}} for f in plan.fields]
        body["query"] = clauses[0] if len(clauses) == 1 else {"bool": {"should": clauses}}
        if plan.rescore:
            body["rescore"] = {
                "window_size": plan.rescore,
                "query": {
                    "rescore_query": {"script_score": {"query": {"match_all": {}}, "script": script}},
                    "query_weight": 0.0,
                    "rescore_query_weight": 1.0,
                    "score_mode": "total",
                },
            }
    try:
        return check_request("search", body)
    except RequestCheckError as e:
        raise QueryError(str(e)) from None


def check_spec(spec: QuerySpec) -> None:
    """What the compiler needs of a spec (the store validates the rest against its schema)."""
    if spec.mode not in ("exact", "ann", "ann+rescore"):
        raise QueryError(f"mode must be exact, ann or ann+rescore, got {spec.mode!r}")
    if not spec.attributes:
        raise QueryError("no attribute chosen")
    for a, w in spec.attributes.items():
        if not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise QueryError(f"weight of {a!r} is {w!r}; weights must be numbers >= 0")
    if not 1 <= int(spec.k) <= MAX_K:
        raise QueryError(f"k must be in 1..{MAX_K}, got {spec.k!r}")


def knn_vector(field: str, spec: QuerySpec, layout: IndexLayout, q: Mapping[str, np.ndarray]) -> np.ndarray:
    """The query vector of one knn clause: concat(w_a q_a) on emb_all; w_a q_a on emb_<a>, so that the
    inner product is the attribute's weighted cosine either way. On an int8 index: int8 codes of that
    vector, each attribute's part divided by its scale first (the stored codes are ``scale_a * x_a``)."""
    int8 = stored_codec(layout.codec) == "int8"
    blocks = combined_blocks(layout)
    if field == ALL_FIELD and int8:
        v = np.concatenate([spec.attributes[a] * q[a] / layout.scale(a) if a in q else np.zeros(d) for a, d in blocks])
    elif field == ALL_FIELD:
        full = {a: (q[a] if a in q else np.zeros(d)) for a, d in blocks}
        v = combined_query_vector(spec, [a for a, _ in blocks], full)
    else:
        a = next(a for a in spec.attributes if emb_field(a) == field)
        v = spec.attributes[a] * q[a]
    return query_codes(v).astype(np.float64) if int8 else v


def knn_clause(plan: Plan, vector: np.ndarray, filt: dict[str, Any] | None) -> dict[str, Any]:
    """One knn clause: the filter inside it (efficient filtering: the graph search only visits passing
    documents, and the engine scans them exactly when few pass)."""
    clause: dict[str, Any] = {"vector": _floats(vector), "k": plan.candidates}
    if filt is not None:
        clause["filter"] = filt
    if plan.ef_search is not None:
        clause["method_parameters"] = {"ef_search": plan.ef_search}
    return clause


# -- the response -------------------------------------------------------------------------------------
def hit_score(raw: float, spec: QuerySpec, plan: Plan | None = None) -> float:
    """A hit's server score -> the raw weighted cosine total: the knn inner product where the plan
    returns knn scores, else the exact script's value."""
    if plan is not None and plan.route != "exact" and not plan.rescore:
        return innerproduct_dot(raw)
    return script_to_weighted_cosine(raw, spec.attributes)


def parse_hits(
    response: Mapping[str, Any],
    spec: QuerySpec,
    layout: IndexLayout,
    *,
    query_vectors: Mapping[str, Any] | None = None,
) -> list[Hit]:
    """Hits with the raw weighted cosine total, per-attribute cosines (from the returned vectors),
    metadata and image; ordered by score descending, then id ascending."""
    try:
        q = query_unit_vectors(spec, layout, query_vectors)
    except QueryError:
        q = {}  # no query vectors at hand: scores only
    plan = plan_query(spec, layout)
    hits = []
    for h in response.get("hits", {}).get("hits", []):
        raw = h.get("_score")
        if raw is None and h.get("sort"):
            raw = h["sort"][0]
        if raw is None:
            raise QueryError(f"hit {h.get('_id')!r} came back without a score")
        src = h.get("_source") or {}
        cosines = {}
        for a, u in q.items():
            v = src.get(emb_field(a))
            if v is not None:
                x = np.asarray(v, dtype=np.float64)
                n = float(np.linalg.norm(x))
                if n > 0 and x.shape == u.shape:
                    cosines[a] = float(u @ x / n)
        meta = {f: src[f] for f in layout.metadata_types if src.get(f) is not None}
        hits.append(Hit(id=str(h["_id"]), score=hit_score(float(raw), spec, plan), cosines=cosines,
                        metadata=meta, image=src.get("image")))
    hits.sort(key=lambda x: (-x.score, x.id))
    return hits


def total_candidates(response: Mapping[str, Any], spec: QuerySpec) -> int | None:
    """Documents that passed the filters (exact mode tracks the total); None where unknown."""
    if spec.mode != "exact":
        return None
    total = response.get("hits", {}).get("total")
    if isinstance(total, dict) and total.get("relation", "eq") == "eq":
        return int(total.get("value", 0))
    if isinstance(total, int):
        return total
    return None
