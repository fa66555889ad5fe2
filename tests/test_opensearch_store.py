"""OpenSearchStore against a local fake node (tests/fake_opensearch.py) that validates every request
body against the official API spec and implements the documented k-NN semantics: index + alias +
stored script creation, layout checks, round trips, search in all three modes cross-checked against
the embedded DuckDB store and NumPy, and the model-upgrade alias swap."""

from __future__ import annotations

import datetime as dt
import dataclasses

import numpy as np
import pytest

from fake_opensearch import FakeOpenSearch
from opensearch_spec import api_spec  # noqa: F401 (session fixture)
from fgplugin.errors import QueryError, StoreError
from fgplugin.opensearch.client import OpenSearchConfig
from fgplugin.opensearch.scripts import SCRIPT_ID, SCRIPT_SOURCE
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.search.spec import QuerySpec, parse_filter
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import Document, Fingerprint, IndexLayout, Store
from fgplugin.search.embedded import DuckDBStore

DIMS = {"sleeve": 8, "neckline": 6, "colour": 4}
TYPES = {"price": "float", "cat": "keyword", "stock": "boolean", "added": "date", "title": "text", "qty": "integer"}
CATS = ("dress", "skirt", "top", "coat")
N = 300
V1 = "1111aaaa2222bbbb3333"


def schema(names=tuple(DIMS)) -> AttributeSchema:
    return AttributeSchema(tuple(Attribute(n, ("a", "b", "c")) for n in names), name="t")


LAYOUT = IndexLayout(schema(), DIMS, TYPES, V1)


def make_docs(seed=0, version=V1) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(N):
        vecs = {a: rng.normal(size=d).astype(np.float32) for a, d in DIMS.items()}
        if i % 23 == 4:
            del vecs["neckline"]  # no neckline vector for some items
        meta = {"price": None if i % 10 == 3 else float(rng.integers(0, 40) * 5), "cat": CATS[i % 4],
                "stock": bool(i % 3), "added": (dt.datetime(2024, 1, 1) + dt.timedelta(hours=7 * i)).isoformat(),
                "title": f"{CATS[i % 4].title()} no. {i}, {'red' if i % 2 else 'blue'}", "qty": i % 50}
        docs.append(Document(f"item-{i:04d}", vecs, {k: v for k, v in meta.items() if v is not None}, version,
                             f"img/{i}.jpg"))
    return docs


def config(fake: FakeOpenSearch, index="fg", **kw) -> OpenSearchConfig:
    base = dict(url=fake.url, index=index, retry_total_s=0.2, retry_initial_s=0.01, bulk_initial_backoff=0.01,
                bulk_chunk_size=128)
    base.update(kw)
    return OpenSearchConfig(**base)


@pytest.fixture(scope="module")
def fake(api_spec):
    with FakeOpenSearch(api_spec.errors) as f:
        yield f


@pytest.fixture(autouse=True)
def no_spec_violations(request):
    yield
    if "fake" in request.fixturenames:
        f = request.getfixturevalue("fake")
        assert f.spec_errors == [], "a request body broke the OpenSearch API spec"


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def store(fake, docs):
    s = OpenSearchStore(config(fake))
    s.ensure_index(LAYOUT)
    res = s.upsert(docs)
    assert not res.failed and len(res.ok) == N
    yield s
    s.close()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, docs):
    s = DuckDBStore(tmp_path_factory.mktemp("duck"))
    s.ensure_index(LAYOUT)
    assert not s.upsert(docs).failed
    yield s
    s.close()


def test_ensure_index_creates_a_versioned_index_behind_the_alias_and_the_script(fake, store):
    assert isinstance(store, Store)
    assert set(fake.indices) == {"fg-1111aaaa2222"} and fake.aliases["fg"] == {"fg-1111aaaa2222"}
    assert fake.scripts[SCRIPT_ID] == {"lang": "painless", "source": SCRIPT_SOURCE}
    create = fake.bodies("indices.create")[0]
    assert create["aliases"] == {"fg": {}}  # index and alias appear together
    # a fresh store object finds the layout on the cluster (mapping _meta)
    again = OpenSearchStore(config(fake))
    lay = again.layout
    assert lay.dims == DIMS and lay.metadata_types == TYPES and lay.model_version == V1
    assert lay.schema.fingerprint() == LAYOUT.schema.fingerprint()
    assert not again.pending_promotion and again.count() == N


