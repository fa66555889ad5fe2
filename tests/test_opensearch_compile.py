"""Query compilation: filters, the three modes' bodies (validated against the official API spec), the
ANN query vector's exactness, score conversions both ways, and parsing responses into Hits."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from opensearch_spec import api_spec  # noqa: F401 (session fixture)
from fgplugin.errors import QueryError
from fgplugin.opensearch.checks import check_request
from fgplugin.opensearch.compile import (DEFAULT_EF_SEARCH, compile_filter, effective_attributes, hit_score,
                                         innerproduct_dot, innerproduct_score, iso_utc, parse_hits, plan_query,
                                         to_opensearch, total_candidates)
from fgplugin.opensearch.scripts import (MISSING_COSINE, SCRIPT_ID, SCRIPT_SOURCE, script_score,
                                         script_to_weighted_cosine, stored_script_body)
from fgplugin.search.spec import Bool, Exists, QuerySpec, Range, Term, Terms, coerce_filters, parse_filter
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import IndexLayout

DIMS = {"sleeve": 8, "neckline": 6, "colour": 4}
TYPES = {"price": "float", "cat": "keyword", "stock": "boolean", "added": "date", "title": "text", "qty": "integer"}
LAYOUT = IndexLayout(AttributeSchema(tuple(Attribute(n, ("a", "b", "c")) for n in DIMS), name="t"), DIMS, TYPES, "v1")


def unit(rng, d):
    x = rng.normal(size=d)
    return (x / np.linalg.norm(x)).astype(np.float32)


def qvecs(seed=0):
    rng = np.random.default_rng(seed)
    return {a: rng.normal(size=d).astype(np.float32) * 3 for a, d in DIMS.items()}  # not unit: compile normalises


def spec(mode="exact", **kw):
    base = dict(attributes={"sleeve": 1.0, "colour": 0.5}, vectors=qvecs(), k=7, mode=mode,
                filters=[parse_filter("price<100"), parse_filter("cat=dress,skirt")])
    base.update(kw)
    return QuerySpec(**base)


# -- filters ------------------------------------------------------------------------------------------
def test_filters_compile_to_typed_query_dsl():
    def one(text):
        (f,) = coerce_filters([parse_filter(text)], TYPES)
        return compile_filter(f, TYPES)

    assert one("cat=dress") == {"term": {"cat": "dress"}}
    assert one("cat=dress,skirt") == {"terms": {"cat": ["dress", "skirt"]}}
    assert one("price<100") == {"range": {"price": {"lt": 100.0}}}
    assert one("price>=20") == {"range": {"price": {"gte": 20.0}}}
    assert one("qty<=3") == {"range": {"qty": {"lte": 3}}}
    assert one("stock=true") == {"term": {"stock": True}}  # a JSON boolean, not "true"
    assert one("cat!=dress") == {"bool": {"must_not": [{"term": {"cat": "dress"}}]}}
    assert one("has:cat") == {"exists": {"field": "cat"}}
    assert one("!has:cat") == {"bool": {"must_not": [{"exists": {"field": "cat"}}]}}
    # dates go out as UTC ISO 8601 (a date without a zone is UTC)
    assert one("added>=2024-01-01") == {"range": {"added": {"gte": "2024-01-01T00:00:00Z"}}}
    assert one("added<2024-03-01T10:30:00+02:00") == {"range": {"added": {"lt": "2024-03-01T08:30:00Z"}}}
    assert iso_utc("2024-03-01 10:00:00") == "2024-03-01T10:00:00Z"
    nested = Bool(must=(Term("cat", "dress"),), should=(Range("price", lt=10.0), Exists("title")),
                  must_not=(Terms("qty", (1, 2)),))
    assert compile_filter(nested, TYPES) == {"bool": {
        "must": [{"term": {"cat": "dress"}}],
        "should": [{"range": {"price": {"lt": 10.0}}}, {"exists": {"field": "title"}}],
        "minimum_should_match": 1,  # "at least one", also beside must
        "must_not": [{"terms": {"qty": [1, 2]}}]}}


# -- the three modes ----------------------------------------------------------------------------------
def test_exact_body_is_a_filtered_script_score(api_spec):
    s = spec()
    body = to_opensearch(s, LAYOUT)
    api_spec.validate("search", body)
    assert body["size"] == 7 and body["track_total_hits"] is True
    ss = body["query"]["script_score"]
    assert ss["query"] == {"bool": {"filter": [{"range": {"price": {"lt": 100.0}}}, {"terms": {"cat": ["dress", "skirt"]}}]}}
    assert ss["script"]["id"] == SCRIPT_ID and "source" not in ss["script"]
    p = ss["script"]["params"]
    assert p["fields"] == ["emb_sleeve", "emb_colour"] and p["weights"] == [1.0, 0.5]
    for a, v in zip(("sleeve", "colour"), p["vectors"]):
        q = s.vectors[a] / np.linalg.norm(s.vectors[a])
        assert np.allclose(v, q, atol=1e-7)  # unit query vectors
    assert set(body["_source"]["includes"]) == set(TYPES) | {"image", "model_version", "emb_sleeve", "emb_colour"}
    json.dumps(body)  # plain JSON: no numpy scalars left
    inline = to_opensearch(s, LAYOUT, stored_script_id=None)
    api_spec.validate("search", inline)
    assert inline["query"]["script_score"]["script"] == {"lang": "painless", "source": SCRIPT_SOURCE, "params": p}
    nofilter = to_opensearch(dataclasses.replace(s, filters=[]), LAYOUT)
    assert nofilter["query"]["script_score"]["query"] == {"match_all": {}}


def knn_clauses(body):
    """{field: knn clause} of a body: one knn query, or a bool.should of them."""
    q = body["query"]
    clauses = q["bool"]["should"] if "bool" in q else [q]
    return {f: c for cl in clauses for f, c in cl["knn"].items()}


WIDE_DIMS = {**DIMS, "collar": 5}
WIDE = IndexLayout(AttributeSchema(tuple(Attribute(n, ("a", "b", "c")) for n in WIDE_DIMS), name="w"), WIDE_DIMS, TYPES, "v1")
EIGHT_DIMS = {**WIDE_DIMS, "hem": 3, "fit": 3, "fabric": 3, "pattern": 3}
EIGHT = IndexLayout(AttributeSchema(tuple(Attribute(n, ("a", "b")) for n in EIGHT_DIMS), name="e"), EIGHT_DIMS, TYPES, "v1")
FILTERED = {"bool": {"filter": [{"range": {"price": {"lt": 100.0}}}, {"terms": {"cat": ["dress", "skirt"]}}]}}


def test_plan_follows_the_effective_number_of_attributes():
    assert effective_attributes({"a": 1.0}) == 1.0
    assert effective_attributes({"a": 1.0, "b": 1.0, "c": 0.0}) == pytest.approx(2.0)
    assert effective_attributes({"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125}) == pytest.approx(1.875 ** 2 / 1.328125)

    def route(weights, layout=EIGHT, mode="ann"):
        vec = {a: np.ones(d) for a, d in layout.dims.items()}
        return plan_query(QuerySpec(weights, vectors=vec, k=20, mode=mode), layout).route

    assert route({"sleeve": 1.0}, mode="exact") == "exact"
    assert route({"sleeve": 1.0}) == route({"sleeve": 3.0, "colour": 0.0}) == "attribute"  # weight 0: not searched
    assert route({"sleeve": 1.0}, LAYOUT) == "attribute"
    # one weight dominating, or two attributes, among eight: 1.2 and 1.8 effective attributes of 8
    assert route({"sleeve": 1.0, "colour": 0.1}) == route({"sleeve": 1.0, "colour": 0.2}, mode="ann+rescore") == "attributes+all"
    assert route({"sleeve": 1.0, "colour": 0.5}) == "attributes+all"
    # bench/query.py's four-attribute mix: 2.65 effective attributes of 8
    assert route(dict(zip(EIGHT_DIMS, (1.0, 0.5, 0.25, 0.125)))) == route(dict.fromkeys(EIGHT_DIMS, 1.0)) == "all"
    assert route({"sleeve": 1.0, "colour": 0.1}, LAYOUT) == "all"  # few attributes in all: emb_all is close


def test_spread_weights_search_the_concatenated_field(api_spec):
    s = QuerySpec({"sleeve": 1.0, "neckline": 1.0, "colour": 0.5}, vectors={a: np.ones(d) for a, d in WIDE_DIMS.items()},
                  k=7, mode="ann", ef_search=256, filters=spec().filters)
    body = to_opensearch(s, WIDE)
    api_spec.validate("search", body)
    (field, clause), = body["query"]["knn"].items()
    assert field == "emb_all" and body["size"] == clause["k"] == 7
    assert clause["method_parameters"] == {"ef_search": 256}
    assert clause["filter"] == FILTERED
    v = np.asarray(clause["vector"])
    assert v.shape == (WIDE.total_dim,)
    blocks = np.split(v, np.cumsum([WIDE_DIMS[a] for a in WIDE.attributes])[:-1])
    assert np.allclose(blocks[3], 0)  # collar not asked for
    assert [np.linalg.norm(b) for b in blocks[:3]] == pytest.approx([1.0, 1.0, 0.5])
    assert "rescore" not in body
    default = knn_clauses(to_opensearch(dataclasses.replace(s, ef_search=None), WIDE))["emb_all"]
    assert default["method_parameters"] == {"ef_search": DEFAULT_EF_SEARCH}  # lucene would search with k alone
    assert "spread" not in plan_query(s, WIDE).describe() and "emb_all" in plan_query(s, WIDE).describe()


def test_one_attribute_searches_its_own_field(api_spec):
    s = spec("ann", attributes={"sleeve": 2.0})
    body = to_opensearch(s, LAYOUT)
    api_spec.validate("search", body)
    (field, clause), = body["query"]["knn"].items()
    assert field == "emb_sleeve" and body["size"] == clause["k"] == 7 and "rescore" not in body
    assert clause["filter"] == FILTERED and clause["method_parameters"] == {"ef_search": DEFAULT_EF_SEARCH}
    q = s.vectors["sleeve"] / np.linalg.norm(s.vectors["sleeve"])
    assert np.allclose(clause["vector"], 2.0 * q, atol=1e-6)  # inner product = w cos
    x = unit(np.random.default_rng(1), DIMS["sleeve"])
    raw = float(np.float32(innerproduct_score(float(np.asarray(clause["vector"]) @ x))))
    assert hit_score(raw, s, plan_query(s, LAYOUT)) == pytest.approx(2.0 * float(q @ x), abs=1e-5)
    assert plan_query(s, LAYOUT).describe().startswith("plan: attribute: knn on emb_sleeve ")
    rescored = to_opensearch(dataclasses.replace(s, mode="ann+rescore"), LAYOUT)
    api_spec.validate("search", rescored)
    assert rescored["query"]["knn"]["emb_sleeve"]["k"] == 35 == rescored["rescore"]["window_size"]


def test_a_dominant_attribute_unions_its_own_field_with_emb_all_rescored(api_spec):
    vec = {a: np.random.default_rng(len(a)).normal(size=d) for a, d in EIGHT_DIMS.items()}
    s = QuerySpec({"sleeve": 1.0, "colour": 0.2}, vectors=vec, k=7, mode="ann", filters=spec().filters)
    body = to_opensearch(s, EIGHT)
    api_spec.validate("search", body)
    clauses = knn_clauses(body)
    assert list(clauses) == ["emb_sleeve", "emb_colour", "emb_all"] and body["size"] == 7
    assert set(body["query"]["bool"]) == {"should"}  # a union: any clause's candidates
    for c in clauses.values():
        assert c["filter"] == FILTERED  # efficient filtering in every clause
        assert c["k"] == c["method_parameters"]["ef_search"] == DEFAULT_EF_SEARCH  # max(5 k, ef_search)
    q = {a: vec[a] / np.linalg.norm(vec[a]) for a in EIGHT_DIMS}
    assert np.allclose(clauses["emb_sleeve"]["vector"], q["sleeve"], atol=1e-6)
    assert np.allclose(clauses["emb_colour"]["vector"], 0.2 * q["colour"], atol=1e-6)
    assert body["rescore"]["window_size"] == 3 * DEFAULT_EF_SEARCH  # every clause's candidates
    rq = body["rescore"]["query"]
    assert rq["query_weight"] == 0.0 and rq["rescore_query_weight"] == 1.0
    assert rq["rescore_query"]["script_score"]["script"]["params"]["fields"] == ["emb_sleeve", "emb_colour"]
    assert "re-scored exactly" in plan_query(s, EIGHT).describe()
    big = to_opensearch(dataclasses.replace(s, mode="ann+rescore", rescore_window=400), EIGHT)
    assert {c["k"] for c in knn_clauses(big).values()} == {400} and big["rescore"]["window_size"] == 1200
    capped = to_opensearch(dataclasses.replace(s, mode="ann+rescore", k=5000), EIGHT)
    api_spec.validate("search", capped)
    assert {c["k"] for c in knn_clauses(capped).values()} == {3333} and capped["rescore"]["window_size"] == 9999
    # hits: the re-scored script value, like exact
    x = {a: np.ones(d) / np.sqrt(d) for a, d in EIGHT_DIMS.items()}
    raw = script_score({a: float(q[a] @ x[a]) for a in s.attributes}, s.attributes)
    assert hit_score(raw, s, plan_query(s, EIGHT)) == pytest.approx(float(q["sleeve"] @ x["sleeve"] + 0.2 * q["colour"] @ x["colour"]))


def test_ann_rescore_body_rescores_the_window_exactly(api_spec):
    s = QuerySpec({"sleeve": 1.0, "neckline": 1.0, "colour": 0.5}, vectors=qvecs(), k=7, mode="ann+rescore")
    body = to_opensearch(s, LAYOUT)
    api_spec.validate("search", body)
    assert body["query"]["knn"]["emb_all"]["k"] == 35 == body["rescore"]["window_size"]  # default 5 * k
    rq = body["rescore"]["query"]
    assert rq["query_weight"] == 0.0 and rq["rescore_query_weight"] == 1.0
    ss = rq["rescore_query"]["script_score"]
    assert ss["query"] == {"match_all": {}} and ss["script"]["id"] == SCRIPT_ID
    assert ss["script"]["params"]["fields"] == ["emb_sleeve", "emb_neckline", "emb_colour"]
    assert to_opensearch(dataclasses.replace(s, rescore_window=3), LAYOUT)["rescore"]["window_size"] == 7  # never below k
    assert to_opensearch(dataclasses.replace(s, k=5000), LAYOUT)["rescore"]["window_size"] == 10_000  # capped


def test_like_id_is_excluded_from_its_own_results(api_spec):
    s = spec("exact", vectors=None, like_id="sku-1")
    body = to_opensearch(s, LAYOUT, query_vectors=qvecs())
    api_spec.validate("search", body)
    assert body["query"]["script_score"]["query"]["bool"]["must_not"] == [{"ids": {"values": ["sku-1"]}}]
    ann = to_opensearch(dataclasses.replace(s, mode="ann"), LAYOUT, query_vectors=qvecs())
    for clause in knn_clauses(ann).values():
        assert clause["filter"]["bool"]["must_not"] == [{"ids": {"values": ["sku-1"]}}]
    keep = to_opensearch(dataclasses.replace(s, exclude_self=False), LAYOUT, query_vectors=qvecs())
    assert "must_not" not in keep["query"]["script_score"]["query"]["bool"]


def test_posterior_prob_index_gets_query_vectors_without_the_slack_value(api_spec):
    """With ``query_slack`` (posterior = prob vectors, fgplugin.similarity) every mode sends each query
    vector with its last value dropped and re-normalised, so a stored [p, sqrt(1 - |p|^2)] scores
    p_q . p_x / |p_q|; without it the vectors are only normalised."""
    slack = dataclasses.replace(LAYOUT, query_slack=True)
    s = spec()
    want = {}
    for a in ("sleeve", "colour"):
        v = s.vectors[a].astype(np.float64).copy()
        v[-1] = 0.0
        want[a] = v / np.linalg.norm(v)
    exact = to_opensearch(s, slack)
    api_spec.validate("search", exact)
    for a, v in zip(("sleeve", "colour"), exact["query"]["script_score"]["script"]["params"]["vectors"]):
        assert v[-1] == 0.0 and np.allclose(v, want[a], atol=1e-7)
    ann = to_opensearch(spec("ann", attributes={"sleeve": 1.0, "colour": 1.0}), slack)
    api_spec.validate("search", ann)
    vec = np.asarray(knn_clauses(ann)["emb_all"]["vector"])
    blocks = np.split(vec, np.cumsum([DIMS[a] for a in DIMS])[:-1])
    assert np.allclose(blocks[0], want["sleeve"], atol=1e-6) and np.allclose(blocks[2], want["colour"], atol=1e-6)
    plain = to_opensearch(s, LAYOUT)["query"]["script_score"]["script"]["params"]["vectors"]
    assert plain[0][-1] != 0.0  # the same vectors, no slack: only normalised
    with pytest.raises(QueryError, match="non-zero once its slack value is dropped"):
        to_opensearch(spec(vectors={**qvecs(), "colour": np.array([0.0, 0.0, 0.0, 1.0])}), slack)


def test_bad_queries_are_refused():
    with pytest.raises(QueryError, match="no query vectors"):
        to_opensearch(spec(vectors=None, like_id="x"), LAYOUT)
    with pytest.raises(QueryError, match="has 5 numbers"):
        to_opensearch(spec(vectors={**qvecs(), "sleeve": np.ones(5)}), LAYOUT)
    with pytest.raises(QueryError, match="non-zero"):
        to_opensearch(spec(vectors={**qvecs(), "colour": np.zeros(4)}), LAYOUT)
    with pytest.raises(QueryError, match="unknown field"):
        to_opensearch(spec(filters=[parse_filter("colourway=red")]), LAYOUT)
    with pytest.raises(QueryError, match=">= 0"):
        to_opensearch(spec(attributes={"sleeve": -1.0}), LAYOUT)
    with pytest.raises(QueryError, match="mode"):
        to_opensearch(spec(mode="fuzzy"), LAYOUT)


# -- exactness of the ANN vector and the score conversions -------------------------------------------
def test_ann_query_vector_scores_exactly_the_weighted_cosine_sum():
    rng = np.random.default_rng(3)
    n = 500
    docs = {a: np.stack([unit(rng, d) for _ in range(n)]) for a, d in DIMS.items()}
    docs["neckline"][::7] = 0  # some documents lack a vector: a zero block in emb_all
    s = spec("ann", attributes={"sleeve": 0.7, "neckline": 0.2, "colour": 1.3})
    clause = knn_clauses(to_opensearch(s, LAYOUT))["emb_all"]
    concat = np.concatenate([docs[a] for a in LAYOUT.attributes], axis=1)
    ip = concat @ np.asarray(clause["vector"], dtype=np.float64)
    want = sum(w * docs[a] @ (s.vectors[a] / np.linalg.norm(s.vectors[a])) for a, w in s.attributes.items())
    assert np.allclose(ip, want, atol=1e-5)
    assert list(np.argsort(-ip, kind="stable")[:50]) == list(np.argsort(-want, kind="stable")[:50])
    # what the server reports, converted back
    back = np.array([innerproduct_dot(np.float32(innerproduct_score(x))) for x in ip])
    assert np.allclose(back, ip, atol=1e-5)


@pytest.mark.parametrize("dot", [-7.5, -1.0, -0.25, -1e-9, 0.0, 1e-9, 0.3, 1.0, 2.9])
def test_innerproduct_score_conversion_inverts(dot):
    s = innerproduct_score(dot)
    assert s > 0
    assert (s >= 1) == (dot >= 0)  # negative dot products map below 1
    assert innerproduct_dot(s) == pytest.approx(dot, abs=1e-12)
    assert innerproduct_dot(float(np.float32(s))) == pytest.approx(dot, abs=1e-6 * max(1.0, abs(dot)) ** 2)


def test_innerproduct_score_must_be_positive():
    with pytest.raises(QueryError):
        innerproduct_dot(0.0)


def test_script_score_shift_inverts_and_missing_fields_count_minus_one():
    w = {"sleeve": 0.7, "neckline": 0.2, "colour": 1.3}
    cos = {"sleeve": -0.4, "neckline": None, "colour": 0.9}
    s = script_score(cos, w)
    assert s >= 0  # script_score refuses negative scores
    assert script_to_weighted_cosine(s, w) == pytest.approx(0.7 * -0.4 + 0.2 * MISSING_COSINE + 1.3 * 0.9)
    assert script_to_weighted_cosine(script_score({"sleeve": -1.0}, {"sleeve": 2.0}), [2.0]) == pytest.approx(-2.0)
    # float rounding just below -1 is clamped, never a negative score
    assert script_score({"sleeve": -1.0000001}, {"sleeve": 1.0}) == 0.0


def test_script_source_is_constant_and_guards_missing_fields(api_spec):
    assert "doc[f].size() != 0" in SCRIPT_SOURCE  # a missing field would throw in getValue()
    assert "Math.max(0.0, 1.0 + cosineSimilarity(params.vectors[i], doc[f]))" in SCRIPT_SOURCE
    assert not any(ch.isdigit() and ch not in "01" for ch in SCRIPT_SOURCE)  # no data baked into the source
    api_spec.validate("put_script", stored_script_body())
    check_request("put_script", stored_script_body())


# -- responses ----------------------------------------------------------------------------------------
def _response(rows, mode, s):
    """A server response for (id, cosines, metadata) rows, scored as OpenSearch would for ``mode``."""
    hits = []
    for id_, cos, meta, vecs in rows:
        if knn_scored(mode, s):
            dot = sum(w * (cos.get(a) or 0.0) for a, w in s.attributes.items())
            raw = innerproduct_score(dot)
        else:
            raw = script_score(cos, s.attributes)
        hits.append({"_index": "fg-v1", "_id": id_, "_score": float(np.float32(raw)),
                     "_source": {**meta, "image": f"img/{id_}.jpg", "model_version": "v1", **vecs}})
    hits.sort(key=lambda h: -h["_score"])
    return {"took": 3, "hits": {"total": {"value": 42, "relation": "eq"}, "hits": hits}}


def knn_scored(mode, s):
    return mode != "exact" and not plan_query(s, LAYOUT).rescore


@pytest.mark.parametrize("mode, weights", [("exact", None), ("ann", None), ("ann+rescore", None),
                                           ("ann", {"sleeve": 1.0, "colour": 1.0, "neckline": 1.0}),
                                           ("ann", {"colour": 1.5})])
def test_parse_hits_recovers_scores_cosines_and_metadata(mode, weights, api_spec):
    rng = np.random.default_rng(5)
    s = spec(mode, attributes=weights or {"sleeve": 1.0, "colour": 0.5})
    q = {a: s.vectors[a] / np.linalg.norm(s.vectors[a]) for a in DIMS}
    rows = []
    names = list(dict.fromkeys(["sleeve", "colour", *s.attributes]))
    for i in range(6):
        vecs = {f"emb_{a}": unit(rng, DIMS[a]).tolist() for a in names}
        if i == 4:
            del vecs["emb_colour"]  # this document has no colour vector
        cos = {a: float(q[a] @ np.asarray(vecs[f"emb_{a}"])) if f"emb_{a}" in vecs else None for a in names}
        rows.append((f"id-{i}", cos, {"price": 10.0 * i, "cat": "dress"}, vecs))
    rows.append(("id-0b", rows[0][1], rows[0][2], rows[0][3]))  # a tie with id-0
    hits = parse_hits(_response(rows, mode, s), s, LAYOUT)
    assert len(hits) == 7
    for h in hits:
        _, cos, meta, _ = next(r for r in rows if r[0] == h.id)
        present = {a: cos[a] for a in s.attributes if cos[a] is not None}
        assert h.cosines == pytest.approx(present, abs=1e-6)
        missing = 0.0 if knn_scored(mode, s) else MISSING_COSINE  # an emb_all zero block counts 0
        want = sum(w * (cos[a] if cos[a] is not None else missing) for a, w in s.attributes.items())
        assert h.score == pytest.approx(want, abs=1e-5)
        assert h.metadata == meta and h.image == f"img/{h.id}.jpg"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    i0, i0b = [i for i, h in enumerate(hits) if h.id in ("id-0", "id-0b")]
    assert i0b == i0 + 1  # ties by id ascending
    assert total_candidates({"hits": {"total": {"value": 42, "relation": "eq"}}}, s) == (42 if mode == "exact" else None)
