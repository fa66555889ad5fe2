"""The embedded store's in-memory document columns answer exactly as DuckDB does: random filters of every
kind give the same rows as the store's SQL (compile_where), hits carry DuckDB's metadata, and the
columns follow upserts (metadata changed with the vectors unchanged), deletes and another writer."""

from __future__ import annotations

import numpy as np
import pytest

from fgplugin.search.columns import DocColumns
from fgplugin.search.embedded import ROW_COLUMN, DuckDBStore, compile_where, meta_col
from fgplugin.search.spec import Bool, Exists, QuerySpec, Range, Term, Terms, coerce_filters
from fgplugin.search.store import Document

from test_duckdb_store import CATS, LAYOUT, TYPES, make_docs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = DuckDBStore(tmp_path_factory.mktemp("columns"))
    s.ensure_index(LAYOUT)
    assert not s.upsert(make_docs()).failed
    yield s
    s.close()


def random_leaf(rng: np.random.Generator):
    field = str(rng.choice(["price", "category", "in_stock", "added", "qty"]))
    kind = rng.integers(0, 4)
    if kind == 0:
        return Exists(field)
    if field == "category":
        values = list(CATS) + ["absent-value"]
        if kind == 1:
            return Term(field, str(rng.choice(values)))
        return Terms(field, tuple(str(v) for v in rng.choice(values, size=2)))
    if field == "in_stock":
        return Term(field, bool(rng.integers(0, 2)))
    if field == "added":
        day = f"2024-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 28)):02d}"
        return Range(field, gte=day) if kind == 1 else Range(field, lt=day) if kind == 2 else Term(field, day + "T00:00:00")
    bound = float(rng.integers(0, 40) * 5) if field == "price" else int(rng.integers(0, 50))
    if kind == 1:
        return Term(field, bound)
    if kind == 2:
        return Range(field, gt=bound, lte=bound + 40)
    return Terms(field, (bound, bound + 5))


def random_filter(rng: np.random.Generator, depth: int = 0):
    if depth < 2 and rng.random() < 0.35:
        parts = lambda n: tuple(random_filter(rng, depth + 1) for _ in range(n))  # noqa: E731
        return Bool(must=parts(int(rng.integers(0, 2))), should=parts(int(rng.integers(0, 3))),
                    must_not=parts(int(rng.integers(0, 2))))
    return random_leaf(rng)


def sql_rows(store: DuckDBStore, filters) -> np.ndarray:
    where, params = compile_where(filters, TYPES)
    got = store.con.execute(f"SELECT {ROW_COLUMN} FROM docs WHERE {where}", params).fetchnumpy()[ROW_COLUMN]
    return np.sort(np.asarray(got, dtype=np.int64))


def columns_of(store: DuckDBStore) -> DocColumns:
    return DocColumns.load(store.con.cursor, TYPES, int(store.con.execute(
        f"SELECT max({ROW_COLUMN}) + 1 FROM docs").fetchall()[0][0]), ROW_COLUMN, meta_col)