def test_round_trip_of_vectors_metadata_and_versions(fake, store, docs):
    assert store.count() == N
    assert store.versions() == {d.id: V1 for d in docs}  # scanned with scroll, more than one page
    got = store.get_vectors([docs[4].id, docs[5].id, "nope"])
    assert set(got) == {docs[4].id, docs[5].id}
    assert set(got[docs[4].id]) == {"sleeve", "colour"}  # the missing neckline stays missing
    v = docs[5].vectors["sleeve"]
    assert np.allclose(got[docs[5].id]["sleeve"], v / np.linalg.norm(v), atol=1e-6)  # stored unit length
    assert store.image_of(docs[7].id) == "img/7.jpg"
    src = fake.indices["fg-1111aaaa2222"]["docs"][docs[7].id]
    assert src["added"].endswith("Z") and src["model_version"] == V1
    assert np.isclose(np.linalg.norm(src["emb_all"]), np.sqrt(3), atol=1e-5)
    src4 = fake.indices["fg-1111aaaa2222"]["docs"][docs[4].id]
    assert "emb_neckline" not in src4 and np.allclose(src4["emb_all"][8:14], 0)  # a zero block in emb_all


QUERIES = [
    dict(attributes={"sleeve": 1.0}),
    dict(attributes={"sleeve": 1.0, "neckline": 0.5, "colour": 0.25}),
    dict(attributes={"neckline": 2.0, "colour": 1.0}, filters=["price<100", "cat=dress,skirt"]),
    dict(attributes={"sleeve": 0.3, "neckline": 1.0}, filters=["cat!=coat", "stock=true", "added>=2024-01-20"]),
    dict(attributes={"colour": 1.0}, filters=["!has:price", "title=red"]),
    dict(attributes={"sleeve": 1.0, "colour": 1.0}, filters=["price>=50", "price<=100", "qty>10"]),
]


@pytest.mark.parametrize("mode", ["exact", "ann+rescore"])
@pytest.mark.parametrize("q", range(len(QUERIES)))
def test_search_equals_the_embedded_store(store, embedded, q, mode):
    kw = dict(QUERIES[q])
    filters = [parse_filter(f) for f in kw.pop("filters", [])]
    spec = QuerySpec(like_id="item-0010", filters=filters, k=15, mode=mode, rescore_window=N, **kw)
    got = store.search(spec)
    want = embedded.search(dataclasses.replace(spec, mode="exact"))
    assert got.mode == mode and len(got.hits) == len(want.hits) > 0
    assert [h.id for h in got.hits] == [h.id for h in want.hits]
    for g, w in zip(got.hits, want.hits):
        assert g.score == pytest.approx(w.score, abs=2e-6)  # float32 scores on the server
        assert g.cosines == pytest.approx(w.cosines, abs=1e-6)
        assert g.metadata == pytest.approx(w.metadata) and g.image == w.image
    if mode == "exact":
        assert got.total_candidates == want.total_candidates
    assert "item-0010" not in [h.id for h in got.hits]


def test_ann_ranks_by_the_inner_product_with_missing_vectors_as_zero(store, docs):
    rng = np.random.default_rng(9)
    w = {"sleeve": 0.5, "neckline": 1.0}
    qv = {a: rng.normal(size=d) for a, d in DIMS.items()}
    res = store.search(QuerySpec(w, vectors=qv, k=20, mode="ann", filters=[parse_filter("cat=top")]))
    ref = []
    for d in docs:
        if d.metadata["cat"] != "top":
            continue
        s = sum(wt * (d.vectors[a] @ qv[a] / np.linalg.norm(d.vectors[a]) / np.linalg.norm(qv[a]) if a in d.vectors else 0.0)
                for a, wt in w.items())
        ref.append((-s, d.id))
    ref.sort()
    assert [h.id for h in res.hits] == [i for _, i in ref[:20]]
    assert [h.score for h in res.hits] == pytest.approx([-s for s, _ in ref[:20]], abs=1e-5)
    assert res.total_candidates is None


def test_missing_vector_counts_minus_one_in_exact_mode(store, docs):
    d = docs[4]  # no neckline vector
    q = {"sleeve": d.vectors["sleeve"], "neckline": np.ones(6), "colour": d.vectors["colour"]}
    res = store.search(QuerySpec({"sleeve": 1.0, "neckline": 0.5}, vectors=q, k=1, filters=[parse_filter("qty=4")]))
    (h,) = [h for h in res.hits if h.id == d.id]
    assert h.score == pytest.approx(1.0 + 0.5 * -1.0, abs=1e-6) and set(h.cosines) == {"sleeve"}


