"""Row-aligned document columns in memory: each row's id, image and metadata as NumPy arrays.

The embedded store's queries score rows in NumPy (``fgplugin.search.vectors``); asking DuckDB which rows
a filter passes, and then for the winners' ids and metadata, cost more than the scoring itself at a
million documents (measured on 2 cores: 14 ms to return the 200k rows of a 20 % filter, 2-4 ms for 20
winners). These columns answer both in NumPy: ``mask`` evaluates the filters (the same meaning as the
store's SQL, ``compile_where``: two-valued, a missing value never matches), ``values`` gives a row's
metadata as DuckDB would.

They are built from DuckDB in one pass, per process, on the first query that needs them, and the
writing store object keeps them in step (``set_rows``); anything else that changes the rows makes the
store drop them. Keyword fields are dictionary-coded, numbers and dates are numbers (dates in UTC
microseconds), booleans are int8 (-1 for none). ``text`` fields are tokenised at query time by SQL
(``mask`` returns None for a filter on one, and the store asks DuckDB).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import duckdb
import numpy as np

from .spec import Bool, Exists, Filter, Range, Term, Terms
from .store import to_utc

EPOCH = dt.datetime(1970, 1, 1)


def _micros(value: Any) -> int:
    """A date filter value (coerced by the spec) in UTC microseconds, as DuckDB's epoch_us gives them."""
    return int((to_utc(value).replace(tzinfo=None) - EPOCH) // dt.timedelta(microseconds=1))


@dataclass
class Column:
    """One metadata field over all rows: ``data`` (codes / numbers), ``null`` where a row has no value."""

    kind: str  # a metadata type: keyword, text, float, integer, boolean, date
    data: np.ndarray
    null: np.ndarray
    vocab: dict[Any, int] = field(default_factory=dict)  # keyword: value -> code
    words: list[Any] = field(default_factory=list)  # keyword: code -> value

    def code(self, value: Any) -> int:
        """The keyword's code, given one to a new value."""
        c = self.vocab.get(value)
        if c is None:
            c = self.vocab[value] = len(self.words)
            self.words.append(value)
        return c

    def value(self, row: int) -> Any:
        """The row's value as DuckDB returns it (None, str, float, int, bool, naive UTC datetime)."""
        if self.null[row]:
            return None
        v = self.data[row]
        if self.kind == "keyword":
            return self.words[int(v)]
        if self.kind == "date":
            return EPOCH + dt.timedelta(microseconds=int(v))
        if self.kind == "boolean":
            return bool(v)
        if self.kind == "integer":
            return int(v)
        if self.kind == "float":
            return float(v)
        return v


_DTYPES = {"keyword": np.int32, "float": np.float64, "integer": np.int64, "boolean": np.int8, "date": np.int64,
           "text": object}


class DocColumns:
    """ids, images and metadata of rows ``0..capacity``; build with ``load``."""

    def __init__(self, types: Mapping[str, str], capacity: int):
        self.types = dict(types)
        self.ids = np.empty(capacity, dtype=object)
        self.images = np.empty(capacity, dtype=object)
        self.columns = {f: Column(t, np.zeros(capacity, _DTYPES[t]), np.ones(capacity, bool))
                        for f, t in self.types.items()}
        self._row_of_id: dict[str, int] | None = None  # built on the first like-id query

    @property
    def capacity(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, cursor: Callable[[], duckdb.DuckDBPyConnection], types: Mapping[str, str], capacity: int,
             row_col: str, meta_col: Callable[[str], str]) -> "DocColumns":
        """Every document's row from DuckDB (``row_col`` holds its row; ``meta_col(field)`` names a column)."""
        out = cls(types, capacity)
        got = cursor().execute(f"SELECT {row_col} AS r, id, image FROM docs").fetchnumpy()
        rows = np.asarray(got["r"], dtype=np.int64)
        out.ids[rows] = np.asarray(got["id"], dtype=object)
        out.images[rows] = np.ma.filled(np.ma.asarray(got["image"], dtype=object), None)
        for f, t in out.types.items():
            out._load_field(cursor, f, t, row_col, meta_col(f))
        return out

    def _load_field(self, cursor: Callable[[], duckdb.DuckDBPyConnection], f: str, t: str, row_col: str,
                    col: str) -> None:
        column = self.columns[f]
        cur, source, value = cursor(), "docs", col
        if t == "keyword":  # codes by a join with the distinct values: no Python loop over rows
            words = [r[0] for r in cur.execute(f"SELECT DISTINCT {col} FROM docs WHERE {col} IS NOT NULL").fetchall()]
            column.words, column.vocab = words, {w: i for i, w in enumerate(words)}
            cur.register("fg_vocab", {"w": np.array(words, dtype=object), "c": np.arange(len(words), dtype=np.int32)})
            source, value = f"docs LEFT JOIN fg_vocab v ON {col} = v.w", "v.c"
        elif t == "date":
            value = f"epoch_us({col})"
        elif t == "boolean":
            value = f"{col}::TINYINT"
        got = cur.execute(f"SELECT {row_col} AS r, {value} AS x FROM {source}").fetchnumpy()
        rows, x = np.asarray(got["r"], dtype=np.int64), got["x"]
        null = np.ma.getmaskarray(x) if np.ma.isMaskedArray(x) else np.array([v is None for v in x], bool) \
            if x.dtype == object else np.zeros(len(x), bool)
        if t == "float":
            null = null | np.isnan(np.ma.filled(x, 0.0).astype(np.float64))
        column.null[rows] = null
        keep = rows[~null]
        column.data[keep] = np.ma.filled(x, 0)[~null].astype(column.data.dtype) if t != "text" else \
            np.asarray(x, dtype=object)[~null]

    def grow(self, capacity: int) -> None:
        """Room for rows below ``capacity`` (the arrays grew)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.ids = np.concatenate([self.ids, np.empty(extra, dtype=object)])
        self.images = np.concatenate([self.images, np.empty(extra, dtype=object)])
        for c in self.columns.values():
            c.data = np.concatenate([c.data, np.zeros(extra, c.data.dtype)])
            c.null = np.concatenate([c.null, np.ones(extra, bool)])

    def set_rows(self, rows: np.ndarray, ids: Sequence[str], images: Sequence[str | None],
                 metadata: Sequence[Mapping[str, Any]]) -> None:
        """The writer's new values of ``rows`` (typed metadata, as ``typed_metadata`` makes them)."""
        self.grow(int(rows.max()) + 1 if len(rows) else 0)
        self.ids[rows] = np.asarray(list(ids), dtype=object)
        if self._row_of_id is not None:
            self._row_of_id.update(zip(ids, rows.tolist()))
        for r, image in zip(rows, images):
            self.images[r] = image
        for f, column in self.columns.items():
            for r, meta in zip(rows, metadata):
                v = meta.get(f)
                column.null[r] = v is None
                if v is None:
                    continue
                t = column.kind
                column.data[r] = (column.code(v) if t == "keyword" else _micros(v) if t == "date"
                                  else int(bool(v)) if t == "boolean" else v)

    def row_of(self, id_: str, alive: np.ndarray) -> int | None:
        """The live row of document ``id_`` (None if there is none); ``alive`` marks the live rows."""
        if self._row_of_id is None:
            live = np.flatnonzero(alive[: self.capacity])
            self._row_of_id = dict(zip(self.ids[live].tolist(), live.tolist()))
        r = self._row_of_id.get(id_)
        return r if r is not None and r < len(alive) and alive[r] else None

    def values(self, row: int) -> list[Any]:
        """The row's metadata values in field order, as DuckDB returns them."""
        return [c.value(row) for c in self.columns.values()]

    # -- filters ----------------------------------------------------------------------------------
    def mask(self, filters: Sequence[Filter]) -> np.ndarray | None:
        """Rows passing every filter (coerced by the spec), or None when a filter needs SQL (text fields)."""
        out: np.ndarray | None = None
        for f in filters:
            m = self._mask(f)
            if m is None:
                return None
            out = m if out is None else out & m
        return np.ones(self.capacity, bool) if out is None else out

    def _mask(self, f: Filter) -> np.ndarray | None:
        if isinstance(f, Bool):
            must = self.mask(f.must)
            should = [self._mask(x) for x in f.should]
            must_not = [self._mask(x) for x in f.must_not]
            if must is None or any(m is None for m in should + must_not):
                return None
            if should:
                must = must & np.logical_or.reduce(should)
            if must_not:
                must = must & ~np.logical_or.reduce(must_not)
            return must
        column = self.columns[f.field]
        if column.kind == "text":
            return None
        if isinstance(f, Exists):
            return ~column.null
        if isinstance(f, Term):
            return self._equal(column, [f.value])
        if isinstance(f, Terms):
            return self._equal(column, list(f.values))
        if isinstance(f, Range):
            return self._range(column, f)
        return None

    def _encode(self, column: Column, value: Any) -> Any:
        t = column.kind
        if t == "keyword":
            return column.vocab.get(value, -1)  # a value no row has matches nothing
        if t == "date":
            return _micros(value)
        if t == "boolean":
            return int(bool(value))
        return value

    def _equal(self, column: Column, values: list[Any]) -> np.ndarray:
        wanted = np.array([self._encode(column, v) for v in values], dtype=column.data.dtype)
        hit = column.data == wanted[0] if len(wanted) == 1 else np.isin(column.data, wanted)
        return hit & ~column.null

    def _range(self, column: Column, f: Range) -> np.ndarray:
        out = ~column.null
        for op, v in ((np.greater, f.gt), (np.greater_equal, f.gte), (np.less, f.lt), (np.less_equal, f.lte)):
            if v is not None:
                out &= op(column.data, self._encode(column, v))
        return out
