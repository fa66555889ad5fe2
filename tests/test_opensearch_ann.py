"""ANN on the real OpenSearch node for any attribute mix: recall@20 of modes ann and ann+rescore against
the brute-force exact ranking (NumPy) on a small clustered set (3k items, 8 attributes x 16-d, as
bench/query.py makes them), for 1, 2 and 4 attributes, with and without a 20 % filter; the scores
the plans return are the exact weighted cosines of the hits; the chosen plan is reported."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from fgplugin.opensearch.compile import plan_query
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.spec import QuerySpec, Term
from fgplugin.search.store import Document, IndexLayout

pytestmark = [pytest.mark.live]

N, D, K, QUERIES = 3000, 16, 20, 8
ATTRS = [f"a{i}" for i in range(8)]
CATS = [f"c{i}" for i in range(5)]  # one category: a 20 % filter
WEIGHTS = (1.0, 0.5, 0.25, 0.125)  # bench/query.py's weights for 1, 2 and 4 attributes
ENGINE = os.environ.get("FGPLUGIN_OPENSEARCH_ENGINE", "lucene")  # the test node has no faiss libraries
# Measured on this set (lucene, default ef_search 256): every row 1.00 (mean over the queries);
# the goal of issue 26 is 0.95.
FLOOR = 0.95


def clustered(n: int, d: int, seed: int, clusters: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for a in ATTRS:
        centres = rng.normal(size=(clusters, d)).astype(np.float32)
        x = centres[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
        out[a] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


@pytest.fixture(scope="module")
def data():
    vecs = clustered(N, D, seed=1)
    cat = np.array(CATS)[np.random.default_rng(2).integers(0, len(CATS), size=N)]
    ids = np.array([f"item{i:06d}" for i in range(N)])
    return vecs, cat, ids


@pytest.fixture(scope="module")
def store(opensearch_url, data):
    vecs, cat, ids = data
    schema = AttributeSchema(tuple(Attribute(a, ("x", "y")) for a in ATTRS), name="ann")
    layout = IndexLayout(schema, {a: D for a in ATTRS}, {"category": "keyword"}, "ann0aaaaaaaaaaa")
    st = OpenSearchStore.from_url(opensearch_url, index=f"fgann-{uuid.uuid4().hex[:8]}", refresh=False,
                                  engine=ENGINE, http_compress=False)
    st.ensure_index(layout)
    for s in range(0, N, 1000):
        docs = [Document(str(ids[i]), {a: vecs[a][i] for a in ATTRS}, {"category": str(cat[i])}, layout.model_version)
                for i in range(s, min(N, s + 1000))]
        assert not st.upsert(docs).failed
    st.refresh()
    yield st
    for name in list(st.client.indices.get(index=f"{st.index}-*")):
        st.client.indices.delete(index=name)
    st.close()


def queries(data, na: int, seed: int):
    """(weights, query vectors) near random items: the item's vector plus noise, as bench/query.py does."""
    vecs, _, _ = data
    rng = np.random.default_rng(seed)
    weights = dict(zip(ATTRS[:na], WEIGHTS))
    for _ in range(QUERIES):
        ref = int(rng.integers(0, N))
        yield weights, {a: vecs[a][ref] + 0.1 * rng.normal(size=D).astype(np.float32) for a in weights}


def exact(data, weights, q, category):
    """Brute force: (ids of the top K, score of every item) by sum w cos, ties by id."""
    vecs, cat, ids = data
    s = sum(w * (vecs[a] @ (q[a] / np.linalg.norm(q[a]))) for a, w in weights.items())
    masked = np.where(cat == category, s, -np.inf) if category else s
    return list(ids[np.lexsort((ids, -masked))[:K]]), dict(zip(ids, s))


@pytest.mark.parametrize("mode", ["ann", "ann+rescore"])
@pytest.mark.parametrize("category", [None, "c0"])
@pytest.mark.parametrize("na", [1, 2, 4])
def test_recall_at_20_against_brute_force(store, data, na, category, mode):
    recalls = []
    for weights, q in queries(data, na, seed=10 * na + (category is not None)):
        spec = QuerySpec(dict(weights), vectors=q, k=K, mode=mode, filters=[Term("category", category)] if category else [])
        res = store.search(spec)
        want, scores = exact(data, weights, q, category)
        got = [h.id for h in res.hits]
        assert len(got) == K
        recalls.append(len(set(got) & set(want)) / K)
        for h in res.hits:  # every plan returns the exact weighted cosine of its hits
            assert h.score == pytest.approx(float(scores[h.id]), abs=1e-4)
            if category:
                assert h.metadata["category"] == category
        assert res.plan == plan_query(spec, store.layout).describe() and res.plan.startswith("plan: ")
    assert np.mean(recalls) >= FLOOR, recalls


def test_one_attribute_searches_its_own_graph(store, data):
    """The headline query (one attribute) at a small beam: its own graph finds what emb_all with zero
    blocks misses (measured at ef_search 20 on this set: 0.99 against 0.90)."""
    (weights, q), = list(queries(data, 1, seed=99))[:1]
    spec = QuerySpec(dict(weights), vectors=q, k=K, mode="ann", ef_search=K)
    res = store.search(spec)
    assert "knn on emb_a0 " in res.plan and "emb_all" not in res.plan
    want, _ = exact(data, weights, q, None)
    assert len({h.id for h in res.hits} & set(want)) >= 18


def test_a_dominant_weight_unions_the_attribute_graphs(store, data):
    """Two attributes (of eight) where one carries nearly all the weight: the union of their own
    graphs and emb_all, re-scored exactly."""
    for _, q in list(queries(data, 2, seed=5))[:3]:
        weights = {"a0": 1.0, "a1": 0.05}
        res = store.search(QuerySpec(weights, vectors=q, k=K, mode="ann"))
        assert "attributes+all" in res.plan and "re-scored exactly" in res.plan
        want, scores = exact(data, weights, q, None)
        assert len({h.id for h in res.hits} & set(want)) >= 19
        for h in res.hits:
            assert h.score == pytest.approx(float(scores[h.id]), abs=1e-4)


def test_exact_mode_reports_its_plan(store, data):
    (weights, q), = list(queries(data, 2, seed=3))[:1]
    res = store.search(QuerySpec(dict(weights), vectors=q, k=K))
    assert res.plan.startswith("plan: exact")
    want, scores = exact(data, weights, q, None)
    assert [h.id for h in res.hits] == want  # ties are unlikely in float noise; the order is exact
    assert res.total_candidates == N
