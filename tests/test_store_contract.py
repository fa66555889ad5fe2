"""One store contract, judged on both stores: the embedded DuckDB store and a real OpenSearch node (the
node the test session starts, tests/conftest.py; or FGPLUGIN_OPENSEARCH_URL). The same documents go into
both; the same QuerySpecs give the same ids in the same order with scores within 1e-4 (exact), ANN
recall is measured against exact, and writes, updates, deletes, per-item errors and a model change
behave the same. A two-node cluster (2 primaries, 1 replica) answers the same queries."""

from __future__ import annotations

import dataclasses
import os
import uuid

import numpy as np
import pytest

from fgplugin.errors import QueryError, StoreError
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.search.spec import QuerySpec, parse_filter
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import Document, IndexLayout
from fgplugin.search.embedded import DuckDBStore

pytestmark = [pytest.mark.live]

DIMS = {"sleeve": 16, "neckline": 8, "colour": 8, "collar": 8}
TYPES = {"price": "float", "cat": "keyword", "stock": "boolean", "added": "date", "qty": "integer"}
CATS = ("dress", "skirt", "top", "coat")
N = 800
V1, V2 = "c0ntract1" + "a" * 11, "c0ntract2" + "b" * 11
ENGINE = os.environ.get("FGPLUGIN_OPENSEARCH_ENGINE", "lucene")  # the test node has no faiss libraries


def layout(version: str = V1) -> IndexLayout:
    schema = AttributeSchema(tuple(Attribute(n, ("a", "b", "c")) for n in DIMS), name="contract")
    return IndexLayout(schema, DIMS, TYPES, version)


