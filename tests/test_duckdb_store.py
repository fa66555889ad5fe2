"""The embedded DuckDB store: exact ranking equals a NumPy brute force, filters follow OpenSearch
semantics (missing values, must_not, boundaries), and upsert/delete/reopen keep the data right."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from fgplugin.errors import QueryError, StoreError, UnknownAttributeError
from fgplugin.search.spec import Bool, Exists, QuerySpec, Range, Term, Terms, coerce_filters, parse_filter
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import Document, Fingerprint, IndexLayout, Store
import fgplugin.search.embedded as embedded
from fgplugin.search.embedded import DB_FILE, DuckDBStore, best_rows
from fgplugin.stores import open_store, parse_store_url

ATTRS = ("sleeve", "neckline", "colour", "length")
D = 16
N = 2000
TYPES = {"price": "float", "category": "keyword", "in_stock": "boolean", "added": "date", "qty": "integer",
         "title": "text"}
CATS = ("dress", "skirt", "top", "coat")


def make_schema(names=ATTRS) -> AttributeSchema:
    return AttributeSchema(tuple(Attribute(n, ("a", "b", "c")) for n in names), name="test")


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_docs(seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    vecs = {a: unit(rng, N) for a in ATTRS}
    docs = []
    for i in range(N):
        meta = {
            "price": None if i % 10 == 3 else float(rng.integers(0, 40) * 5),  # multiples of 5 hit boundaries
            "category": None if i % 17 == 5 else CATS[i % 4],
            "in_stock": bool(i % 3),
            "added": (dt.datetime(2024, 1, 1) + dt.timedelta(hours=int(i) * 7)).isoformat(),
            "qty": int(i % 50),
            "title": f"{CATS[i % 4].title()} no. {i}, {'red' if i % 2 else 'blue'}",
        }
        meta = {k: v for k, v in meta.items() if v is not None}  # missing values are simply absent
        docs.append(Document(f"item-{i:05d}", {a: vecs[a][i] for a in ATTRS}, meta, "v1", f"img/{i}.jpg"))
    # exact duplicates: identical scores, so the order among them is the id's
    for dup in ("dup-c", "dup-a", "dup-b"):
        docs.append(Document(dup, {a: docs[7].vectors[a].copy() for a in ATTRS}, {"price": 50.0, "category": "dress"}, "v1"))
    # a document without a neckline vector: OpenSearch's script adds 0 instead of w*(1+cos), i.e. cos = -1
    docs.append(Document("no-neckline", {a: docs[11].vectors[a] for a in ATTRS if a != "neckline"}, {}, "v1"))
    return docs


LAYOUT = IndexLayout(make_schema(), {a: D for a in ATTRS}, TYPES, "v1")


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return make_docs()


@pytest.fixture(scope="module")
def store(tmp_path_factory, docs):
    s = DuckDBStore(tmp_path_factory.mktemp("store"))
    s.ensure_index(LAYOUT)
    for i in range(0, len(docs), 700):  # several batches, like the index worker
        res = s.upsert(docs[i:i + 700])
        assert not res.failed
    yield s
    s.close()


# -- the reference: brute force in NumPy, filters evaluated on the Python values ------------------------
def _date(v):
    d = dt.datetime.fromisoformat(str(v))  # a date without a zone is UTC
    return d if d.tzinfo is None else (d - d.utcoffset()).replace(tzinfo=None)


def matches(f, meta: dict) -> bool:
    if isinstance(f, Bool):
        return (all(matches(x, meta) for x in f.must)
                and (any(matches(x, meta) for x in f.should) if f.should else True)
                and not any(matches(x, meta) for x in f.must_not))
    v = meta.get(f.field)
    if isinstance(f, Exists):
        return v is not None
    if v is None:
        return False
    conv = _date if TYPES[f.field] == "date" else (lambda x: x)
    if TYPES[f.field] == "text":
        tokens = [t for t in "".join(c if c.isalnum() else " " for c in v.lower()).split()]
        vals = [f.value] if isinstance(f, Term) else list(f.values)
        return any(x in tokens for x in vals)
    v = conv(v)
    if isinstance(f, Term):
        return v == conv(f.value)
    if isinstance(f, Terms):
        return v in [conv(x) for x in f.values]
    ok = True
    if f.gt is not None:
        ok &= v > conv(f.gt)
    if f.gte is not None:
        ok &= v >= conv(f.gte)
    if f.lt is not None:
        ok &= v < conv(f.lt)
    if f.lte is not None:
        ok &= v <= conv(f.lte)
    return ok


def reference(docs, weights: dict[str, float], q: dict[str, np.ndarray], filters=(), k=20, exclude=None):
    filters = coerce_filters(list(filters), TYPES)
    rows = []
    for doc in docs:
        if doc.id == exclude or not all(matches(f, doc.metadata) for f in filters):
            continue
        s = 0.0
        for a, w in weights.items():
            qa = q[a].astype(np.float64) / np.linalg.norm(q[a])
            s += w * (float(qa @ doc.vectors[a].astype(np.float64)) if a in doc.vectors else -1.0)
        rows.append((s, doc.id))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return rows[:k], len(rows)


def assert_same_ranking(result, ref, total):
    ref_rows, ref_total = ref
    assert result.total_candidates == ref_total
    got = [(h.score, h.id) for h in result.hits]
    assert len(got) == len(ref_rows)
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref_rows], atol=1e-5)
    for i, ((gs, gid), (rs, rid)) in enumerate(zip(got, ref_rows)):
        if gid != rid:  # only a float32-vs-float64 near tie may swap neighbours
            assert abs(gs - rs) < 1e-5 and {gid, rid} <= {r[1] for r in ref_rows[max(0, i - 1):i + 2]}, (i, gid, rid)


QUERIES = [
    {"sleeve": 1.0},
    {"neckline": 1.0},
    {"sleeve": 0.7, "neckline": 0.3},
    {"sleeve": 1.0, "neckline": 0.5, "colour": 0.25, "length": 2.0},
    {"colour": 0.0, "length": 1.0},
]

FILTERS = [
    [],
    ["category=dress"],
    ["category=dress,skirt"],
    ["category!=dress"],  # must_not: documents without a category DO match
    ["price<100"],
    ["price<=100"],
    ["price>100", "price<=150"],
    ["price>=100", "in_stock=true"],
    ["has:price"],
    ["!has:category"],
    ["in_stock=false"],
    ["added>=2024-02-01", "added<2024-03-01T12:00:00"],
    ["added<2024-01-10T00:00:00+02:00"],  # time zones are honoured (compared in UTC)
    ["qty>=10", "qty<20"],
    ["title=red"],  # a text field matches a token
    ["title=Red"],  # ... case-sensitively, like an unanalysed OpenSearch term query
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: "&".join(f) or "none")
def test_exact_ranking_matches_numpy(store, docs, filters):
    rng = np.random.default_rng(len("".join(filters)))
    for weights in QUERIES:
        q = {a: unit(rng, 1)[0] for a in weights}
        spec = QuerySpec(dict(weights), vectors=q, filters=[parse_filter(f) for f in filters], k=25)
        assert_same_ranking(store.search(spec), reference(docs, weights, q, spec.filters, k=25), None)


def test_bool_filters_match_numpy(store, docs):
    rng = np.random.default_rng(5)
    trees = [
        Bool(should=(Term("category", "dress"), Range("price", lt=20))),
        Bool(must=(Exists("price"),), must_not=(Terms("category", ("dress", "top")), Term("in_stock", False))),
        Bool(should=(Bool(must_not=(Exists("category"),)), Range("qty", gte=45))),
        Bool(must_not=(Range("price", gte=50, lte=150),)),  # documents without a price match
        Bool(),  # empty: everything
    ]
    for tree in trees:
        q = {"sleeve": unit(rng, 1)[0], "length": unit(rng, 1)[0]}
        w = {"sleeve": 1.0, "length": 0.5}
        spec = QuerySpec(w, vectors=q, filters=[tree], k=30)
        assert_same_ranking(store.search(spec), reference(docs, w, q, [tree], k=30), None)


def test_filter_boundaries_and_missing_values(store, docs):
    q = {"sleeve": docs[0].vectors["sleeve"]}

    def ids(*filters):
        spec = QuerySpec({"sleeve": 1.0}, vectors=q, filters=[parse_filter(f) for f in filters], k=10_000)
        return {h.id for h in store.search(spec).hits}

    at_100 = {d.id for d in docs if d.metadata.get("price") == 100.0}
    assert at_100, "the generated data must hit the boundary"
    assert not at_100 & ids("price<100")
    assert at_100 <= ids("price<=100")
    assert not at_100 & ids("price>100")
    assert at_100 <= ids("price>=100")
    no_price = {d.id for d in docs if "price" not in d.metadata}
    assert not no_price & (ids("price<100") | ids("price>=100"))  # a missing value matches no range
    assert no_price <= ids("!has:price") and not no_price & ids("has:price")
    no_cat = {d.id for d in docs if "category" not in d.metadata}
    assert no_cat <= ids("category!=dress")  # ... but does match a must_not
    assert ids("in_stock=true") | ids("in_stock=false") == {d.id for d in docs if "in_stock" in d.metadata}
    assert ids("in_stock=yes") == ids("in_stock=true")  # values are coerced by the field type
    first = ids("added<=2024-01-01")
    assert first == {"item-00000"}  # a date without a time is midnight UTC, and <= includes it


def test_tie_break_on_id(store, docs):
    # the duplicates share the vectors of item-00007: identical scores, ordered by id ascending
    spec = QuerySpec({a: 1.0 for a in ATTRS}, like_id="item-00007", k=3)
    res = store.search(spec)
    assert [h.id for h in res.hits] == ["dup-a", "dup-b", "dup-c"]
    assert res.hits[0].score == res.hits[1].score == res.hits[2].score
    assert res.hits[0].score == pytest.approx(4.0, abs=1e-5)
    spec.exclude_self = False
    assert [h.id for h in store.search(spec).hits] == ["dup-a", "dup-b", "dup-c"]  # id order puts item- last
    spec.k = 4
    assert [h.id for h in store.search(spec).hits][3] == "item-00007"


def test_missing_attribute_vector_scores_as_cosine_minus_one(store, docs):
    q = {"sleeve": docs[11].vectors["sleeve"], "neckline": docs[11].vectors["neckline"]}
    spec = QuerySpec({"sleeve": 1.0, "neckline": 0.5}, vectors=q, k=N + 10)
    hits = {h.id: h for h in store.search(spec).hits}
    h = hits["no-neckline"]
    assert "neckline" not in h.cosines and h.cosines["sleeve"] == pytest.approx(1.0, abs=1e-5)
    assert h.score == pytest.approx(1.0 - 0.5, abs=1e-5)
    assert hits["item-00011"].score == pytest.approx(1.5, abs=1e-5)


def test_result_carries_cosines_metadata_and_image(store, docs):
    res = store.search(QuerySpec({"sleeve": 1.0, "colour": 2.0}, like_id="item-00042", k=5))
    assert res.mode == "exact" and res.note == ""
    for h in res.hits:
        doc = next(d for d in docs if d.id == h.id)
        for a in ("sleeve", "colour"):
            expected = float(doc.vectors[a] @ docs[42].vectors[a])
            assert h.cosines[a] == pytest.approx(expected, abs=1e-5)
        assert h.score == pytest.approx(h.cosines["sleeve"] + 2 * h.cosines["colour"], abs=1e-5)
        if h.id.startswith("item-"):
            assert h.metadata["qty"] == doc.metadata["qty"] and h.image == doc.image
            assert h.metadata["added"].startswith(doc.metadata["added"][:10])


def test_ann_modes_on_a_small_store_run_exact_and_say_why(store, docs):
    q = {"sleeve": docs[3].vectors["sleeve"]}
    exact = store.search(QuerySpec({"sleeve": 1.0}, vectors=q, k=10))
    for mode in ("ann", "ann+rescore"):
        res = store.search(QuerySpec({"sleeve": 1.0}, vectors=q, k=10, mode=mode))
        assert res.mode == "exact" and "fewer than the ANN index pays off" in res.plan
        assert [h.id for h in res.hits] == [h.id for h in exact.hits]


def test_bad_queries_raise_clear_errors(store, docs):
    with pytest.raises(QueryError, match="no document with id 'nope'"):
        store.search(QuerySpec({"sleeve": 1.0}, like_id="nope"))
    with pytest.raises(UnknownAttributeError, match="known attributes: sleeve, neckline"):
        store.search(QuerySpec({"sleve": 1.0}, like_id="item-00001"))
    with pytest.raises(QueryError, match="unknown field 'brand'.*filterable fields: added, category"):
        store.search(QuerySpec({"sleeve": 1.0}, like_id="item-00001", filters=[parse_filter("brand=x")]))
    with pytest.raises(QueryError, match="has 3 numbers; the model gives 16"):
        store.search(QuerySpec({"sleeve": 1.0}, vectors={"sleeve": np.ones(3)}))
    with pytest.raises(QueryError, match=r"weights must be numbers from 0 to 1e\+06"):
        store.search(QuerySpec({"sleeve": -1.0}, like_id="item-00001"))
    with pytest.raises(QueryError, match="not a number"):
        store.search(QuerySpec({"sleeve": 1.0}, like_id="item-00001", filters=[parse_filter("price<cheap")]))
    with pytest.raises(QueryError, match="has no vector for neckline"):
        store.search(QuerySpec({"neckline": 1.0}, like_id="no-neckline"))


# -- writing -------------------------------------------------------------------------------------------
SMALL = IndexLayout(make_schema(("sleeve", "neckline")), {"sleeve": 4, "neckline": 3}, {"price": "float"}, "v1")


def small_doc(i: int, rng, version="v1", price=None) -> Document:
    return Document(f"d{i}", {"sleeve": unit(rng, 1, 4)[0], "neckline": unit(rng, 1, 3)[0]},
                    {} if price is None else {"price": price}, version, f"{i}.png")


def test_upsert_delete_versions_round_trip_and_reopen(tmp_path):
    rng = np.random.default_rng(1)
    s = DuckDBStore(tmp_path / "s")
    assert isinstance(s, Store) and s.count() == 0
    s.ensure_index(SMALL)
    docs = [small_doc(i, rng, price=float(i)) for i in range(10)]
    assert s.upsert(docs).ok == [d.id for d in docs]
    assert s.upsert(docs).ok == [d.id for d in docs]  # idempotent
    assert s.count() == 10
    got = s.get_vectors(["d3", "d9", "missing"])
    assert set(got) == {"d3", "d9"}
    for i in (3, 9):
        for a in ("sleeve", "neckline"):
            assert got[f"d{i}"][a].dtype == np.float32
            np.testing.assert_array_equal(got[f"d{i}"][a], docs[i].vectors[a])  # float32-exact
    assert s.get_vectors(["d3"], ["neckline"]).keys() == {"d3"} and list(s.get_vectors(["d3"], ["neckline"])["d3"]) == ["neckline"]

    # replacement: new vectors, metadata and version
    new = small_doc(3, rng, version="v2", price=99.0)
    assert s.upsert([new]).ok == ["d3"] and s.count() == 10
    np.testing.assert_array_equal(s.get_vectors(["d3"])["d3"]["sleeve"], new.vectors["sleeve"])
    assert s.versions()["d3"] == "v2" and s.versions()["d4"] == "v1"
    hit = s.search(QuerySpec({"sleeve": 1.0}, vectors={"sleeve": new.vectors["sleeve"]}, k=1)).hits[0]
    assert hit.id == "d3" and hit.metadata == {"price": 99.0}
    # a repeated id in one batch: the last copy wins
    a, b = small_doc(20, rng, price=1.0), small_doc(20, rng, price=2.0)
    assert s.upsert([a, b]).ok == ["d20"]
    np.testing.assert_array_equal(s.get_vectors(["d20"])["d20"]["sleeve"], b.vectors["sleeve"])

    assert s.delete(["d0", "d1", "nope"]) == 2 and s.count() == 9
    assert "d0" not in s.versions()
    s.set_meta("model_path", "/models/x")
    s.close()

    r = DuckDBStore(tmp_path / "s", read_only=True)  # reopening keeps everything
    assert r.count() == 9 and r.versions()["d3"] == "v2" and r.get_meta("model_path") == "/models/x"
    np.testing.assert_array_equal(r.get_vectors(["d9"])["d9"]["neckline"], docs[9].vectors["neckline"])
    assert r.layout.dims == {"sleeve": 4, "neckline": 3} and r.layout.metadata_types == {"price": "float"}
    with pytest.raises(StoreError, match="read-only"):
        r.upsert(docs)
    r.close()


def test_bad_documents_become_failures_and_the_rest_is_written(tmp_path):
    rng = np.random.default_rng(2)
    s = DuckDBStore(tmp_path / "s")
    s.ensure_index(SMALL)
    good = [small_doc(i, rng) for i in range(4)]
    wrong_size = Document("wrong", {"sleeve": unit(rng, 1, 5)[0], "neckline": unit(rng, 1, 3)[0]})
    nan = Document("nan", {"sleeve": np.array([np.nan, 0, 0, 1], np.float32), "neckline": unit(rng, 1, 3)[0]})
    zero = Document("zero", {"sleeve": np.zeros(4, np.float32), "neckline": unit(rng, 1, 3)[0]})
    unknown_attr = Document("attr", {"sleeve": unit(rng, 1, 4)[0], "hem": unit(rng, 1, 3)[0]})
    unknown_meta = Document("meta", good[0].vectors, {"brand": "x"})
    bad_type = Document("type", good[0].vectors, {"price": "cheap"})
    res = s.upsert([good[0], wrong_size, good[1], nan, zero, good[2], unknown_attr, unknown_meta, bad_type, good[3]])
    assert res.ok == ["d0", "d1", "d2", "d3"]
    reasons = {f.id: f.reason for f in res.failed}
    assert all(f.stage == "store" for f in res.failed)
    assert "'sleeve'" in reasons["wrong"] and "(5,)" in reasons["wrong"] and "expects 4" in reasons["wrong"]
    assert "non-finite" in reasons["nan"] and "all zeros" in reasons["zero"]
    assert "'hem'" in reasons["attr"] and "'brand'" in reasons["meta"] and "not a number" in reasons["type"]
    assert s.count() == 4
    # a vector that is not unit length is stored normalised (cosine is what is scored)
    s.upsert([Document("long", {"sleeve": np.array([3, 0, 0, 4], np.float32), "neckline": np.array([0, 2, 0], np.float32)})])
    np.testing.assert_allclose(s.get_vectors(["long"])["long"]["sleeve"], [0.6, 0, 0, 0.8], atol=1e-7)
    s.close()


def test_layout_changes(tmp_path):
    s = DuckDBStore(tmp_path / "s")
    s.ensure_index(SMALL)
    s.upsert([small_doc(1, np.random.default_rng(0))])
    with pytest.raises(StoreError, match="was built for schema.*fingerprint"):
        s.ensure_index(IndexLayout(make_schema(("sleeve", "collar")), {"sleeve": 4, "collar": 3}, {}, "v1"))
    with pytest.raises(StoreError, match="vectors of sizes"):
        s.ensure_index(IndexLayout(SMALL.schema, {"sleeve": 8, "neckline": 3}, {}, "v1"))
    with pytest.raises(StoreError, match="stores metadata field 'price' as float"):
        s.ensure_index(IndexLayout(SMALL.schema, SMALL.dims, {"price": "keyword"}, "v1"))
    # a new model version and a new metadata field are fine
    s.ensure_index(IndexLayout(SMALL.schema, SMALL.dims, {"price": "float", "brand": "keyword"}, "v2"))
    assert s.layout.model_version == "v2" and s.layout.metadata_types["brand"] == "keyword"
    assert s.versions() == {"d1": "v1"}  # documents keep their own version until re-encoded
    s.close()
    with pytest.raises(StoreError, match="was built for schema"):
        DuckDBStore(tmp_path / "s").ensure_index(
            IndexLayout(make_schema(("sleeve",)), {"sleeve": 4}, {}, "v1"))


def test_open_store_urls_and_missing_store(tmp_path):
    assert parse_store_url("embedded:/x/y") == ("embedded", "/x/y")
    assert parse_store_url("opensearch:http://h:9200") == ("opensearch", "http://h:9200")
    assert parse_store_url("some/dir") == ("embedded", "some/dir")
    with pytest.raises(StoreError, match="unknown store kind 'mongo'"):
        parse_store_url("mongo:x")
    with pytest.raises(StoreError, match=r"put opensearch: in front of an OpenSearch cluster.s URL \(opensearch:http://h\)"):
        parse_store_url("http://h")
    with pytest.raises(StoreError, match="no embedded store at"):
        open_store(f"embedded:{tmp_path / 'none'}", read_only=True)
    s = open_store(f"embedded:{tmp_path / 'new'}")
    assert isinstance(s, DuckDBStore) and (tmp_path / "new" / DB_FILE).is_file()
    with pytest.raises(StoreError, match="holds no index yet"):
        s.search(QuerySpec({"a": 1.0}, like_id="x"))
    s.close()


def test_reader_in_the_writers_process_sees_its_writes(tmp_path):
    w = DuckDBStore(tmp_path / "s")
    r = DuckDBStore(tmp_path / "s", read_only=True)  # same process: shares the writer's database
    assert r.layout is None and r.count() == 0
    w.ensure_index(SMALL)
    w.upsert([small_doc(i, np.random.default_rng(i)) for i in range(3)])
    assert r.count() == 3 and r.layout.dims == SMALL.dims
    with pytest.raises(StoreError, match="read-only"):
        r.delete(["d0"])
    r.close()
    w.close()


# -- fingerprints ----------------------------------------------------------------------------------------
def test_fingerprints_round_trip_beside_versions(tmp_path):
    rng = np.random.default_rng(3)
    s = DuckDBStore(tmp_path / "s")
    s.ensure_index(SMALL)
    keyed = small_doc(1, rng, price=1.0)
    keyed.image_key, keyed.meta_key = "1.png|10|123", "abc"
    plain = small_doc(2, rng)  # written without a fingerprint: unknown
    assert s.upsert([keyed, plain]).ok == ["d1", "d2"]
    assert s.fingerprints() == {"d1": Fingerprint("v1", "1.png|10|123", "abc"), "d2": Fingerprint("v1", None, None)}
    assert s.versions() == {"d1": "v1", "d2": "v1"}
    doc = s.get_documents(["d1"])["d1"]
    assert (doc.image_key, doc.meta_key, doc.metadata) == ("1.png|10|123", "abc", {"price": 1.0})
    replaced = small_doc(1, rng, version="v2", price=2.0)
    replaced.image_key, replaced.meta_key = "1.png|11|456", "def"
    s.upsert([replaced])
    assert s.fingerprints()["d1"] == Fingerprint("v2", "1.png|11|456", "def")
    s.close()


def make_old_layout(directory) -> None:
    """Rewrite a store's ``docs`` table as fgplugin wrote it before documents carried fingerprints."""
    import duckdb

    con = duckdb.connect(str(directory / DB_FILE))
    cols = [c for (c,) in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'docs' ORDER BY ordinal_position"
    ).fetchall() if c not in ("image_key", "meta_key")]
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'docs'").fetchall())
    quoted = [f'"{c}"' for c in cols]
    defs = ", ".join(f"{q} {types[c]}" + (" PRIMARY KEY" if c == "id" else "") for q, c in zip(quoted, cols))
    con.execute(f"CREATE TABLE old_docs ({defs})")
    con.execute(f"INSERT INTO old_docs SELECT {', '.join(quoted)} FROM docs")
    con.execute("DROP TABLE docs")
    con.execute("ALTER TABLE old_docs RENAME TO docs")
    con.close()