def test_bad_references_are_clear_errors(store):
    with pytest.raises(QueryError, match="no document with id 'nope'"):
        store.search(QuerySpec({"sleeve": 1.0}, like_id="nope"))
    with pytest.raises(QueryError, match="has no vector for neckline"):
        store.search(QuerySpec({"neckline": 1.0}, like_id="item-0004"))
    with pytest.raises(QueryError, match="filter on unknown field"):
        store.search(QuerySpec({"sleeve": 1.0}, like_id="item-0001", filters=[parse_filter("size=M")]))


def test_layout_mismatches_are_refused_and_new_fields_added(fake, store):
    other = OpenSearchStore(config(fake))
    with pytest.raises(StoreError, match="was built for schema"):
        other.ensure_index(IndexLayout(schema(("sleeve", "fit")), {"sleeve": 8, "fit": 2}, TYPES, V1))
    with pytest.raises(StoreError, match="holds vectors of sizes"):
        other.ensure_index(dataclasses.replace(LAYOUT, dims={**DIMS, "colour": 5}))
    with pytest.raises(StoreError, match="stores metadata field 'qty' as integer"):
        other.ensure_index(dataclasses.replace(LAYOUT, metadata_types={**TYPES, "qty": "keyword"}))
    other.ensure_index(dataclasses.replace(LAYOUT, metadata_types={**TYPES, "season": "keyword"}))
    props = fake.indices["fg-1111aaaa2222"]["mappings"]["properties"]
    assert props["season"] == {"type": "keyword"}
    assert other.layout.metadata_types["season"] == "keyword"
    res = other.upsert([Document("extra-1", {"sleeve": np.ones(8)}, {"season": "ss24", "qty": "7"}, V1)])
    assert res.ok == ["extra-1"] and not res.failed
    assert other.delete(["extra-1", "never-there"]) == 1
    bad = other.upsert([Document("bad", {"sleeve": np.ones(8)}, {"colourway": "red"}, V1)])
    assert bad.failed[0].id == "bad" and "not in the index" in bad.failed[0].reason


def test_meta_keys_live_in_the_index_mapping(fake):
    s = OpenSearchStore(config(fake, index="fgmeta"))
    s.ensure_index(LAYOUT)
    s.set_meta("model_path", "/models/v1")
    assert OpenSearchStore(config(fake, index="fgmeta")).get_meta("model_path") == "/models/v1"
    assert s.layout.dims == DIMS  # the layout keys survive the _meta rewrite


def test_a_new_model_builds_beside_the_old_and_swaps_the_alias_atomically(fake):
    s = OpenSearchStore(config(fake, index="fgswap"))
    s.ensure_index(LAYOUT)
    old_docs = make_docs(seed=1)[:40]
    assert not s.upsert(old_docs).failed
    v2 = dataclasses.replace(LAYOUT, model_version="9999ffff8888eeee")
    s2 = OpenSearchStore(config(fake, index="fgswap"))
    s2.ensure_index(v2)
    assert s2.pending_promotion and set(fake.indices) >= {"fgswap-1111aaaa2222", "fgswap-9999ffff8888"}
    assert fake.aliases["fgswap"] == {"fgswap-1111aaaa2222"}  # readers still see the old model
    assert s2.versions() == {}  # resume state comes from the new index
    new_docs = make_docs(seed=2, version="9999ffff8888eeee")[:30]
    assert not s2.upsert(new_docs).failed
    hit_ids = {h.id for h in s2.search(QuerySpec({"sleeve": 1.0}, like_id=old_docs[0].id, k=50)).hits}
    assert hit_ids <= {d.id for d in old_docs} and len(hit_ids) == 39
    n_alias_calls = len(fake.bodies("indices.update_aliases"))
    out = s2.promote()
    swaps = fake.bodies("indices.update_aliases")[n_alias_calls:]
    assert swaps == [{"actions": [{"remove": {"index": "fgswap-1111aaaa2222", "alias": "fgswap"}},
                                  {"add": {"index": "fgswap-9999ffff8888", "alias": "fgswap"}}]}]  # one request
    assert out["previous"] == ["fgswap-1111aaaa2222"] and not s2.pending_promotion
    assert fake.aliases["fgswap"] == {"fgswap-9999ffff8888"}
    assert s2.layout.model_version == "9999ffff8888eeee"
    hit_ids = {h.id for h in s2.search(QuerySpec({"sleeve": 1.0}, like_id=new_docs[0].id, k=50)).hits}
    assert hit_ids <= {d.id for d in new_docs} and len(hit_ids) == 29
    s2.promote(delete_old=True)  # nothing left to swap; the old index was already detached
    assert "fgswap-1111aaaa2222" in fake.indices
    s3 = OpenSearchStore(config(fake, index="fgswap"))
    s3.ensure_index(dataclasses.replace(LAYOUT, model_version="7777"))
    assert s3.promote(delete_old=True)["deleted"] == ["fgswap-9999ffff8888"]
    assert "fgswap-9999ffff8888" not in fake.indices