def make_docs(seed: int = 0, version: str = V1) -> list[Document]:
    rng = np.random.default_rng(seed)
    centres = {a: rng.normal(size=(10, d)) for a, d in DIMS.items()}  # clustered, as real embeddings are
    out = []
    for i in range(N):
        vecs = {a: (centres[a][rng.integers(10)] + 0.5 * rng.normal(size=d)).astype(np.float32) for a, d in DIMS.items()}
        if i % 29 == 3:
            del vecs["neckline"]  # items lacking an attribute's vector
        meta = {"price": float(rng.integers(0, 60) * 5), "cat": CATS[i % 4], "stock": bool(i % 3),
                "added": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00Z", "qty": int(i % 50)}
        if i % 17 == 5:
            del meta["price"]
        out.append(Document(f"sku-{i:05d}", vecs, meta, version, f"img/{i}.jpg"))
    return out


def opensearch_store(url: str, alias: str) -> OpenSearchStore:
    return OpenSearchStore.from_url(url, index=alias, refresh="wait_for", engine=ENGINE)


def drop(store: OpenSearchStore) -> None:
    for name in list(store.client.indices.get(index=f"{store.index}-*")):
        store.client.indices.delete(index=name)


@pytest.fixture(scope="module")
def docs():
    return make_docs()


def store_pair(opensearch_url, tmp_path_factory, docs, index_layout: IndexLayout, name: str):
    """An embedded store and an OpenSearch index holding ``docs`` under ``index_layout`` (a fixture body)."""
    emb = DuckDBStore(tmp_path_factory.mktemp(name))
    osr = opensearch_store(opensearch_url, f"fg{name}-{uuid.uuid4().hex[:8]}")
    for st in (emb, osr):
        st.ensure_index(index_layout)
        res = st.upsert(docs)
        assert not res.failed and len(res.ok) == N
    yield {"embedded": emb, "opensearch": osr}
    drop(osr)
    osr.close()
    emb.close()


@pytest.fixture(scope="module")
def both(opensearch_url, tmp_path_factory, docs):
    yield from store_pair(opensearch_url, tmp_path_factory, docs, layout(), "contract")


QUERIES = {
    "one": dict(attributes={"sleeve": 1.0}),
    "two-unequal": dict(attributes={"sleeve": 1.0, "neckline": 0.35}),
    "four": dict(attributes={"sleeve": 1.0, "neckline": 0.5, "colour": 0.25, "collar": 0.125}),
    "terms-range": dict(attributes={"neckline": 2.0, "colour": 1.0}, filters=["price<100", "cat=dress,skirt"]),
    "must-not-date": dict(attributes={"sleeve": 0.3, "collar": 1.0}, filters=["cat!=coat", "stock=true", "added>=2024-06-15"]),
    "missing-field": dict(attributes={"colour": 1.0}, filters=["!has:price"]),
    "int-range": dict(attributes={"sleeve": 1.0, "colour": 1.0}, filters=["price>=50", "price<=150", "qty>10", "qty<40"]),
    "date-window": dict(attributes={"collar": 1.0, "neckline": 1.0}, filters=["added>2024-03-01", "added<2024-09-01T06:00:00Z"]),
}
REFS = ["sku-00010", "sku-00003", "sku-00411"]  # sku-00003 has no neckline vector


def spec_for(name: str, ref: str, **kw) -> QuerySpec:
    q = dict(QUERIES[name])
    filters = [parse_filter(f) for f in q.pop("filters", [])]
    return QuerySpec(like_id=ref, filters=filters, **q, **kw)


def answerable(name: str, ref: str) -> bool:
    return not (ref == "sku-00003" and "neckline" in QUERIES[name]["attributes"])


@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("name", list(QUERIES))
def test_exact_search_gives_the_same_ids_order_and_scores(both, name, ref):
    if not answerable(name, ref):
        for st in both.values():
            with pytest.raises(QueryError, match="has no vector for neckline"):
                st.search(spec_for(name, ref, k=25))
        return
    got = {kind: st.search(spec_for(name, ref, k=25)) for kind, st in both.items()}
    e, o = got["embedded"], got["opensearch"]
    assert len(e.hits) == len(o.hits) > 0
    assert [h.id for h in o.hits] == [h.id for h in e.hits]
    for a, b in zip(e.hits, o.hits):
        assert b.score == pytest.approx(a.score, abs=1e-4)
        assert b.cosines == pytest.approx(a.cosines, abs=1e-4)
        assert b.metadata.keys() == a.metadata.keys() and b.image == a.image
    assert o.total_candidates == e.total_candidates
    assert ref not in [h.id for h in o.hits]


def recall(got: list[str], want: list[str]) -> float:
    return len(set(got) & set(want)) / max(len(want), 1)


@pytest.mark.parametrize("mode, floor", [("ann", 0.6), ("ann+rescore", 0.9)])
def test_ann_recall_against_exact_is_measured_and_held_above_a_floor(both, mode, floor):
    st = both["opensearch"]
    recalls = []
    for name in QUERIES:
        for ref in REFS:
            if not answerable(name, ref):
                continue
            exact = [h.id for h in st.search(spec_for(name, ref, k=20)).hits]
            got = st.search(spec_for(name, ref, k=20, mode=mode, ef_search=200, rescore_window=200))
            assert got.mode == mode
            recalls.append(recall([h.id for h in got.hits], exact))
    mean = float(np.mean(recalls))
    print(f"{mode}: mean recall@20 {mean:.3f} over {len(recalls)} queries (min {min(recalls):.2f})")
    assert mean >= floor
    # The embedded store's rule: so few documents are searched exactly (its index does not pay off), and it says so.
    emb = both["embedded"]
    res = emb.search(spec_for("one", "sku-00010", k=20, mode=mode))
    assert res.mode == "exact" and "ran an exact search" in res.note and res.plan.startswith("exact")
    assert [h.id for h in res.hits] == [h.id for h in emb.search(spec_for("one", "sku-00010", k=20)).hits]


def fresh(kind: str, url: str, tmp_path) -> DuckDBStore | OpenSearchStore:
    if kind == "embedded":
        return DuckDBStore(tmp_path / "st")
    return opensearch_store(url, f"fgcontract-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["embedded", "opensearch"])
def store_kind(request):
    return request.param


@pytest.fixture
def one_store(store_kind, opensearch_url, tmp_path):
    st = fresh(store_kind, opensearch_url, tmp_path)
    yield st
    if isinstance(st, OpenSearchStore):
        drop(st)
    st.close()


def test_upsert_replaces_update_keeps_delete_removes(one_store, docs):
    st = one_store
    st.ensure_index(layout())
    assert not st.upsert(docs[:50]).failed
    again = dataclasses.replace(docs[7], metadata={**docs[7].metadata, "price": 0.5, "stock": False})
    res = st.upsert([again, docs[8]])
    assert sorted(res.ok) == sorted([docs[7].id, docs[8].id]) and st.count() == 50
    got = st.get_vectors([docs[7].id])[docs[7].id]
    assert np.allclose(got["sleeve"], docs[7].vectors["sleeve"] / np.linalg.norm(docs[7].vectors["sleeve"]), atol=1e-6)
    hits = st.search(QuerySpec({"sleeve": 1.0}, like_id=docs[1].id, filters=[parse_filter("price>0.1"), parse_filter("price<0.9")], k=5)).hits
    assert [h.id for h in hits] == [docs[7].id] and hits[0].metadata["stock"] is False
    assert st.delete([docs[7].id, "never-there"]) == 1 and st.count() == 49
    assert docs[7].id not in st.versions()


def test_per_item_errors_name_the_item_and_keep_the_rest(one_store, docs):
    st = one_store
    st.ensure_index(layout())
    bad = [
        dataclasses.replace(docs[0], id="wrong-size", vectors={**docs[0].vectors, "sleeve": np.ones(5, np.float32)}),
        dataclasses.replace(docs[1], id="nan", vectors={**docs[1].vectors, "colour": np.full(8, np.nan, np.float32)}),
        dataclasses.replace(docs[2], id="zero", vectors={**docs[2].vectors, "collar": np.zeros(8, np.float32)}),
    ]
    res = st.upsert(bad + docs[3:20])
    assert sorted(f.id for f in res.failed) == ["nan", "wrong-size", "zero"]
    reasons = {f.id: f.reason for f in res.failed}
    assert "sleeve" in reasons["wrong-size"] and "colour" in reasons["nan"] and "collar" in reasons["zero"]
    assert len(res.ok) == 17 and st.count() == 17
    assert st.search(QuerySpec({"sleeve": 1.0}, like_id=docs[3].id, k=5)).hits  # queries still answer


def test_a_model_change_replaces_every_vector_and_queries_answer(one_store, docs):
    st = one_store
    st.ensure_index(layout(V1))
    st.upsert(docs[:60])
    v2 = make_docs(seed=1, version=V2)[:60]
    st.ensure_index(layout(V2))
    assert not st.upsert(v2).failed
    if getattr(st, "pending_promotion", False):
        old = st.search(QuerySpec({"sleeve": 1.0}, like_id=docs[0].id, k=5))  # the old index serves until the swap
        assert old.hits
        st.promote(delete_old=True)
    assert set(st.versions().values()) == {V2} and st.count() == 60
    res = st.search(QuerySpec({"sleeve": 1.0}, like_id=v2[0].id, k=59))
    want = sorted(((-float(v2[0].vectors["sleeve"] @ d.vectors["sleeve"] / np.linalg.norm(v2[0].vectors["sleeve"])
                             / np.linalg.norm(d.vectors["sleeve"])), d.id) for d in v2[1:]))
    assert [h.id for h in res.hits] == [i for _, i in want]


def test_a_query_on_a_missing_index_or_field_is_a_clear_error(opensearch_url, both):
    missing = opensearch_store(opensearch_url, f"fgcontract-none-{uuid.uuid4().hex[:6]}")
    with pytest.raises(Exception, match="no index|not found|does not exist|no such index"):
        missing.search(QuerySpec({"sleeve": 1.0}, like_id="sku-00001"))
    missing.close()
    with pytest.raises(QueryError, match="filter on unknown field 'size'"):
        both["opensearch"].search(QuerySpec({"sleeve": 1.0}, like_id="sku-00001", filters=[parse_filter("size=M")]))


# -- two nodes ---------------------------------------------------------------------------------------
def test_a_two_node_cluster_with_replicas_answers_as_the_embedded_store(opensearch_pair_url, both, docs):
    st = OpenSearchStore.from_url(opensearch_pair_url, index=f"fgpair-{uuid.uuid4().hex[:6]}", refresh="wait_for",
                                  engine=ENGINE, index_options={"shards": 2, "replicas": 1})
    try:
        st.ensure_index(layout())
        assert not st.upsert(docs).failed
        health = st.client.cluster.health(index=st.write_index or st.index, wait_for_status="green", request_timeout=90)
        assert health["status"] == "green" and health["active_shards"] == 4
        for name in QUERIES:
            for ref in REFS[:2]:
                if not answerable(name, ref):
                    continue
                want = both["embedded"].search(spec_for(name, ref, k=25))
                got = st.search(spec_for(name, ref, k=25))
                assert [h.id for h in got.hits] == [h.id for h in want.hits], name
                assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits], abs=1e-4)
                # ann+rescore: k per shard, rescore window per shard; merged, the top stays exact
                rescored = st.search(spec_for(name, ref, k=10, mode="ann+rescore", rescore_window=N, ef_search=N))
                assert recall([h.id for h in rescored.hits], [h.id for h in want.hits][:10]) >= 0.9, name
    finally:
        drop(st)
        st.close()