def test_random_filters_pass_the_same_rows_as_sql(store):
    columns = columns_of(store)
    rng = np.random.default_rng(5)
    seen_sizes = set()
    for _ in range(300):
        filters = coerce_filters([random_filter(rng) for _ in range(int(rng.integers(1, 3)))], TYPES)
        expected = sql_rows(store, filters)
        mask = columns.mask(filters)
        assert mask is not None, filters
        got = np.flatnonzero(mask)
        assert np.array_equal(got, expected), (filters, len(got), len(expected))
        seen_sizes.add(min(len(expected) // 200, 10))
    assert len(seen_sizes) >= 5  # the filters ranged from none to most of the rows


def test_a_text_filter_is_left_to_sql(store):
    columns = columns_of(store)
    assert columns.mask(coerce_filters([Term("title", "red")], TYPES)) is None
    assert columns.mask(coerce_filters([Bool(must=(Term("category", "dress"), Term("title", "red")))], TYPES)) is None
    # ... and the store still answers it, through DuckDB
    q = {"sleeve": np.ones(16, np.float32)}
    res = store.search(QuerySpec({"sleeve": 1.0}, vectors=q, filters=[Term("title", "red")], k=400))
    assert res.hits and all("red" in h.metadata["title"].lower() for h in res.hits)
    assert res.total_candidates == int(len(sql_rows(store, coerce_filters([Term("title", "red")], TYPES))))


def test_hits_carry_what_duckdb_holds(store):
    q = {"sleeve": np.ones(16, np.float32), "colour": -np.ones(16, np.float32)}
    res = store.search(QuerySpec({"sleeve": 1.0, "colour": 0.5}, vectors=q, k=60))
    docs = store.get_documents([h.id for h in res.hits])
    for h in res.hits:
        assert h.metadata == docs[h.id].metadata and h.image == docs[h.id].image, h.id


def test_columns_follow_upserts_deletes_and_another_writer(tmp_path):
    docs = make_docs()[:300]
    s = DuckDBStore(tmp_path)
    s.ensure_index(LAYOUT)
    s.upsert(docs)
    q = {"sleeve": docs[0].vectors["sleeve"]}

    def search(store, *filters):
        return store.search(QuerySpec({"sleeve": 1.0}, vectors=q, filters=list(filters), k=5))

    assert search(s).hits[0].id == docs[0].id  # columns built by this first query
    # the same vectors with new metadata: the document keeps its row, its metadata changes
    s.upsert([Document(docs[0].id, docs[0].vectors, {"category": "gown", "price": 1234.0}, "v1", "new.jpg")])
    top = search(s, Term("category", "gown")).hits
    assert [h.id for h in top] == [docs[0].id] and top[0].metadata["price"] == 1234.0 and top[0].image == "new.jpg"
    assert search(s, Range("price", gte=1000)).total_candidates == 1
    assert search(s, Term("category", "gown"), Exists("qty")).hits == []  # its old qty is gone
    s.delete([docs[0].id])
    assert docs[0].id not in [h.id for h in search(s).hits]
    assert search(s, Term("category", "gown")).hits == []
    # a reader object of the same process sees the writer's later writes
    reader = DuckDBStore(tmp_path, read_only=True)
    assert search(reader, Term("category", "gown")).hits == []
    s.upsert([Document("late", docs[1].vectors, {"category": "gown"}, "v1")])
    assert [h.id for h in search(reader, Term("category", "gown")).hits] == ["late"]
    reader.close()
    s.close()
    again = DuckDBStore(tmp_path, read_only=True)  # a fresh process's view, loaded from DuckDB
    assert [h.id for h in search(again, Term("category", "gown")).hits] == ["late"]
    again.close()


def test_like_id_excludes_itself_and_counts_the_rest(store):
    ref = make_docs()[42]
    res = store.search(QuerySpec({"sleeve": 1.0}, like_id=ref.id, k=10))
    assert ref.id not in [h.id for h in res.hits] and len(res.hits) == 10
    everyone = store.count()
    assert res.total_candidates == everyone - 1
    f = coerce_filters([Term("category", ref.metadata["category"])], TYPES)
    res = store.search(QuerySpec({"sleeve": 1.0}, like_id=ref.id, filters=f, k=10))
    assert res.total_candidates == len(sql_rows(store, f)) - 1
    assert all(h.metadata["category"] == ref.metadata["category"] for h in res.hits)


def test_like_id_reads_the_live_vectors_of_the_reference(tmp_path):
    from fgplugin.errors import QueryError

    docs = make_docs()
    s = DuckDBStore(tmp_path)
    s.ensure_index(LAYOUT)
    s.upsert(docs[:50] + [docs[-1]])  # the last one has no neckline vector
    like = QuerySpec({"sleeve": 1.0}, like_id=docs[3].id, k=3)
    first = s.search(like).hits
    # new vectors for the reference: the query follows them (its row changed)
    s.upsert([Document(docs[3].id, docs[20].vectors, docs[3].metadata, "v1")])
    assert s.search(like).hits[0].id == docs[20].id and s.search(like).hits != first
    s.delete([docs[3].id])
    with pytest.raises(QueryError, match="no document with id"):
        s.search(like)
    with pytest.raises(QueryError, match="has no vector for neckline"):
        s.search(QuerySpec({"neckline": 1.0}, like_id=docs[-1].id, k=3))
    s.close()
