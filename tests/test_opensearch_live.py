"""Live tests against a real OpenSearch cluster with the k-NN plugin: the node the test session starts
(tests/conftest.py, docker/opensearch-node.sh), or the cluster FGPLUGIN_OPENSEARCH_URL names (credentials
from the usual FGPLUGIN_OPENSEARCH_* variables). Skipped, saying why, only where no node can be had
(no Java). Each run works in its own alias (``fgtest-<random>``) and deletes its indices afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import numpy as np
import pytest

from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.search.spec import QuerySpec, parse_filter
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import Document, IndexLayout

pytestmark = [pytest.mark.live]

DIMS = {"sleeve": 16, "neckline": 8, "colour": 8}
TYPES = {"price": "float", "cat": "keyword", "stock": "boolean", "added": "date"}
CATS = ("dress", "skirt", "top", "coat")
N = 1500


def _layout(version: str) -> IndexLayout:
    schema = AttributeSchema(tuple(Attribute(n, ("a", "b", "c")) for n in DIMS), name="live")
    return IndexLayout(schema, DIMS, TYPES, version)


def _docs(seed: int, version: str) -> list[Document]:
    rng = np.random.default_rng(seed)
    centres = {a: rng.normal(size=(12, d)) for a, d in DIMS.items()}  # clustered, like real embeddings
    out = []
    for i in range(N):
        vecs = {a: (centres[a][rng.integers(12)] + 0.4 * rng.normal(size=d)).astype(np.float32) for a, d in DIMS.items()}
        vecs = {a: v / np.linalg.norm(v) for a, v in vecs.items()}
        if i % 31 == 7:
            del vecs["neckline"]
        meta = {"price": float(rng.integers(0, 40) * 5), "cat": CATS[i % 4], "stock": bool(i % 3),
                "added": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T12:00:00Z"}
        out.append(Document(f"sku-{i:05d}", vecs, meta, version))
    return out


def _passes(doc: Document, filters: list[str]) -> bool:
    m = doc.metadata
    checks = {"cat=dress,skirt": lambda: m["cat"] in ("dress", "skirt"), "price<100": lambda: m["price"] < 100,
              "stock=true": lambda: m["stock"] is True}
    return all(checks[f]() for f in filters)


def _reference(docs, spec: QuerySpec, q, missing: float) -> list[tuple[float, str]]:
    """NumPy brute force: sum w cos, a missing vector counting ``missing``; ties by id."""
    out = []
    for d in docs:
        if d.id == spec.like_id or not _passes(d, [f for f in FILTERS if parse_filter(f) in spec.filters]):
            continue
        s = sum(w * (float(d.vectors[a] @ (q[a] / np.linalg.norm(q[a]))) if a in d.vectors else missing)
                for a, w in spec.attributes.items())
        out.append((-s, d.id))
    out.sort()
    return [(-s, i) for s, i in out]


FILTERS = ["cat=dress,skirt", "price<100", "stock=true"]


@pytest.fixture(scope="module")
def live(opensearch_url):
    alias = f"fgtest-{uuid.uuid4().hex[:8]}"
    store = OpenSearchStore.from_url(opensearch_url, index=alias, refresh="wait_for",
                                     engine=os.environ.get("FGPLUGIN_OPENSEARCH_ENGINE", "lucene"))
    docs = _docs(0, "live1aaaaaaaaaa")
    store.ensure_index(_layout("live1aaaaaaaaaa"))
    res = store.upsert(docs)
    assert not res.failed and len(res.ok) == N
    yield store, docs
    for name in list(store.client.indices.get(index=f"{alias}-*")):
        store.client.indices.delete(index=name)
    store.close()


def test_live_round_trip(live):
    store, docs = live
    assert store.count() == N
    assert store.versions() == {d.id: "live1aaaaaaaaaa" for d in docs}
    got = store.get_vectors([docs[7].id, docs[8].id])
    assert set(got[docs[7].id]) == {"sleeve", "colour"}
    assert np.allclose(got[docs[8].id]["neckline"], docs[8].vectors["neckline"], atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "ann+rescore"])
@pytest.mark.parametrize("filters", [[], ["cat=dress,skirt", "price<100"], ["stock=true"]])
def test_live_exact_and_rescored_ranking_equal_numpy(live, mode, filters):
    store, docs = live
    spec = QuerySpec({"sleeve": 1.0, "neckline": 0.5}, like_id=docs[3].id, k=20, mode=mode,
                     filters=[parse_filter(f) for f in filters], rescore_window=400, ef_search=400)
    res = store.search(spec)
    ref = _reference(docs, spec, docs[3].vectors, missing=-1.0)[:20]
    got = [(h.score, h.id) for h in res.hits]
    if mode == "exact":
        assert [i for _, i in got] == [i for _, i in ref]
        assert res.total_candidates == len(_reference(docs, spec, docs[3].vectors, -1.0))
    else:  # ANN candidates: the rescored scores are exact; allow a miss at the tail
        assert len(set(i for _, i in got) & set(i for _, i in ref)) >= 18
    want = {i: s for s, i in _reference(docs, spec, docs[3].vectors, missing=-1.0)}
    for s, i in got:
        assert s == pytest.approx(want[i], abs=1e-5)


def test_live_ann_scores_convert_back_to_the_weighted_cosine(live):
    store, docs = live
    rng = np.random.default_rng(4)
    q = {a: rng.normal(size=d) for a, d in DIMS.items()}
    spec = QuerySpec({"sleeve": 0.7, "colour": 1.0}, vectors=q, k=10, mode="ann", ef_search=256)
    res = store.search(spec)
    ref = _reference(docs, spec, q, missing=0.0)
    want = {i: s for s, i in ref}
    assert len(set(h.id for h in res.hits) & set(i for _, i in ref[:10])) >= 8  # recall@10 on clustered data
    for h in res.hits:
        assert h.score == pytest.approx(want[h.id], abs=1e-4)
        assert h.cosines["colour"] == pytest.approx(
            float(next(d for d in docs if d.id == h.id).vectors["colour"] @ (q["colour"] / np.linalg.norm(q["colour"]))), abs=1e-5)


def test_live_inline_script_equals_stored_script(live):
    store, docs = live
    spec = QuerySpec({"colour": 1.0}, like_id=docs[0].id, k=10)
    stored = store.search(spec)
    inline = OpenSearchStore(store.config, client=store.client, stored_script=False).search(spec)
    assert [(h.id, round(h.score, 5)) for h in stored.hits] == [(h.id, round(h.score, 5)) for h in inline.hits]


def test_live_model_upgrade_swaps_the_alias(live):
    store, docs = live
    up = OpenSearchStore(store.config, client=store.client, refresh="wait_for", engine=store.engine)
    up.ensure_index(_layout("live2bbbbbbbbbb"))
    assert up.pending_promotion
    new = _docs(1, "live2bbbbbbbbbb")[:100]
    assert not up.upsert(new).failed
    assert {h.id for h in up.search(QuerySpec({"sleeve": 1.0}, like_id=docs[0].id, k=5)).hits} <= {d.id for d in docs}
    up.promote(delete_old=False)
    assert not up.pending_promotion and up.layout.model_version == "live2bbbbbbbbbb"
    assert up.count() == 100
    hits = up.search(dataclasses.replace(QuerySpec({"sleeve": 1.0}, like_id=new[0].id, k=5))).hits
    assert {h.id for h in hits} <= {d.id for d in new}