# -- codecs (fgplugin.codecs): the same codes and the same answers in both stores ---------------------
def codec_layout(codec: str, version: str = V1) -> IndexLayout:
    scales = {a: 127.0 for a in DIMS} if codec in ("int8", "binary") else {}
    return dataclasses.replace(layout(version), codec=codec, scales=scales)


@pytest.fixture(scope="module")
def both_int8(opensearch_url, tmp_path_factory, docs):  # Lucene byte vectors on the node
    yield from store_pair(opensearch_url, tmp_path_factory, docs, codec_layout("int8"), "contract-int8")


@pytest.mark.parametrize("name", ["one", "two-unequal", "four", "terms-range", "missing-field"])
def test_int8_codes_give_the_same_hits_and_scores_in_both_stores(both_int8, name):
    for ref in ("sku-00010", "sku-00411"):
        e, o = (both_int8[kind].search(spec_for(name, ref, k=25)) for kind in ("embedded", "opensearch"))
        assert len(e.hits) == len(o.hits) > 0
        assert [h.id for h in o.hits] == [h.id for h in e.hits]
        assert [h.score for h in o.hits] == pytest.approx([h.score for h in e.hits], abs=1e-4)
        assert o.hits[0].cosines == pytest.approx(e.hits[0].cosines, abs=1e-4)
    # ann on byte vectors: the knn candidates always come back rescored by the exact script
    got = both_int8["opensearch"].search(spec_for("four", "sku-00010", k=20, mode="ann", ef_search=200))
    exact = both_int8["opensearch"].search(spec_for("four", "sku-00010", k=20))
    assert "re-scored exactly" in got.plan and recall([h.id for h in got.hits], [h.id for h in exact.hits]) >= 0.9