def test_fingerprints_round_trip_beside_versions(fake):
    s = OpenSearchStore(config(fake, index="fgprint"))
    s.ensure_index(LAYOUT)
    keyed, plain = make_docs(seed=3)[:2]
    keyed = dataclasses.replace(keyed, image_key="img/0.jpg|10|123", meta_key="abc")
    assert not s.upsert([keyed, plain]).failed
    assert s.fingerprints() == {keyed.id: Fingerprint(V1, "img/0.jpg|10|123", "abc"), plain.id: Fingerprint(V1)}
    assert s.versions() == {keyed.id: V1, plain.id: V1}
    src = fake.indices["fgprint-1111aaaa2222"]["docs"][keyed.id]
    assert (src["image_key"], src["meta_key"]) == ("img/0.jpg|10|123", "abc") and "image_key" not in fake.indices[
        "fgprint-1111aaaa2222"]["docs"][plain.id]


def test_an_index_without_fingerprint_fields_gets_them(fake):
    from fgplugin.opensearch.mapping import build_index_body

    body = build_index_body(LAYOUT)  # as an older fgplugin created it: no image_key / meta_key
    for f in ("image_key", "meta_key"):
        del body["mappings"]["properties"][f]
    fake.indices["fgold-1111aaaa2222"] = {"settings": body["settings"], "mappings": body["mappings"], "docs": {}}
    fake.aliases["fgold"] = {"fgold-1111aaaa2222"}
    old = make_docs(seed=4)[:3]
    s = OpenSearchStore(config(fake, index="fgold"))
    s.ensure_index(LAYOUT)
    assert not s.upsert(old).failed
    props = fake.indices["fgold-1111aaaa2222"]["mappings"]["properties"]
    assert props["image_key"] == props["meta_key"] == {"type": "keyword", "index": False, "doc_values": False}
    assert fake.bodies("indices.put_mapping")[-1] == {"properties": {f: props[f] for f in ("image_key", "meta_key")}}
    assert s.fingerprints() == {d.id: Fingerprint(V1) for d in old}  # unknown: the index worker re-indexes them
    res = s.upsert([dataclasses.replace(old[0], image_key="k", meta_key="m")])  # strict mapping takes them now
    assert res.ok == [old[0].id] and s.fingerprints()[old[0].id] == Fingerprint(V1, "k", "m")
    n = len(fake.bodies("indices.put_mapping"))
    OpenSearchStore(config(fake, index="fgold")).ensure_index(LAYOUT)
    assert len(fake.bodies("indices.put_mapping")) == n  # added once


def test_a_plain_index_under_the_alias_name_is_refused(fake):
    fake.indices["plain"] = {"settings": {}, "mappings": {}, "docs": {}}
    with pytest.raises(StoreError, match="is a plain index, not an fgplugin alias"):
        OpenSearchStore(config(fake, index="plain")).ensure_index(LAYOUT)


def test_every_request_kind_was_sent_and_validated(fake, store):
    store.search(QuerySpec({"sleeve": 1.0}, like_id="item-0001", mode="ann"))
    kinds = {r["kind"] for r in fake.requests}
    assert {"indices.create", "indices.put_mapping", "indices.update_aliases", "put_script", "bulk", "mget",
            "search"} <= kinds
    assert fake.spec_errors == []


def test_open_store_builds_the_opensearch_store_from_a_url(fake, monkeypatch, tmp_path):
    from fgplugin.stores import open_store

    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("URL", "USER", "PASSWORD", "API_KEY", "INDEX", "CONFIG"):
        monkeypatch.delenv(f"FGPLUGIN_OPENSEARCH_{k}", raising=False)
    s = open_store(f"opensearch:{fake.url}/fg")
    assert isinstance(s, OpenSearchStore) and s.index == "fg" and s.count() == N
    assert open_store(f"opensearch:{fake.url}", index="other").index == "other"