def test_a_store_without_fingerprint_columns_opens_and_gets_them(tmp_path):
    rng = np.random.default_rng(4)
    s = DuckDBStore(tmp_path / "s")
    s.ensure_index(SMALL)
    docs = [small_doc(i, rng, price=float(i)) for i in range(3)]
    s.upsert(docs)
    s.close()
    make_old_layout(tmp_path / "s")

    r = DuckDBStore(tmp_path / "s", read_only=True)  # a reader leaves the file as it is
    assert r.fingerprints() == {f"d{i}": Fingerprint("v1", None, None) for i in range(3)}
    assert r.versions() == {f"d{i}": "v1" for i in range(3)} and r.get_documents(["d2"])["d2"].metadata == {"price": 2.0}
    cols = {c for (c,) in r.con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'docs'").fetchall()}
    assert not cols & {"image_key", "meta_key"}
    r.close()

    w = DuckDBStore(tmp_path / "s")  # a writer adds the columns, empty (unknown)
    assert w.fingerprints() == {f"d{i}": Fingerprint("v1", None, None) for i in range(3)}
    w.ensure_index(SMALL)
    new = small_doc(0, rng, price=5.0)
    new.image_key, new.meta_key = "0.png|1|2", "k"
    assert w.upsert([new]).ok == ["d0"]
    assert w.fingerprints()["d0"] == Fingerprint("v1", "0.png|1|2", "k") and w.count() == 3
    np.testing.assert_array_equal(w.get_vectors(["d1"])["d1"]["sleeve"], docs[1].vectors["sleeve"])
    w.close()


def test_posterior_prob_index_queries_drop_the_slack_value(tmp_path):
    """An index of posterior = prob vectors ([p, sqrt(1 - |p|^2)]): a query, by id or by raw vectors,
    drops the slack value, so each hit's cosine is p_q . p_x / |p_q| and the ranking is by the
    probability of holding the query's value; the layout's flag survives a reopen, and a model without
    the slack cannot write into the index."""
    rng = np.random.default_rng(3)
    schema = make_schema(("sleeve", "colour"))
    layout = IndexLayout(schema, {"sleeve": 4, "colour": 4}, {"price": "float"}, "v1", query_slack=True)
    post = {a: rng.dirichlet(np.full(3, 0.4), size=60) for a in schema.names}  # peaked and flat posteriors
    stored = {a: np.concatenate([p, np.sqrt(1 - (p * p).sum(1, keepdims=True))], 1) for a, p in post.items()}
    docs = [Document(f"d{i:02d}", {a: stored[a][i].astype(np.float32) for a in schema.names}, {"price": float(i)}, "v1")
            for i in range(60)]
    s = DuckDBStore(tmp_path / "s")
    s.ensure_index(layout)
    assert not s.upsert(docs).failed
    s.close()
    s = DuckDBStore(tmp_path / "s")
    assert s.layout.query_slack and s.stats()["query_slack"]
    weights = {"sleeve": 1.0, "colour": 0.5}
    want = sum(w * (post[a] @ post[a][0]) / np.linalg.norm(post[a][0]) for a, w in weights.items())
    order = [f"d{i:02d}" for i in np.argsort(-want, kind="stable") if i != 0][:10]
    for spec in (QuerySpec(attributes=weights, like_id="d00", k=10),
                 QuerySpec(attributes=weights, vectors={a: stored[a][0] for a in weights}, k=11)):
        hits = [h for h in s.search(spec).hits if h.id != "d00"][:10]
        assert [h.id for h in hits] == order
        for h in hits:
            i = int(h.id[1:])
            assert h.score == pytest.approx(float(want[i]), abs=1e-5)
            assert h.cosines["sleeve"] == pytest.approx(
                float(post["sleeve"][i] @ post["sleeve"][0] / np.linalg.norm(post["sleeve"][0])), abs=1e-5)
    # the plain cosine of the stored vectors would rank differently here (what the slack is for)
    plain = sum(w * stored[a][1:] @ stored[a][0] for a, w in weights.items())
    assert [f"d{i + 1:02d}" for i in np.argsort(-plain, kind="stable")][:10] != order
    with pytest.raises(StoreError, match="slack value"):
        s.ensure_index(IndexLayout(schema, layout.dims, {"price": "float"}, "v2"))
    s.close()


@pytest.mark.parametrize("n, k", [(10, 3), (5000, 20), (200_000, 20), (200_000, 1000)])
def test_best_rows_keeps_the_top_k_and_every_near_tie(n, k):
    rng = np.random.default_rng(n + k)
    score = np.round(rng.normal(size=n), 3).astype(np.float32)  # many exact ties
    score[rng.integers(0, n, size=n // 10)] = -np.inf  # dead rows
    got = set(best_rows(score, k, 1e-4).tolist())
    kth = np.sort(score)[::-1][min(k, n) - 1]
    assert got == set(np.flatnonzero(score >= kth - 1e-4).tolist())


@pytest.mark.parametrize("gather_below", [0.0, 1.1])
def test_filtered_exact_search_is_the_same_gathered_or_scanned(store, docs, monkeypatch, gather_below):
    monkeypatch.setattr(embedded, "GATHER_BELOW", gather_below)
    q = {"sleeve": docs[5].vectors["sleeve"], "neckline": docs[6].vectors["neckline"]}
    for f in ("category=dress", "price<40", "in_stock=true"):
        spec = QuerySpec({"sleeve": 1.0, "neckline": 0.5}, vectors=q, k=25, filters=[parse_filter(f)])
        assert_same_ranking(store.search(spec), reference(docs, spec.attributes, q, spec.filters, k=25), None)
