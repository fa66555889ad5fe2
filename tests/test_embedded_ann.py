"""The embedded store's ANN indexes (faiss IVF per attribute beside the DuckDB file): recall@20 against
the exact ranking on a small clustered set for 1, 2 and 4 attributes with and without a 20 % filter, in
both ANN modes, and the
indexes and vector arrays staying consistent with DuckDB after upserts, changed vectors, deletes,
prunes, a run killed between writing the arrays and the DuckDB commit, and damaged or missing files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("faiss")

from fgplugin.schema import Attribute, AttributeSchema  # noqa: E402
from fgplugin.search.embedded import DuckDBStore  # noqa: E402
from fgplugin.search.spec import QuerySpec, parse_filter  # noqa: E402
from fgplugin.search.store import Document, IndexLayout  # noqa: E402
from fgplugin.search.vectors import CACHE_DIR  # noqa: E402

ATTRS = tuple(f"a{i}" for i in range(8))
D, N, K = 16, 5000, 20
LAYOUT = IndexLayout(AttributeSchema(tuple(Attribute(a, ("x", "y")) for a in ATTRS), name="ann"),
                     {a: D for a in ATTRS}, {"category": "keyword"}, "v1")
MIXES = {1: {"a0": 1.0}, 2: {"a0": 1.0, "a1": 0.5}, 4: {"a0": 1.0, "a1": 0.5, "a2": 1 / 3, "a3": 0.25}}


def clustered(rng: np.random.Generator, n: int, clusters: int = 16) -> np.ndarray:
    centres = rng.normal(size=(clusters, D))
    x = centres[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_docs(seed: int = 0, n: int = N, prefix: str = "d") -> list[Document]:
    rng = np.random.default_rng(seed)
    vecs = {a: clustered(rng, n) for a in ATTRS}
    return [Document(f"{prefix}{i:05d}", {a: vecs[a][i] for a in ATTRS}, {"category": f"c{i % 5}"}, "v1")
            for i in range(n)]


def build(path, docs) -> DuckDBStore:
    s = DuckDBStore(path)
    s.ensure_index(LAYOUT)
    for i in range(0, len(docs), 1000):
        assert not s.upsert(docs[i:i + 1000]).failed
    s.exact_below = 0  # a small store would otherwise run exactly
    return s


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def store(tmp_path_factory, docs):
    s = build(tmp_path_factory.mktemp("ann"), docs)
    yield s
    s.close()


def query(docs, weights, j, rng):
    return {a: docs[j].vectors[a] + 0.1 * rng.normal(size=D).astype(np.float32) for a in weights}


def ids(res) -> list[str]:
    return [h.id for h in res.hits]


def recall(got, want) -> float:
    return len(set(got) & set(want)) / len(want)


@pytest.mark.parametrize("mode", ["ann", "ann+rescore"])
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("n_attrs", [1, 2, 4])
def test_recall_at_20_against_the_exact_ranking(store, docs, n_attrs, filtered, mode):
    rng = np.random.default_rng(n_attrs)
    weights = MIXES[n_attrs]
    filters = [parse_filter("category=c0")] if filtered else []
    recalls = []
    for j in rng.integers(0, N, size=20):
        q = query(docs, weights, int(j), rng)
        exact = store.search(QuerySpec(weights, vectors=q, k=K, filters=filters))
        ann = store.search(QuerySpec(weights, vectors=q, k=K, filters=filters, mode=mode))
        assert ann.mode == mode and ("IVF" if n_attrs == 1 else "IVF lists of each weighted attribute") in ann.plan, ann.plan
        assert ("attribute a0" in ann.plan) == (n_attrs == 1)
        if filtered:
            assert all(h.metadata["category"] == "c0" for h in ann.hits)
        by_id = {h.id: h.score for h in exact.hits}
        for h in ann.hits:  # candidates are rescored exactly
            if h.id in by_id:
                assert h.score == pytest.approx(by_id[h.id], abs=1e-5)
        recalls.append(recall(ids(ann), ids(exact)))
    assert np.mean(recalls) >= 0.95, recalls


def test_a_filter_leaving_few_documents_runs_exactly(store, docs):
    store.exact_below = 2000
    try:
        q = {"a0": docs[1].vectors["a0"]}
        res = store.search(QuerySpec({"a0": 1.0}, vectors=q, k=K, mode="ann", filters=[parse_filter("category=c1")]))
        assert res.mode == "exact" and "fewer than the ANN index pays off" in res.plan and "exact search" in res.note
        assert ids(res) == ids(store.search(QuerySpec({"a0": 1.0}, vectors=q, k=K, filters=[parse_filter("category=c1")])))
    finally:
        store.exact_below = 0


def assert_ann_agrees(s: DuckDBStore, live: dict[str, Document], probes: list[str]) -> None:
    """For each probe document: ANN and exact agree (recall >= 0.9, exact scores) and return only live ids."""
    for pid in probes:
        for weights in (MIXES[1], MIXES[2]):
            q = {a: live[pid].vectors[a] for a in weights}
            exact = s.search(QuerySpec(weights, vectors=q, k=K))
            ann = s.search(QuerySpec(weights, vectors=q, k=K, mode="ann+rescore"))
            assert ann.mode == "ann+rescore"
            assert set(ids(ann)) <= set(live) and set(ids(exact)) <= set(live)
            assert recall(ids(ann), ids(exact)) >= 0.9
            assert ids(ann)[0] == ids(exact)[0] and ann.hits[0].score == pytest.approx(exact.hits[0].score, abs=1e-5)
            want = sum(w * float(live[ann.hits[0].id].vectors[a] @ q[a]) for a, w in weights.items())
            assert ann.hits[0].score == pytest.approx(want, abs=1e-4)  # the vectors stored now, not stale ones


def test_ann_stays_consistent_after_upsert_change_delete_and_prune(tmp_path):
    docs = make_docs(1, n=1500)
    s = build(tmp_path / "s", docs)
    live = {d.id: d for d in docs}
    assert_ann_agrees(s, live, ["d00001", "d00002"])  # builds the indexes
    # re-upsert changed vectors: d00003 now copies d00001's vectors, so it ties with it
    changed = Document("d00003", {a: live["d00001"].vectors[a].copy() for a in ATTRS}, {"category": "c3"}, "v1")
    assert not s.upsert([changed]).failed
    live["d00003"] = changed
    res = s.search(QuerySpec(MIXES[1], vectors={"a0": changed.vectors["a0"]}, k=3, mode="ann+rescore"))
    assert ids(res)[:2] == ["d00001", "d00003"]
    # re-upsert with the same vectors (metadata only) keeps the row
    before = int(s._next_row)
    assert not s.upsert([Document("d00004", live["d00004"].vectors, {"category": "c0"}, "v1")]).failed
    assert s.get_documents(["d00004"])["d00004"].metadata["category"] == "c0"
    # delete the top hits and some others (the indexer prunes through delete)
    gone = ["d00001", "d00003"] + [f"d{i:05d}" for i in range(100, 300)]
    assert s.delete(gone) == len(gone)
    for i in gone:
        live.pop(i)
    new = make_docs(2, n=300, prefix="n")
    assert not s.upsert(new).failed
    live.update({d.id: d for d in new})
    assert s._next_row == before + 1 + 300  # the metadata-only write took one (dead) row
    assert_ann_agrees(s, live, ["d00002", "n00007", "d00500"])
    s.close()
    s = DuckDBStore(tmp_path / "s")  # reopened: the saved indexes are of this epoch and are reused
    s.exact_below = 0
    assert_ann_agrees(s, live, ["d00002", "n00008"])
    s.close()


def test_a_killed_run_leaves_no_trace_after_reopen(tmp_path, monkeypatch):
    both = make_docs(3, n=1550)  # one distribution: the IVF lists fit the later documents too
    docs = both[:1500]
    extra = [Document(f"ghost{i:05d}", d.vectors, d.metadata, "v1") for i, d in enumerate(both[1500:])]
    s = build(tmp_path / "s", docs)
    live = {d.id: d for d in docs}
    assert_ann_agrees(s, live, ["d00010"])
    s.close()
    s = DuckDBStore(tmp_path / "s")
    s.exact_below = 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after writing the arrays, before DuckDB commits

    monkeypatch.setattr(s, "_insert", killed)
    # the vectors of d00010 would move onto d00011: after the kill, nothing of it may show
    ghost = Document("d00011", {a: live["d00010"].vectors[a] for a in ATTRS}, {"category": "c1"}, "v1")
    s.search(QuerySpec(MIXES[1], vectors={"a0": live["d00010"].vectors["a0"]}, k=K, mode="ann"))  # index in memory
    with pytest.raises(KeyboardInterrupt):
        s.upsert([ghost] + extra)
    s.con.close()  # no orderly close: the ANN index is not saved
    s = DuckDBStore(tmp_path / "s")
    s.exact_below = 0
    assert s.count() == len(live)
    assert_ann_agrees(s, live, ["d00010", "d00011"])
    res = s.search(QuerySpec(MIXES[2], vectors={a: live["d00010"].vectors[a] for a in MIXES[2]}, k=K, mode="ann"))
    assert not any(i.startswith("ghost") for i in ids(res)) and ids(res)[0] == "d00010"
    # the rows the killed run wrote are never reused: a new write lands after them
    assert s._next_row >= len(docs) + 51
    assert not s.upsert(extra).failed
    live.update({d.id: d for d in extra})
    assert_ann_agrees(s, live, ["ghost00003", "d00010"])
    s.close()


@pytest.mark.parametrize("damage", ["garbage_index", "missing_cache", "other_epoch", "short_array"])
def test_damaged_or_missing_files_are_rebuilt_from_duckdb(tmp_path, damage):
    docs = make_docs(5, n=1200)
    s = build(tmp_path / "s", docs)
    live = {d.id: d for d in docs}
    assert_ann_agrees(s, live, ["d00020"])
    s.close()
    cache = tmp_path / "s" / CACHE_DIR
    if damage == "garbage_index":
        for f in cache.glob("ann_*.faiss"):
            f.write_bytes(b"not an index")
    elif damage == "missing_cache":
        shutil.rmtree(cache)
    elif damage == "other_epoch":
        state = json.loads((cache / "state.json").read_text())
        (cache / "state.json").write_text(json.dumps({**state, "epoch": "0123456789abcdef"}))
    else:
        with open(cache / "0.f32", "r+b") as f:
            f.truncate(100)
    for read_only in (True, False):
        s = DuckDBStore(tmp_path / "s", read_only=read_only)
        s.exact_below = 0
        assert_ann_agrees(s, live, ["d00020", "d00021"])
        s.close()


def test_a_store_without_rows_is_numbered_and_searched_when_opened_for_writing(tmp_path):
    docs = make_docs(6, n=800)
    s = build(tmp_path / "s", docs)
    q = {"a0": docs[5].vectors["a0"]}
    want = ids(s.search(QuerySpec({"a0": 1.0}, vectors=q, k=K)))
    s.con.execute("DROP INDEX docs_fg_row")  # as written by an older fgplugin
    s.con.execute("ALTER TABLE docs DROP COLUMN fg_row")
    s.con.execute("DELETE FROM fg_meta WHERE key IN ('cache_epoch', 'generation')")
    s.close()
    shutil.rmtree(tmp_path / "s" / CACHE_DIR)
    with DuckDBStore(tmp_path / "s", read_only=True) as r:  # read-only: searched in SQL
        res = r.search(QuerySpec({"a0": 1.0}, vectors=q, k=K, mode="ann"))
        assert ids(res) == want and res.mode == "exact" and "no ANN index" in res.note
    with DuckDBStore(tmp_path / "s") as w:
        assert ids(w.search(QuerySpec({"a0": 1.0}, vectors=q, k=K))) == want
        w.exact_below = 0
        assert recall(ids(w.search(QuerySpec({"a0": 1.0}, vectors=q, k=K, mode="ann+rescore"))), want) >= 0.9