def test_a_new_codec_is_a_new_index_on_opensearch_and_refused_in_place_embedded(one_store, docs):
    st = one_store
    st.ensure_index(layout())
    assert not st.upsert(docs[:40]).failed
    codes = Document("codes", {"sleeve": np.arange(16, dtype=np.int8)}, {}, V1)
    res = st.upsert([codes])
    assert "holds int8 codes; the index stores codec float32, which takes float vectors" in res.failed[0].reason
    if isinstance(st, DuckDBStore):
        with pytest.raises(StoreError, match=r"holds codec float32 vectors; this run writes codec int8.*"
                                             r"index into a new store directory \(fgplugin index --codec int8"):
            st.ensure_index(codec_layout("int8"))
        return
    st.ensure_index(codec_layout("int8"))  # the same model, another codec: a new index behind the alias
    assert st.pending_promotion and st.write_target.endswith("-int8")
    assert st.search(QuerySpec({"sleeve": 1.0}, like_id=docs[1].id, k=3)).hits  # the float32 index serves meanwhile
    assert not st.upsert(docs[:40]).failed and not st.upsert([codes]).failed  # int8 codes are taken here
    st.promote(delete_old=True)
    assert st.layout.codec == "int8" and st.count() == 41 and st.verify()["codec"] == "int8"
    hits = st.search(QuerySpec({"sleeve": 1.0}, like_id=docs[1].id, k=5)).hits
    assert len(hits) == 5 and all(-1.0 <= h.cosines["sleeve"] <= 1.0 for h in hits)
