"""The embedded store (default): one DuckDB file in a directory, exact weighted-cosine search in SQL.

Layout: table ``docs`` with ``id`` (primary key), ``model_version``, ``image``, the document's
fingerprint ``image_key`` and ``meta_key`` (``fgplugin.search.store.Fingerprint``), one ``FLOAT[d]``
column ``emb_<attribute>`` per attribute (unit vectors; ``SMALLINT[d]`` half-precision bits or ``TINYINT[d]``
int8 codes under the float16, int8 and binary codecs, ``fgplugin.codecs``) and one typed column ``m_<field>`` per metadata
field; table ``fg_meta`` (key -> JSON value) records the schema, the vector sizes, the metadata types,
the current model version and free keys such as ``model_path``. A store written before the fingerprint
columns existed gets them (empty: "unknown", so the index worker re-indexes those documents) when it is
next opened for writing; read-only it opens as it is.

Scoring is the same as the OpenSearch exact script (see ``fgplugin.opensearch``): for each chosen
attribute a the script adds ``w_a * (1 + cos_a)`` when the document has the vector and 0 when it does
not, and the client subtracts ``sum w``. So a present vector contributes ``w_a * cos_a`` and a MISSING
vector contributes ``-w_a`` (as if its cosine were -1, the lowest possible). This store computes
exactly that: ``sum w_a * COALESCE(cos_a, -1)``, ordered by score descending, then id ascending.

Filters follow OpenSearch semantics: a document without the field matches no term/terms/range
filter, and does match a ``must_not`` around one (every leaf is made two-valued with COALESCE before
NOT is applied, so SQL's three-valued NULL logic never leaks through).

Search runs on row-aligned vector arrays beside the DuckDB file (``fgplugin.search.vectors``; column
``fg_row`` maps a document to its row): an exact query is a NumPy product over every live row, or over
the rows DuckDB's WHERE selects, and the best rows are rescored in float64 and ordered as above. The
``ann`` modes use faiss indexes built from the same arrays (``fgplugin.search.ann``): an IVF index per
attribute for a one-attribute query, an HNSW over all attributes for a mix; their candidates are rescored
exactly, and a filter that leaves few documents runs exactly instead. ``SearchResult.note`` says which
plan ran. Arrays and indexes are derived caches: missing, stale (another ``cache_epoch``) or damaged,
they are rebuilt from DuckDB, the source of truth. A store without ``fg_row`` (written by an older
fgplugin) opened read-only is searched in SQL (``array_inner_product``) as before.

Concurrency: one writer per store (DuckDB locks the file); readers open it read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import json
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import numpy as np

from ..errors import QueryError, StoreError
from .spec import (Bool, Exists, Filter, Hit, QuerySpec, Range, SearchResult, Term, Terms,
                          coerce_filters)
from ..schema import METADATA_TYPES, AttributeSchema
from .ann import AnnIndexes, load_faiss, target_of
from .columns import DocColumns
from .vectors import CACHE_DIR, VectorArrays, new_epoch
from .store import (ERRORS_FILE, Document, Failure, Fingerprint, IndexLayout, Store, UpsertResult, codec_from_meta,
                    document_vectors, dropped_version, extension_from_meta, reference_vectors, to_utc, typed_metadata,
                    unit_rows)
from ..codecs import code_dtype, decode, encode, scoring_query, stored_codec

DB_FILE = "fgplugin.duckdb"
FORMAT_VERSION = 1
SQL_TYPES = {
    "keyword": "VARCHAR", "text": "VARCHAR", "float": "DOUBLE", "integer": "BIGINT",
    "boolean": "BOOLEAN", "date": "TIMESTAMP",  # dates are stored in UTC
}
NO_ANN_NOTE = (
    "the embedded store has no ANN index here (faiss-cpu is not installed, or the store predates its "
    "vector arrays and is open read-only); ran an exact search"
)
ROW_COLUMN = "fg_row"  # the document's row in the vector arrays (fgplugin.search.vectors)
# Reading rows back by row number (rebuilding the arrays, chunk by chunk) without a full scan per chunk.
ROW_INDEX_SQL = f"CREATE INDEX IF NOT EXISTS docs_{ROW_COLUMN} ON docs ({ROW_COLUMN})"
MIX_CANDIDATES = 500  # a mix's candidates rescored exactly, at least (see _mix_candidates)
EXACT_BELOW = 50_000  # ann modes: a filter leaving at most this many (rows x attributes) runs exactly
TIE_MARGIN = 1e-5  # float32 scores this close to the k-th are rescored in float64 before ordering
FINGERPRINT_COLUMNS = ("image_key", "meta_key")  # added after format 1 shipped: ALTERed into older stores
MISSING_COSINE = -1.0  # what a missing attribute vector counts as (see the module docstring)
# The DuckDB column of each codec's codes (the source of truth): float16 as its 16-bit patterns
CODE_SQL = {"float32": "FLOAT", "float16": "SMALLINT", "int8": "TINYINT"}
# binary: the bits' candidates rescored on the int8 codes: 10 per hit asked for, at least 200 and at least 1 in
# BINARY_SHARE of the documents searched. 64 sign bits rank coarsely: on bench/query.py's clustered set (one
# 64-d attribute) 200 candidates kept overlap@20 0.90 at 20k items but 0.49 at 100k; 2 % of the rows (2,000)
# reach int8's own 0.94 at 100k (bench/codecs.py has the store's figures)
BINARY_FACTOR = 10
BINARY_WINDOW = 200
BINARY_SHARE = 50
# Writes per store file in this process: a store object re-reads its rows when another one wrote (another
# process cannot write meanwhile: DuckDB's file lock admits one writer and no readers beside it).
_GENERATIONS: dict[str, int] = {}


_DAMAGE = ("Corrupt database file", "Could not read enough bytes", "not a valid DuckDB database file",
           "Checksum", "checksum", "Invalid block", "INTERNAL Error")


def _store_error(path: Path, e: BaseException, doing: str) -> StoreError:
    """One line for a DuckDB error while ``doing`` something; a damaged file says so, whatever was done."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if any(d in str(e) for d in _DAMAGE):
        return StoreError(f"the embedded store file {path} is damaged ({first}); `fgplugin store verify` checks "
                          "every column. Restore it from a backup, or index the catalog into a new folder")
    return StoreError(f"{doing}: {first}")


def _store_errors(fn: Any) -> Any:
    """DuckDB errors out of a store method become one-line StoreErrors; a damaged file says so (instead
    of a traceback, or a hint about another writer), and DuckDB's Ctrl-C interrupt is a KeyboardInterrupt."""

    @functools.wraps(fn)
    def wrapper(self: "DuckDBStore", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except duckdb.InterruptException:
            raise KeyboardInterrupt from None
        except duckdb.Error as e:
            raise _store_error(self.path, e, f"embedded store {self.path}") from None

    return wrapper


def _q(name: str) -> str:
    """Quote an SQL identifier (metadata field names come from catalogs)."""
    return '"' + name.replace('"', '""') + '"'


def code_sql(codec: str, d: int) -> str:
    """The DuckDB column type of one attribute's codes."""
    return f"{CODE_SQL[stored_codec(codec)]}[{int(d)}]"


def to_sql_codes(codes: np.ndarray) -> np.ndarray:
    """Codes as DuckDB takes them (float16 as its bit patterns: DuckDB has no half type)."""
    return codes.view(np.int16) if codes.dtype == np.float16 else codes


def sql_codes(values: Any, codec: str) -> np.ndarray:
    """Codes read back from DuckDB -> the codec's NumPy codes."""
    x = np.asarray(values)
    if stored_codec(codec) == "float16":
        return x.astype(np.int16).view(np.float16)
    return x.astype(code_dtype(codec))


def emb_col(attribute: str) -> str:
    return _q(f"emb_{attribute}")


def meta_col(field: str) -> str:
    return _q(f"m_{field}")


def _from_sql(value: Any, type_: str) -> Any:
    if value is None:
        return None
    if type_ == "date" and isinstance(value, dt.datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    return value


class DuckDBStore(Store):
    """An embedded store in ``directory`` (created on first write)."""

    kind = "embedded"

    def __init__(self, directory: str | Path, *, read_only: bool = False):
        self.directory = Path(directory).expanduser()
        self.path = self.directory / DB_FILE
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise StoreError(
                f"no embedded store at {self.directory} (expected {self.path}); build one with `fgplugin index`"
            )
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        try:
            try:
                self.con = duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.ConnectionException as e:
                if not (read_only and "different configuration" in str(e)):
                    raise
                # This process already holds the store for writing: share that database (DuckDB
                # isolates transactions within a process); this object still refuses writes.
                self.con = duckdb.connect(str(self.path))
        except duckdb.Error as e:
            err = _store_error(self.path, e, f"cannot open the embedded store {self.path}")
            if "lock" in str(e):
                err = StoreError(f"{err} (a store has a single writer: is another fgplugin process indexing into it?)")
            raise err from None
        try:
            self._setup(read_only)
        except BaseException:
            self.con.close()
            raise

    @_store_errors
    def _setup(self, read_only: bool) -> None:
        self._lock = threading.RLock()  # re-entered: a write records meta under the same lock
        if not read_only:
            # Random-looking floats barely compress, and ALP decompression tripled scan times (bench/query.py).
            self._sql("SET disabled_compression_methods = 'alp,alprd,chimp,patas'")
            self._sql("CREATE TABLE IF NOT EXISTS fg_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        self._layout: IndexLayout | None = self._read_layout()
        self._has_fingerprints = False
        if not read_only and self._has_table("docs") and not self._fingerprint_columns():
            with self._lock:  # a store written before the fingerprint columns existed: add them (empty)
                for c in FINGERPRINT_COLUMNS:
                    self._sql(f"ALTER TABLE docs ADD COLUMN IF NOT EXISTS {c} VARCHAR")
            self._has_fingerprints = True
        self._cache: VectorArrays | None = None
        self._alive = np.zeros(0, dtype=bool)  # per row: a document points at it
        self._next_row = 0
        self._seen_generation: Any = None
        self._generation_key = str(self.path.resolve())
        self._ann: AnnIndexes | None = None
        # ids, images and metadata by row, for filters and hits without asking DuckDB (built on first use)
        self._columns: DocColumns | None = None
        self._columns_for: tuple[int, Any] | None = None  # the arrays object and generation they match
        if not read_only and self._has_table("docs") and not self._has_row_column():
            with self._lock:  # a store written before the vector arrays existed: number its rows
                self._sql(f"ALTER TABLE docs ADD COLUMN {ROW_COLUMN} BIGINT")
                self._sql(f"UPDATE docs SET {ROW_COLUMN} = t.r FROM (SELECT id, row_number() OVER () - 1 AS r "
                          f"FROM docs) t WHERE docs.id = t.id")
        if not read_only and self._has_table("docs"):
            self._sql(ROW_INDEX_SQL)

    def _has_row_column(self) -> bool:
        return bool(self._sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'docs' "
                              "AND column_name = ?", [ROW_COLUMN])[0][0])

    def __repr__(self) -> str:
        return f"DuckDBStore({str(self.directory)!r}, read_only={self.read_only})"

    @property
    def layout(self) -> IndexLayout | None:
        """What the store holds (None before the first ``ensure_index``; re-read until then, so a
        reader opened before the writer created the index sees it)."""
        if self._layout is None:
            self._layout = self._read_layout()
        return self._layout

    @property
    def url(self) -> str:
        return f"embedded:{self.directory}"

    def _sql(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """Run one statement on the main connection and drain its result (DuckDB wants it drained)."""
        return self.con.execute(sql, params).fetchall() if params is not None else self.con.execute(sql).fetchall()

    # -- meta -------------------------------------------------------------------------------------
    def _has_table(self, name: str) -> bool:
        return bool(self._sql("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])[0][0])

    def _fingerprint_columns(self) -> bool:
        """Whether ``docs`` has the fingerprint columns (not in a store of an older fgplugin opened read-only)."""
        if not self._has_fingerprints:
            got = self._cursor().execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'docs' AND column_name IN (?, ?)",
                list(FINGERPRINT_COLUMNS)).fetchall()[0][0]
            self._has_fingerprints = got == len(FINGERPRINT_COLUMNS)
        return self._has_fingerprints

    @_store_errors
    def get_meta(self, key: str, default: Any = None) -> Any:
        if not self._has_table("fg_meta"):
            return default
        rows = self._sql("SELECT value FROM fg_meta WHERE key = ?", [key])
        return json.loads(rows[0][0]) if rows else default

    @_store_errors
    def set_meta(self, key: str, value: Any) -> None:
        self._writable()
        with self._lock:
            self._sql(
                "INSERT INTO fg_meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, json.dumps(value)],
            )

    def _read_layout(self) -> IndexLayout | None:
        schema = self.get_meta("schema")
        if schema is None or not self._has_table("docs"):
            return None
        fmt = self.get_meta("format_version")
        if fmt != FORMAT_VERSION:
            raise StoreError(f"{self.path} has store format {fmt}; this fgplugin reads format {FORMAT_VERSION}")
        return IndexLayout(
            schema=AttributeSchema.from_dict(schema, source=str(self.path)),
            dims={k: int(v) for k, v in self.get_meta("dims").items()},
            metadata_types=dict(self.get_meta("metadata_types")),
            model_version=str(self.get_meta("model_version", "")),
            query_slack=bool(self.get_meta("query_slack", False)),  # stores written before it: never
            **codec_from_meta(self.get_meta("codec")),  # stores written before codecs: float32
            **extension_from_meta(self.get_meta("extension")),  # attributes added or dropped in place
        )

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")

    def _need_layout(self) -> IndexLayout:
        if self.layout is None:
            raise StoreError(f"the embedded store {self.directory} holds no index yet; build one with `fgplugin index`")
        return self.layout

    # -- the vector arrays and ANN indexes (derived caches) ---------------------------------------
    def _vectors(self) -> VectorArrays | None:
        """The row-aligned arrays, valid for what DuckDB holds now (opened, refreshed or rebuilt), or None
        where there are none (no index yet, or a store of an older fgplugin open read-only)."""
        layout = self.layout
        if layout is None:
            return None
        generation = _GENERATIONS.get(self._generation_key, 0)
        if self._cache is not None and generation == self._seen_generation:
            return self._cache
        if not self._has_row_column():
            return None
        epoch = self.get_meta("cache_epoch")
        directory = self.directory / CACHE_DIR
        arrays = None
        if self._cache is not None and self._cache.state.epoch == epoch and self._cache.reload():
            arrays = self._cache
        elif epoch is not None:
            arrays = VectorArrays.open_valid(directory, epoch, layout.attributes, layout.dims, not self.read_only,
                                             layout.codec)
        if arrays is None or not self._load_alive(arrays):
            arrays = self._rebuild_vectors(layout, epoch)
        if arrays is None:
            return None
        if self._ann is None or self._ann.arrays is not arrays or self._ann.epoch != arrays.state.epoch:
            faiss = load_faiss()
            self._ann = AnnIndexes(faiss, directory, arrays, arrays.state.epoch) if faiss is not None else None
        self._cache, self._seen_generation = arrays, _GENERATIONS.get(self._generation_key, 0)
        return arrays

    def _load_alive(self, arrays: VectorArrays) -> bool:
        """Mark the rows DuckDB points at; False if one is beyond what the arrays hold (then they are stale)."""
        rows = self._cursor().execute(f"SELECT {ROW_COLUMN} FROM docs").fetchnumpy()[ROW_COLUMN]
        if np.ma.is_masked(rows) or (len(rows) and int(rows.max()) >= arrays.state.reserved):
            return False
        self._alive = np.zeros(arrays.state.capacity, dtype=bool)
        self._alive[np.asarray(rows, dtype=np.int64)] = True
        self._next_row = arrays.state.reserved
        return True

    def _rebuild_vectors(self, layout: IndexLayout, epoch: str | None) -> VectorArrays | None:
        """Write the arrays afresh from DuckDB (a new epoch when writable, so ANN files of the old one are
        rebuilt too). None for a read-only store that never had arrays, or a folder that cannot be written."""
        if self.read_only and epoch is None:
            return None
        epoch = new_epoch() if not self.read_only else epoch
        top = self._cursor().execute(f"SELECT coalesce(max({ROW_COLUMN}) + 1, 0) FROM docs").fetchall()[0][0]
        try:
            arrays = VectorArrays.create(self.directory / CACHE_DIR, epoch, layout.attributes, layout.dims, int(top),
                                         layout.codec)
            arrays.reserve(int(top))
            for i, a in enumerate(layout.attributes):
                self._fill_attribute(arrays, i, a, layout.dims[a], int(top))
            arrays.flush()
        except OSError:
            return None
        if not self.read_only:
            self.set_meta("cache_epoch", epoch)
            self._bump_generation()
        return arrays if self._load_alive(arrays) else None

    def _fill_attribute(self, arrays: VectorArrays, i: int, attribute: str, d: int, top: int, chunk: int = 100_000) -> None:
        col = emb_col(attribute)
        for lo in range(0, top, chunk):
            res = self._cursor().execute(
                f"SELECT {ROW_COLUMN} AS r, unnest({col}) AS v FROM docs WHERE {ROW_COLUMN} >= ? AND {ROW_COLUMN} < ? "
                f"AND {col} IS NOT NULL", [lo, lo + chunk]).fetchnumpy()
            rows = np.asarray(res["r"], dtype=np.int64)[::d]
            arrays.write(rows, i, sql_codes(res["v"], arrays.state.codec).reshape(-1, d), np.ones(len(rows), bool))

    def _allocate(self, n: int) -> np.ndarray:
        """``n`` fresh rows, reserved in the arrays before anything is written to them."""
        arrays = self._vectors()
        assert arrays is not None  # a writable store with a layout always has them
        start = self._next_row
        arrays.reserve(start + n)
        if len(self._alive) < arrays.state.capacity:
            self._alive = np.concatenate([self._alive, np.zeros(arrays.state.capacity - len(self._alive), bool)])
        self._next_row = start + n
        return np.arange(start, start + n, dtype=np.int64)

    def _bump_generation(self) -> None:
        """Tell other store objects of this process (readers) that the rows changed."""
        key = self._generation_key
        _GENERATIONS[key] = self._seen_generation = _GENERATIONS.get(key, 0) + 1

    def _doc_columns(self, arrays: VectorArrays) -> DocColumns:
        """The row-aligned ids, images and metadata for ``arrays`` (loaded from DuckDB when stale)."""
        columns = self._current_columns()
        if columns is None or self._columns_for != (id(arrays), self._seen_generation):
            layout = self._need_layout()
            columns = DocColumns.load(self._cursor, layout.metadata_types, arrays.state.capacity, ROW_COLUMN, meta_col)
            self._columns, self._columns_for = columns, (id(arrays), self._seen_generation)
        return columns

    def _current_columns(self) -> DocColumns | None:
        """The columns if they match the rows as this object last saw them (a writer then updates them)."""
        if self._columns is None or self._cache is None or self._columns_for != (id(self._cache), self._seen_generation):
            return None
        return self._columns

    def _keep_columns(self, columns: DocColumns | None) -> None:
        """After this object's own write (and its generation bump): the columns it updated stay valid."""
        if columns is not None and self._cache is not None:
            self._columns_for = (id(self._cache), self._seen_generation)

    def prepare_ann(self, attributes: Sequence[str] | None = None) -> dict[str, Any]:
        """Bring the ANN indexes up to date now (the index of each attribute in ``attributes``, default all;
        mixes use the indexes of their attributes) and save them; a query would do it on first use."""
        arrays = self._vectors()
        if arrays is None or self._ann is None:
            return {"ann": False}
        names = list(attributes) if attributes is not None else list(arrays.state.attributes)
        targets = [target_of(arrays.state.attributes, a) for a in names]
        for t in targets:
            self._ann.index(t)
        self._save_ann()
        return {"ann": True, "targets": targets, "rows": arrays.state.reserved}

    def _save_ann(self) -> None:
        if self._ann is not None:
            try:
                self._ann.save()
            except (OSError, RuntimeError):
                pass  # a folder that cannot be written: the indexes are rebuilt on next use

    # -- index ------------------------------------------------------------------------------------
    @_store_errors
    def ensure_index(self, layout: IndexLayout) -> None:
        """Create the table, or check that the existing one fits ``layout``.

        A different schema or vector size is refused; a different model version is accepted (each
        document records its own version, and the index worker re-encodes stale ones); metadata
        fields the store has not seen yet are added as new columns.
        """
        self._writable()
        if sorted(layout.dims) != sorted(layout.attributes):
            raise StoreError(
                f"layout dims cover {sorted(layout.dims)} but the schema's attributes are {layout.attributes}"
            )
        for f, t in layout.metadata_types.items():
            if t not in METADATA_TYPES:
                raise StoreError(f"metadata field {f!r} has type {t!r}; use one of {', '.join(METADATA_TYPES)}")
        old = self.layout
        with self._lock:
            if old is None:
                cols = ["id VARCHAR PRIMARY KEY", f"{ROW_COLUMN} BIGINT", "model_version VARCHAR", "image VARCHAR"]
                cols += [f"{c} VARCHAR" for c in FINGERPRINT_COLUMNS]
                cols += [f"{emb_col(a)} {code_sql(layout.codec, layout.dims[a])}" for a in layout.attributes]
                cols += [f"{meta_col(f)} {SQL_TYPES[t]}" for f, t in layout.metadata_types.items()]
                self._sql("BEGIN")
                self._sql(f"CREATE TABLE docs ({', '.join(cols)})")
                self._sql(ROW_INDEX_SQL)
                self._write_meta(layout, layout.metadata_types)
                self._sql("COMMIT")
            else:
                self._check_compatible(old, layout)
                types = dict(old.metadata_types)
                self._sql("BEGIN")
                for f, t in layout.metadata_types.items():
                    if f not in types:
                        self._sql(f"ALTER TABLE docs ADD COLUMN {meta_col(f)} {SQL_TYPES[t]}")
                        types[f] = t
                # what was added or dropped in place stays recorded (the model's layout knows nothing of it)
                self._write_meta(dataclasses.replace(layout, combined=old.combined, dropped=old.dropped,
                                                     dropped_from=old.dropped_from), types)
                self._sql("COMMIT")
        self._layout = self._read_layout()
        self._columns = None  # metadata fields may have been added

    def _write_meta(self, layout: IndexLayout, types: Mapping[str, str]) -> None:
        for k, v in {
            "format_version": FORMAT_VERSION,
            "schema": layout.schema.to_dict(),
            "schema_fingerprint": layout.schema.fingerprint(),
            "dims": {a: int(layout.dims[a]) for a in layout.attributes},
            "metadata_types": dict(types),
            "model_version": layout.model_version,
            "query_slack": layout.query_slack,
            "codec": layout.codec_meta(),
            "extension": layout.extension_meta(),
        }.items():
            self._sql(
                "INSERT INTO fg_meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [k, json.dumps(v)],
            )

    def _check_compatible(self, old: IndexLayout, new: IndexLayout) -> None:
        hint = f"use another store directory, or delete {self.path} to rebuild it"
        if old.codec_mismatch(new):  # no versioned indexes here: a new codec is a new store
            hint = (f"an embedded store keeps the codec it was created with: index into a new store directory "
                    f"(fgplugin index --codec {new.codec} --store embedded:NEW_DIR), or keep --codec {old.codec} here")
        old.require_fits(new, where=f"the embedded store {self.directory}", hint=hint)

    @staticmethod
    def _check_values(good: Mapping[str, tuple[Document, dict[str, np.ndarray], dict[str, Any]]],
                      layout: IndexLayout) -> dict[str, str]:
        """Reject non-finite and zero vectors, normalise the others and replace them by their codes (in
        place); returns id -> reason."""
        bad: dict[str, str] = {}
        for a in layout.attributes:
            ids = [i for i, (_, v, _) in good.items() if a in v]
            if not ids:
                continue
            rows, refused = unit_rows(a, np.stack([good[i][1][a] for i in ids]))
            rows = encode(rows, layout.codec, layout.scale(a))
            for j, i in enumerate(ids):
                if j in refused:
                    bad.setdefault(i, refused[j])
                else:
                    good[i][1][a] = rows[j]
        return bad

    @_store_errors
    def upsert(self, docs: list[Document]) -> UpsertResult:
        """Insert or replace documents. Invalid ones come back as Failures; the rest are written.

        Their vectors go to fresh rows of the arrays first (flushed), then one DuckDB statement points
        the documents at them; a replaced document whose vectors did not change keeps its old row."""
        self._writable()
        layout = self._need_layout()
        result = UpsertResult()
        good: dict[str, tuple[Document, dict[str, np.ndarray], dict[str, Any]]] = {}
        for doc in docs:
            try:
                vecs, meta = document_vectors(doc, layout), typed_metadata(layout, doc.metadata)
            except ValueError as e:
                result.failed.append(Failure(str(doc.id), "store", str(e), kind="rejected"))
                continue
            good.pop(doc.id, None)  # the last copy of a repeated id wins
            good[doc.id] = (doc, vecs, meta)
        for i, reason in self._check_values(good, layout).items():
            del good[i]
            result.failed.append(Failure(i, "store", reason, kind="rejected"))
        if not good:
            return result
        rows = list(good.values())
        with self._lock:
            new_rows = self._allocate(len(rows))
            self._write_arrays(new_rows, [v for _, v, _ in rows], layout)
            stage, select, cols = self._stage(rows, new_rows, layout)
            final = self._insert(stage, select, cols, new_rows)
            columns = self._current_columns()
            if columns is not None:
                columns.set_rows(np.array([final[str(d.id)] for d, _, _ in rows], dtype=np.int64),
                                 [d.id for d, _, _ in rows], [d.image for d, _, _ in rows], [m for _, _, m in rows])
            self._bump_generation()
            self._keep_columns(columns)
        result.ok.extend(good)
        return result

    def _write_arrays(self, rows: np.ndarray, vectors: list[dict[str, np.ndarray]], layout: IndexLayout) -> None:
        arrays = self._cache
        assert arrays is not None
        for a in layout.attributes:
            i = arrays.index_of(a)  # by name: an attribute added in place has the next file number
            present = np.array([a in v for v in vectors], dtype=bool)
            block = np.zeros((len(rows), layout.dims[a]), code_dtype(layout.codec))
            if present.any():
                block[present] = np.stack([v[a] for v in vectors if a in v])
            arrays.write(rows, i, block, present)
        arrays.flush()  # on disk (page cache) before DuckDB points at the rows

    @staticmethod
    def _stage(rows: list[tuple[Document, dict[str, np.ndarray], dict[str, Any]]], new_rows: np.ndarray,
               layout: IndexLayout) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
        """The columns of a staging table for ``rows`` (registered from NumPy), its SELECT list and the
        ``docs`` columns it fills."""
        n = len(rows)

        def objects(values: Iterable[Any]) -> np.ndarray:
            out = np.empty(n, dtype=object)
            for i, v in enumerate(values):  # element-wise: never let numpy broadcast equal-length vectors
                out[i] = v
            return out

        stage: dict[str, np.ndarray] = {
            "id": objects(d.id for d, _, _ in rows),
            "fg_row": new_rows,
            "model_version": objects(d.model_version or layout.model_version for d, _, _ in rows),
            "image": objects(d.image for d, _, _ in rows),
            "image_key": objects(d.image_key for d, _, _ in rows),
            "meta_key": objects(d.meta_key for d, _, _ in rows),
        }
        select = ["id::VARCHAR AS id", "fg_row::BIGINT AS fg_row", "model_version::VARCHAR AS model_version",
                  "image::VARCHAR AS image", "image_key::VARCHAR AS image_key", "meta_key::VARCHAR AS meta_key"]
        cols = ["id", ROW_COLUMN, "model_version", "image", "image_key", "meta_key"]
        for i, a in enumerate(layout.attributes):
            stage[f"e{i}"] = objects(None if v.get(a) is None else to_sql_codes(v[a]) for _, v, _ in rows)
            select.append(f"e{i}::{code_sql(layout.codec, layout.dims[a])} AS e{i}")
            cols.append(emb_col(a))
        for i, (f, t) in enumerate(layout.metadata_types.items()):
            stage[f"m{i}"] = objects(m.get(f) for _, _, m in rows)
            select.append(f"m{i}::{SQL_TYPES[t]} AS m{i}")
            cols.append(meta_col(f))
        return stage, select, cols

    def _insert(self, stage: dict[str, np.ndarray], select: list[str], cols: list[str],
                new_rows: np.ndarray) -> dict[str, int]:
        """Write the staged documents in one statement (all or nothing) and mark their rows live; returns
        each staged id's row (a fresh one, or its old one where its vectors did not change)."""
        n = len(new_rows)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols[1:])
        self.con.register("fg_stage_in", stage)
        try:
            self._sql(f"CREATE OR REPLACE TEMP TABLE fg_stage AS SELECT {', '.join(select)} FROM fg_stage_in")
            insert = f"INSERT INTO docs ({', '.join(cols)}) SELECT * FROM fg_stage"
            dead = np.zeros(0, np.int64)
            try:
                self._sql(insert)  # one statement, so all or nothing
            except duckdb.ConstraintException:
                # Some ids exist: replace them. Only now, because ON CONFLICT costs several times a
                # plain insert (measured: 20k new docs of 8x64-d, 1.1 s plain vs 7.9 s with ON CONFLICT),
                # and finding the existing ids first scans the whole id column per batch.
                dead = self._keep_unchanged_rows()
                self._sql(f"{insert} ON CONFLICT (id) DO UPDATE SET {updates}")
            final = self._sql("SELECT id, fg_row FROM fg_stage")
            live = np.asarray([r for _, r in final], dtype=np.int64)
        except duckdb.Error as e:
            raise _store_error(self.path, e, f"writing {n} documents to {self.path} failed") from None
        finally:
            self.con.unregister("fg_stage_in")
            self._sql("DROP TABLE IF EXISTS fg_stage")
        self._alive[dead] = False
        self._alive[live] = True
        return dict(final)

    def _keep_unchanged_rows(self) -> np.ndarray:
        """For staged documents that exist already: those whose vectors are unchanged keep their old row
        (fg_stage is updated); returns the old rows of the others (dead once the write commits)."""
        old = self._sql(f"SELECT s.fg_row, d.{ROW_COLUMN} FROM fg_stage s JOIN docs d USING (id)")
        if not old:
            return np.zeros(0, np.int64)
        new_r, old_r = (np.asarray(c, dtype=np.int64) for c in zip(*old))
        arrays = self._cache
        assert arrays is not None
        same = np.ones(len(new_r), dtype=bool)
        for i, a in enumerate(arrays.state.attributes):
            same &= (arrays.present[new_r, i] == arrays.present[old_r, i])
            same &= (arrays.rows_of(a, new_r) == arrays.rows_of(a, old_r)).all(axis=1)
        if same.any():
            self.con.register("fg_keep", {"n": new_r[same], "o": old_r[same]})
            try:
                self._sql("UPDATE fg_stage SET fg_row = k.o FROM fg_keep k WHERE fg_stage.fg_row = k.n")
            finally:
                self.con.unregister("fg_keep")
        return old_r[~same]

    # -- attributes added or dropped in place -------------------------------------------------------------
    @_store_errors
    def add_attributes(self, layout: IndexLayout) -> list[str]:
        """A new ``emb_<a>`` column per added attribute (NULL in every row) and their array files; no other
        column is written (``Store.add_attributes``)."""
        self._writable()
        old = self._need_layout()
        gone = [a for a in old.attributes if a not in layout.attributes]
        if gone:
            raise StoreError(f"adding attributes to {self.url}: the new layout lacks {', '.join(gone)}")
        added = [a for a in layout.attributes if a not in old.attributes]
        with self._lock:
            arrays = self._vectors()  # the cache as it is, grown below rather than rebuilt
            self._sql("BEGIN")
            try:
                for a in added:
                    self._sql(f"ALTER TABLE docs ADD COLUMN IF NOT EXISTS {emb_col(a)} {code_sql(layout.codec, layout.dims[a])}")
                self._write_meta(layout, {**old.metadata_types, **layout.metadata_types})
                self._sql("COMMIT")
            except BaseException:
                self._sql("ROLLBACK")
                raise
            self._layout = self._read_layout()
            grow = [a for a in added if arrays is not None and a not in arrays.state.attributes]
            if arrays is not None and grow:
                try:
                    arrays.add_attributes(grow, [layout.dims[a] for a in grow])
                except OSError:
                    self._cache = None  # rebuilt from DuckDB on next use
            self._columns = None
            self._bump_generation()
        return added

    @_store_errors
    def update_vectors(self, docs: list[Document]) -> UpsertResult:
        """The documents' vectors into their existing rows (DuckDB: only those columns and ``model_version``;
        the arrays: those attributes' rows, the cache marked invalid on disk until DuckDB has committed)."""
        self._writable()
        layout = self._need_layout()
        result = UpsertResult()
        good: dict[str, tuple[Document, dict[str, np.ndarray], dict[str, Any]]] = {}
        for doc in docs:
            try:
                good[doc.id] = (doc, document_vectors(doc, layout), {})
            except ValueError as e:
                result.failed.append(Failure(str(doc.id), "store", str(e), kind="rejected"))
        for i, reason in self._check_values(good, layout).items():
            del good[i]
            result.failed.append(Failure(i, "store", reason, kind="rejected"))
        if not good:
            return result
        with self._lock:
            rows = self._rows_of(list(good))
            for i in [i for i in good if i not in rows]:
                del good[i]
                result.failed.append(Failure(i, "store", f"no stored document {i!r} to add vectors to", kind="missing"))
            groups: dict[tuple[str, ...], list[str]] = {}
            for i, (_, v, _) in good.items():
                groups.setdefault(tuple(a for a in layout.attributes if a in v), []).append(i)
            for attrs, ids in groups.items():
                self._update_group(layout, attrs, ids, good, rows)
            self._bump_generation()
        result.ok.extend(good)
        return result

    def _rows_of(self, ids: list[str]) -> dict[str, int]:
        self.con.register("fg_ids", {"id": np.array(ids, dtype=object)})
        try:
            return dict(self._sql(f"SELECT id, {ROW_COLUMN} FROM docs WHERE id IN (SELECT id FROM fg_ids)"))
        finally:
            self.con.unregister("fg_ids")

    def _update_group(self, layout: IndexLayout, attrs: tuple[str, ...], ids: list[str],
                      good: Mapping[str, tuple[Document, dict[str, np.ndarray], dict[str, Any]]],
                      rows: Mapping[str, int]) -> None:
        """One UPDATE of the documents ``ids``, which carry the vectors of ``attrs``, and their array rows."""
        stage: dict[str, np.ndarray] = {"id": np.array(ids, dtype=object),
                                        "mv": np.array([good[i][0].model_version or layout.model_version for i in ids],
                                                       dtype=object)}
        sets = ["model_version = s.mv::VARCHAR"]
        for j, a in enumerate(attrs):
            col = np.empty(len(ids), dtype=object)
            for k, i in enumerate(ids):
                col[k] = to_sql_codes(good[i][1][a])
            stage[f"e{j}"] = col
            sets.append(f"{emb_col(a)} = s.e{j}::{code_sql(layout.codec, layout.dims[a])}")
        arrays = self._vectors()
        r = np.array([rows[i] for i in ids], dtype=np.int64)
        self.con.register("fg_update", stage)
        try:
            with arrays.rewriting() if arrays is not None else contextlib.nullcontext():
                if arrays is not None:
                    for a in attrs:
                        arrays.overwrite(r, arrays.index_of(a), np.stack([good[i][1][a] for i in ids]))
                        if self._ann is not None:
                            self._ann.forget(target_of(arrays.state.attributes, a))
                    arrays.flush()
                self._sql(f"UPDATE docs SET {', '.join(sets)} FROM fg_update s WHERE docs.id = s.id")
        except BaseException:
            self._cache = None  # the arrays may say more than DuckDB: rebuilt from it on next use
            raise
        finally:
            self.con.unregister("fg_update")

    @_store_errors
    def drop_attribute(self, attribute: str) -> dict[str, Any]:
        """Drop the column ``emb_<attribute>`` and record the attribute as dropped; every document's model
        version becomes its derived one (``IndexLayout.without``). The arrays are rebuilt (a new epoch)."""
        self._writable()
        layout = self._need_layout()
        new = layout.without(attribute)
        with self._lock:
            versions = [v for (v,) in self._sql("SELECT DISTINCT model_version FROM docs")]
            self._sql("BEGIN")
            try:
                # DuckDB alters no table an index depends on: the row index goes and comes back
                self._sql(f"DROP INDEX IF EXISTS docs_{ROW_COLUMN}")
                self._sql(f"ALTER TABLE docs DROP COLUMN {emb_col(attribute)}")
                self._sql(ROW_INDEX_SQL)
                for v in versions:
                    self._sql("UPDATE docs SET model_version = ? WHERE model_version = ?",
                              [dropped_version(v or "", attribute), v])
                self._write_meta(new, layout.metadata_types)
                self._sql("COMMIT")
            except BaseException:
                self._sql("ROLLBACK")
                raise
            self.set_meta("cache_epoch", new_epoch())  # the arrays are numbered by attribute: rebuilt
            self._layout = self._read_layout()
            self._cache, self._ann, self._columns = None, None, None
            self._bump_generation()
        return {"store": self.url, "dropped": attribute, "documents": self.count(), "attributes": new.attributes,
                "model_version": new.model_version}

    @_store_errors
    def delete(self, ids: Iterable[str]) -> int:
        self._writable()
        self._need_layout()
        idl = [str(i) for i in ids]
        if not idl:
            return 0
        self._vectors()
        with self._lock:
            self.con.register("fg_ids", {"id": np.array(idl, dtype=object)})
            try:
                gone = self._sql(f"DELETE FROM docs WHERE id IN (SELECT id FROM fg_ids) RETURNING {ROW_COLUMN}")
            finally:
                self.con.unregister("fg_ids")
            rows = np.asarray([r[0] for r in gone], dtype=np.int64)
            self._alive[rows] = False
            if len(rows):
                columns = self._current_columns()
                self._bump_generation()
                self._keep_columns(columns)  # a deleted row is dead; the columns need no change
        return len(rows)

    # -- reading ----------------------------------------------------------------------------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        return self.con.cursor()  # one cursor per call: safe from several threads

    @_store_errors
    def get_vectors(
        self, ids: Iterable[str], attributes: Iterable[str] | None = None
    ) -> dict[str, dict[str, np.ndarray]]:
        layout = self._need_layout()
        attrs = layout.schema.check_names(attributes) if attributes is not None else layout.attributes
        idl = [str(i) for i in ids]
        if not idl:
            return {}
        cur = self._cursor()
        cur.register("fg_ids", {"id": np.array(idl, dtype=object)})
        cols = "".join(f", {emb_col(a)} AS e{j}" for j, a in enumerate(attrs))
        res = cur.execute(f"SELECT id{cols} FROM docs WHERE id IN (SELECT id FROM fg_ids)").fetchnumpy()
        cur.close()
        out: dict[str, dict[str, np.ndarray]] = {}
        for r, i in enumerate(res["id"]):
            out[str(i)] = {
                a: decode(sql_codes(res[f"e{j}"][r], layout.codec), layout.codec, layout.scale(a))
                for j, a in enumerate(attrs) if res[f"e{j}"][r] is not None and not np.ma.is_masked(res[f"e{j}"][r])
            }
        return out

    @_store_errors
    def exists(self, id_: str) -> bool:
        self._need_layout()
        return self._cursor().execute("SELECT count(*) FROM docs WHERE id = ?", [id_]).fetchall()[0][0] > 0

    @_store_errors
    def image_of(self, id_: str) -> str | None:
        """The image source recorded for a document (None if unknown)."""
        self._need_layout()
        rows = self._cursor().execute("SELECT image FROM docs WHERE id = ?", [id_]).fetchall()
        return rows[0][0] if rows else None

    @_store_errors
    def get_documents(self, ids: Sequence[str]) -> dict[str, Document]:
        """Full documents (vectors, metadata, version, image, fingerprint) for the ids that exist."""
        vecs = self.get_vectors(ids)
        meta = self._metadata(list(vecs))
        return {
            i: Document(i, vecs[i], meta[i][0], model_version=meta[i][1].model_version, image=meta[i][2],
                        image_key=meta[i][1].image_key, meta_key=meta[i][1].meta_key) for i in vecs
        }

    def _fingerprint_sql(self) -> str:
        return "model_version, image_key, meta_key" if self._fingerprint_columns() else \
            "model_version, NULL AS image_key, NULL AS meta_key"

    def _metadata(self, ids: list[str]) -> dict[str, tuple[dict[str, Any], Fingerprint, str | None]]:
        layout = self._need_layout()
        if not ids:
            return {}
        fields = list(layout.metadata_types)
        mcols = "".join(f", {meta_col(f)}" for f in fields)
        fp = self._fingerprint_sql()
        cur = self._cursor()
        cur.register("fg_ids", {"id": np.array(ids, dtype=object)})
        rows = cur.execute(
            f"SELECT id, image, {fp}{mcols} FROM docs WHERE id IN (SELECT id FROM fg_ids)"
        ).fetchall()
        cur.close()
        return {
            r[0]: (self._meta_dict(fields, r[5:]), Fingerprint(r[2], r[3], r[4]), r[1]) for r in rows
        }

    def _meta_dict(self, fields: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
        types = self._need_layout().metadata_types
        return {f: _from_sql(v, types[f]) for f, v in zip(fields, values) if v is not None}

    @_store_errors
    def versions(self) -> dict[str, str]:
        self._need_layout()
        return dict(self._cursor().execute("SELECT id, model_version FROM docs").fetchall())

    @_store_errors
    def fingerprints(self) -> dict[str, Fingerprint]:
        """id -> Fingerprint(model_version, image_key, meta_key); keys are None where unknown."""
        self._need_layout()
        rows = self._cursor().execute(f"SELECT id, {self._fingerprint_sql()} FROM docs").fetchall()
        return {r[0]: Fingerprint(r[1], r[2], r[3]) for r in rows}

    @_store_errors
    def count(self) -> int:
        if self.layout is None:
            return 0
        return int(self._cursor().execute("SELECT count(*) FROM docs").fetchall()[0][0])

    @_store_errors
    def stats(self) -> dict[str, Any]:
        """Document count, file size and layout, for reports and the bench."""
        layout = self._need_layout()
        self_size = self.path.stat().st_size if self.path.is_file() else 0
        return {
            "store": self.url,
            "documents": self.count(),
            "file_bytes": self_size,
            "attributes": layout.attributes,
            "dims": layout.dims,
            "metadata_types": layout.metadata_types,
            "model_version": layout.model_version,
            "query_slack": layout.query_slack,
            "codec": layout.codec,
            "int8_scales": layout.codec_meta()["scales"],
            # the derived arrays and ANN indexes, as allocated on disk (the array files are sparse past their rows)
            "cache_bytes": sum(f.stat().st_blocks * 512 for f in (self.directory / CACHE_DIR).glob("*") if f.is_file()),
        }

    # -- search -----------------------------------------------------------------------------------
    @_store_errors
    def search(self, spec: QuerySpec) -> SearchResult:
        """Top-k by the weighted sum of cosines (``spec.like_id`` or ``spec.vectors``): exact, or from ANN
        candidates rescored exactly (``spec.mode``); the plan that ran is in the result's ``note``.

        An image reference must be encoded first (``fgplugin.query.execute.resolve_reference``).
        """
        layout = self._need_layout()
        layout.refuse_dropped(spec.attributes, self.url)
        spec.validate(layout.schema, layout.dims)
        if spec.image is not None:
            raise QueryError("this store searches by id or vectors; encode the image first (fgplugin.query.execute)")
        filters = coerce_filters(spec.filters, layout.metadata_types)
        with self._lock:
            arrays = self._vectors()
            columns = self._doc_columns(arrays) if arrays is not None else None
        stored = self.get_vectors if arrays is None or columns is None else functools.partial(
            self._stored_vectors, arrays, columns)
        qv = reference_vectors(spec, stored, self.url)
        # int8 and binary: the query's own int8 codes, as OpenSearch scores byte vectors (fgplugin.codecs)
        queries = {a: scoring_query(layout.query_vector(a, qv[a]), layout.codec).astype(np.float32) for a in spec.attributes}
        if arrays is None or columns is None:
            where, params = compile_where(filters, layout.metadata_types)
            if spec.like_id is not None and spec.exclude_self:
                where, params = f"({where}) AND id <> ?", params + [spec.like_id]
            return self._search_sql(spec, layout, queries, where, params)
        return self._search_arrays(spec, arrays, columns, queries, filters)

    def _filter_mask(self, columns: DocColumns, filters: list[Filter], alive: np.ndarray) -> np.ndarray:
        """Per row: live and passing ``filters`` (a NumPy mask over the columns, or DuckDB for what needs SQL)."""
        mask = columns.mask(filters)
        out = np.zeros(len(alive), dtype=bool)
        if mask is not None:
            n = min(len(mask), len(alive))  # rows past the columns' end were never written by this process
            np.logical_and(mask[:n], alive[:n], out=out[:n])
            return out
        where, params = compile_where(filters, self._need_layout().metadata_types)
        res = self._cursor().execute(f"SELECT {ROW_COLUMN} FROM docs WHERE {where}", params).fetchnumpy()
        out[np.asarray(res[ROW_COLUMN], dtype=np.int64)] = True
        return out

    def _stored_vectors(self, arrays: VectorArrays, columns: DocColumns, ids: Sequence[str],
                        attributes: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        """``get_vectors`` answered from the arrays (no DuckDB round trip for a like-id query)."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for id_ in ids:
            r = columns.row_of(id_, self._alive)
            if r is not None:
                row = np.array([r], dtype=np.int64)
                out[id_] = {a: np.array(arrays.values(a, row)[0], dtype=np.float32) for a in attributes
                            if not arrays.missing(a, row)[0]}
        return out

    def _counted(self, columns: DocColumns, id_: str, passing: np.ndarray | None) -> int:
        """1 if document ``id_`` is among the ``passing`` rows (None: every live row), else 0."""
        r = columns.row_of(id_, self._alive)
        return 0 if r is None else 1 if passing is None else int(passing[r])

    def _search_arrays(self, spec: QuerySpec, arrays: VectorArrays, columns: DocColumns,
                       queries: dict[str, np.ndarray], filters: list[Filter]) -> SearchResult:
        attrs = list(spec.attributes)
        weights = [float(spec.attributes[a]) for a in attrs]
        alive = self._alive[: arrays.state.reserved]
        passing = self._filter_mask(columns, filters, alive) if filters else None
        live = int(np.count_nonzero(alive))
        total = live if passing is None else int(np.count_nonzero(passing))
        # The reference document never answers its own query: ask for one more and drop it by id.
        skip = spec.like_id if spec.like_id is not None and spec.exclude_self else None
        k = spec.k + (skip is not None)
        if skip is not None:
            total -= self._counted(columns, skip, passing)
        target, plan = self._plan(spec, arrays, attrs, total, live)
        rows = None if passing is None or target is not None else np.flatnonzero(passing)  # ANN takes the mask
        if target is None and arrays.scans_bits:  # binary: the bits' best candidates, rescored on the int8 codes
            window = max(BINARY_FACTOR * k, BINARY_WINDOW, total // BINARY_SHARE)
            cand = exact_candidates(arrays, attrs, weights, queries, rows, alive, window)
            plan = f"{plan}; scored on the sign bits, the best {window:,} rescored on the int8 codes"
        elif target is None:
            cand = exact_candidates(arrays, attrs, weights, queries, rows, alive, k)
        else:
            cand, plan = self._ann_candidates(spec, arrays, target, attrs, weights, queries, passing, alive,
                                              total, live)
        hits = [h for h in self._rescore(arrays, columns, attrs, weights, queries, cand, k) if h.id != skip][: spec.k]
        note = ""
        if spec.mode != "exact" and target is None:  # asked for ANN, ran exactly: say why
            note = NO_ANN_NOTE if self._ann is None else f"ran an exact search ({plan})"
        return SearchResult(hits=hits, mode="exact" if target is None else spec.mode, total_candidates=total,
                            note=note, plan=plan)

    exact_below = EXACT_BELOW  # per store object, so a test can make small stores use the index

    def _plan(self, spec: QuerySpec, arrays: VectorArrays, attrs: list[str], total: int,
              live: int) -> tuple[str | None, str]:
        """Which ANN index serves the query (None: exact), and the plan in words, for ``--explain``."""
        scan = (f"exact: NumPy scan of the vectors of {total:,} documents"
                f"{'' if total == live else ' (the rows the filters pass)'}")
        if spec.mode == "exact" or self._ann is None:
            return None, scan
        if total * len(attrs) <= self.exact_below:
            return None, f"{scan}; fewer than the ANN index pays off for ({self.exact_below:,} rows x attributes)"
        return ("mix" if len(attrs) > 1 else target_of(arrays.state.attributes, attrs[0])), ""

    def _ann_candidates(self, spec: QuerySpec, arrays: VectorArrays, target: str, attrs: list[str],
                        weights: list[float], queries: dict[str, np.ndarray], passing: np.ndarray | None,
                        alive: np.ndarray, total: int, live: int) -> tuple[np.ndarray, str]:
        """Rows from the ANN index of ``target`` among the live rows passing the filter (``passing``; None:
        no filter), and the plan. (A row without the attribute's vector holds zeros there: it may come back
        and is rescored as cosine -1.)"""
        assert self._ann is not None
        # no selector when every row may come back: faster
        allowed = passing if passing is not None or live == len(alive) else alive
        window = spec.k if spec.mode == "ann" else int(spec.rescore_window or default_window(spec.k, len(attrs)))
        share = total / max(1, live)
        if target == "mix":
            return self._mix_candidates(spec, arrays, attrs, weights, queries, allowed, share, window, total)
        query = queries[attrs[0]]
        if allowed is not None:
            # The lists the index would search, their passing rows scored exactly in NumPy: the same
            # candidates as faiss's search with a selector, without packing a bitmap of every row.
            got = self._ann.probe(target, query, share)
            rows = np.sort(got.rows[allowed[got.rows]])  # in row order: the gather reads memory forward
            score = exact_scores(arrays, attrs[:1], [1.0], queries, rows)
            cand = rows[best_rows(score, window, 0.0)]
            how = f"IVF ({got.how}) on attribute {attrs[0]}, its {len(rows):,} passing rows scored"
        else:
            got = self._ann.search(target, query, window)
            cand, how = got.rows, f"{got.how} on attribute {attrs[0]}"
        return cand, f"{spec.mode}: {how}; {len(cand)} candidates among {total:,} documents rescored exactly"

    def _mix_candidates(self, spec: QuerySpec, arrays: VectorArrays, attrs: list[str], weights: list[float],
                        queries: dict[str, np.ndarray], allowed: np.ndarray | None, share: float, window: int,
                        total: int) -> tuple[np.ndarray, str]:
        """Candidates of a mix: each weighted attribute's IVF probes the lists nearest its query; a row gains
        ``w_a`` x (how far its list's centre beats the last list probed) for every attribute that reached
        it, and the rows with the most gain are rescored exactly. (Measured at 1M clustered items, 2 and 4
        attributes, with and without a 20 % filter: 500 candidates held the exact top 20 in every query.)"""
        assert self._ann is not None
        want = max(MIX_CANDIDATES, 5 * window)
        gain = np.zeros(arrays.state.reserved, np.float32)
        reached, how = [], ""
        for a, w in zip(attrs, weights):
            if w <= 0:
                continue  # a negative weight pushes rows down: it cannot point at the best ones
            got = self._ann.probe(target_of(arrays.state.attributes, a), queries[a], share)
            r, c = got.rows, got.scores
            if allowed is not None:
                keep = allowed[r]
                r, c = r[keep], c[keep]
            if len(r):
                gain[r] += np.float32(w) * (c - c.min() + np.float32(1e-3))
            reached.append(r)
            how = got.how
        rows = np.concatenate(reached) if reached else np.zeros(0, np.int64)
        if len(rows) > want:
            rows = rows[np.argpartition(-gain[rows], want - 1)[:want]]
        cand = np.unique(rows)
        note = (f"{spec.mode}: IVF lists of each weighted attribute ({how}), rows ranked by their lists' weighted "
                f"centre scores; {len(cand)} candidates among {total:,} documents rescored exactly")
        return cand, note

    def _rescore(self, arrays: VectorArrays, columns: DocColumns, attrs: list[str], weights: list[float],
                 queries: dict[str, np.ndarray], cand: np.ndarray, k: int) -> list[Hit]:
        """Exact scores (float64) of the live candidate rows, ordered by score descending then id; the top ``k``."""
        cand = np.unique(cand)
        cand = cand[self._alive[cand]]
        score = np.zeros(len(cand))
        cos: dict[str, np.ndarray] = {}
        for a, w in zip(attrs, weights):
            c = arrays.values(a, cand).astype(np.float64) @ queries[a].astype(np.float64)
            c[arrays.missing(a, cand)] = np.nan
            cos[a] = c
            score += w * np.where(np.isnan(c), MISSING_COSINE, c)
        if len(cand) > 4 * k:  # many candidates (binary's window): sort only the best k and their exact ties
            sel = best_rows(score, k, 0.0)
            cand, score, cos = cand[sel], score[sel], {a: c[sel] for a, c in cos.items()}
        ids = columns.ids[cand]
        order = sorted(range(len(cand)), key=lambda j: (-score[j], ids[j]))[:k]
        fields = list(columns.columns)
        return [Hit(id=ids[j], score=float(score[j]),
                    cosines={a: float(cos[a][j]) for a in attrs if not np.isnan(cos[a][j])},
                    metadata=self._meta_dict(fields, columns.values(int(cand[j]))), image=columns.images[int(cand[j])])
                for j in order]

    def _search_sql(self, spec: QuerySpec, layout: IndexLayout, queries: dict[str, np.ndarray], where: str,
                    params: list[Any]) -> SearchResult:
        """Exact search in SQL, for a store of an older fgplugin (no ``fg_row``) open read-only."""
        attrs = list(spec.attributes)
        cos_sql, cos_params = [], []
        for j, a in enumerate(attrs):
            cos_sql.append(f"array_inner_product({emb_col(a)}, ?::FLOAT[{layout.dims[a]}]) AS c{j}")
            cos_params.append(queries[a].tolist())
        score_sql = " + ".join(f"?::DOUBLE * COALESCE(c{j}, {MISSING_COSINE!r})" for j in range(len(attrs)))
        score_params = [float(spec.attributes[a]) for a in attrs]
        fields = list(layout.metadata_types)
        mcols = "".join(f", {meta_col(f)} AS m{i}" for i, f in enumerate(fields))
        sql = (
            f"SELECT id, {score_sql} AS score, {', '.join(f'c{j}' for j in range(len(attrs)))}, image"
            f"{''.join(f', m{i}' for i in range(len(fields)))} "
            f"FROM (SELECT id, image{mcols}, {', '.join(cos_sql)} FROM docs WHERE {where}) "
            f"ORDER BY score DESC, id ASC LIMIT {int(spec.k)}"
        )
        cur = self._cursor()
        try:
            rows = cur.execute(sql, score_params + cos_params + params).fetchall()
            total = int(cur.execute(f"SELECT count(*) FROM docs WHERE {where}", params).fetchall()[0][0])
        finally:
            cur.close()
        hits = []
        for r in rows:
            cos = {a: float(r[2 + j]) for j, a in enumerate(attrs) if r[2 + j] is not None}
            base = 2 + len(attrs)
            hits.append(Hit(id=r[0], score=float(r[1]), cosines=cos,
                            metadata=self._meta_dict(fields, r[base + 1:]), image=r[base]))
        note = NO_ANN_NOTE if spec.mode != "exact" else ""
        return SearchResult(hits=hits, mode="exact", total_candidates=total, note=note)

    @_store_errors
    def browse(self, prefix: str | None = None, offset: int = 0, limit: int = 50) -> list[Document]:
        """Documents by id ascending (ids starting with ``prefix``), without vectors (``Store.browse``)."""
        layout = self.check_listing(offset, limit)
        fields = list(layout.metadata_types)
        mcols = "".join(f", {meta_col(f)}" for f in fields)
        where, params = ("WHERE starts_with(id, ?)", [prefix]) if prefix else ("", [])
        rows = self._cursor().execute(f"SELECT id, image{mcols} FROM docs {where} ORDER BY id LIMIT ? OFFSET ?",
                                      params + [int(limit), int(offset)]).fetchall()
        return [Document(r[0], {}, self._meta_dict(fields, r[2:]), image=r[1]) for r in rows]

    @_store_errors
    def keyword_values(self, field_: str, limit: int = 100) -> list[tuple[str, int]]:
        """Values of a keyword field by document count, most frequent first (``Store.keyword_values``)."""
        self.check_listing(0, limit, field_)
        col = meta_col(field_)
        rows = self._cursor().execute(f"SELECT {col}, count(*) AS n FROM docs WHERE {col} IS NOT NULL "
                                      f"GROUP BY {col} ORDER BY n DESC, {col} LIMIT ?", [int(limit)]).fetchall()
        return [(str(v), int(n)) for v, n in rows]

    @_store_errors
    def verify(self) -> dict[str, Any]:
        """Read every value of every column (DuckDB checks each block's checksum as it reads it): a damaged
        file raises StoreError naming it; a sound one answers {"documents": n, "ok": True}. A full scan:
        about as long as reading the file once."""
        tables = [r[0] for r in self._cursor().execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()]
        for t in tables:
            self._cursor().execute(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM {_q(t)}").fetchall()
        layout = self.layout if "docs" in tables else None
        return {"store": self.url, "documents": self.count() if "docs" in tables else 0, "ok": True,
                "codec": layout.codec if layout is not None else None}

    def close(self) -> None:
        self._save_ann()
        try:
            self.con.close()
        except duckdb.Error:
            pass

    def default_errors_path(self) -> Path:
        return self.directory / ERRORS_FILE


# -- exact scoring on the arrays -------------------------------------------------------------------
SCAN_CHUNK = 16_384  # filtered rows gathered per step (their vectors stay in cache while scored)
# Gathering a row costs several times streaming it (measured on 2 cores, 1M rows of 64-d: 200k rows
# gathered 22 ms, all 1M streamed 12-16 ms), so a filter passing more than this share is scored by a
# full scan, then selected.
GATHER_BELOW = 0.15


def exact_scores(arrays: VectorArrays, attrs: list[str], weights: list[float], queries: dict[str, np.ndarray],
                 rows: np.ndarray | None) -> np.ndarray:
    """float32 weighted sums of cosines for ``rows`` (every reserved row when None); a missing vector
    counts MISSING_COSINE. Reads only those rows' vectors, unless they are most of the store."""
    if rows is not None and len(rows) > GATHER_BELOW * arrays.state.reserved:
        return exact_scores(arrays, attrs, weights, queries, None)[rows]
    n = arrays.state.reserved if rows is None else len(rows)
    out = np.zeros(n, np.float32)
    step = n if rows is None else SCAN_CHUNK
    for lo in range(0, n, max(1, step)):
        hi = min(n, lo + step)
        part = None if rows is None else rows[lo:hi]
        for a, w in zip(attrs, weights):
            # the codec's cosines (fgplugin.codecs; einsum's own loop for float codes, not BLAS)
            out[lo:hi] += np.float32(w) * arrays.cosines(a, part, queries[a])[: hi - lo]
            missing = arrays.missing(a, part)
            if missing.any():  # a zero vector scored 0: count MISSING_COSINE instead
                out[lo:hi][missing[: hi - lo]] += np.float32(w * MISSING_COSINE)
    return out


def exact_candidates(arrays: VectorArrays, attrs: list[str], weights: list[float], queries: dict[str, np.ndarray],
                     rows: np.ndarray | None, alive: np.ndarray, k: int) -> np.ndarray:
    """The rows that can be in the exact top ``k``: the best k by float32 score and every row within
    TIE_MARGIN of the k-th (their float64 rescoring and the id decide the order)."""
    score = exact_scores(arrays, attrs, weights, queries, rows)
    if rows is None and not alive[: len(score)].all():
        score[~alive[: len(score)]] = -np.inf
    sel = best_rows(score, k, TIE_MARGIN * max(1.0, sum(weights)))
    sel = sel[np.isfinite(score[sel])]
    return sel.astype(np.int64) if rows is None else rows[sel]


SAMPLE_STRIDE = 64  # best_rows: one score in this many gives the first threshold


def best_rows(score: np.ndarray, k: int, margin: float) -> np.ndarray:
    """Indices of the ``k`` best scores and of every score within ``margin`` of the k-th. Over many
    scores a strided sample gives a threshold first, so that the partition runs on a few hundred
    (a full argpartition of 1M scores took 18 ms); if fewer than k pass it, all are partitioned."""
    n = len(score)
    if n <= k:
        return np.arange(n)
    idx = None
    if n >= 1000 * SAMPLE_STRIDE // 2:
        sample = score[::SAMPLE_STRIDE]
        m = min(len(sample), 4 * k // SAMPLE_STRIDE + 4)
        t = np.partition(sample, len(sample) - m)[len(sample) - m]
        idx = np.flatnonzero(score >= t - margin)
        if len(idx) < k:
            idx = None
    if idx is None:
        idx = np.arange(n)
    sub = score[idx]
    kth = sub[np.argpartition(-sub, k - 1)[:k]].min()
    return idx[sub >= kth - margin]


def default_window(k: int, n_attributes: int) -> int:
    """ann+rescore's candidates when the query does not say: 5k, at least 100 (rescoring 100 rows costs
    well under a millisecond; recall on the clustered bench set: see tests/test_embedded_ann.py)."""
    return max(5 * k, 100)


# -- filters -> SQL -------------------------------------------------------------------------------
def compile_where(filters: Sequence[Filter], types: Mapping[str, str]) -> tuple[str, list[Any]]:
    """A parameterised WHERE clause (two-valued: never NULL) for typed filters; all top-level filters AND."""
    params: list[Any] = []
    sql = _and([_compile(f, types, params) for f in filters])
    return sql, params


def _and(parts: list[str]) -> str:
    return "(" + " AND ".join(parts) + ")" if parts else "TRUE"


def _or(parts: list[str]) -> str:
    return "(" + " OR ".join(parts) + ")" if parts else "FALSE"


def _value(v: Any, t: str) -> Any:
    return to_utc(v) if t == "date" else v


def _compile(f: Filter, types: Mapping[str, str], params: list[Any]) -> str:
    if isinstance(f, Bool):
        parts = [_compile(x, types, params) for x in f.must]
        if f.should:
            parts.append(_or([_compile(x, types, params) for x in f.should]))
        if f.must_not:
            parts.append("NOT " + _or([_compile(x, types, params) for x in f.must_not]))
        return _and(parts)
    if f.field not in types:
        raise QueryError(f"filter on unknown field {f.field!r}; filterable fields: {', '.join(sorted(types)) or '(none)'}")
    t = types[f.field]
    col = meta_col(f.field)
    if isinstance(f, Exists):
        return f"({col} IS NOT NULL)"
    if t == "text":
        # A term on an analysed text field matches one lower-cased token (OpenSearch's standard
        # analyser splits on non-alphanumerics); approximate that here.
        col = f"regexp_split_to_array(lower({col}), '[^[:alnum:]]+')"
        if isinstance(f, Term):
            params.append(str(f.value))
            return f"COALESCE(list_contains({col}, ?), FALSE)"
        if isinstance(f, Terms):
            params.extend(str(v) for v in f.values)
            return f"COALESCE(list_has_any({col}, [{', '.join('?' for _ in f.values)}]), FALSE)"
        raise QueryError(f"range filter on text field {f.field!r} is not supported")
    if isinstance(f, Term):
        params.append(_value(f.value, t))
        return f"COALESCE({col} = ?, FALSE)"
    if isinstance(f, Terms):
        params.extend(_value(v, t) for v in f.values)
        return f"COALESCE({col} IN ({', '.join('?' for _ in f.values)}), FALSE)"
    if isinstance(f, Range):
        parts = []
        for op, v in ((">", f.gt), (">=", f.gte), ("<", f.lt), ("<=", f.lte)):
            if v is not None:
                params.append(_value(v, t))
                parts.append(f"{col} {op} ?")
        return f"COALESCE({' AND '.join(parts)}, FALSE)"
    raise QueryError(f"unsupported filter {f!r}")
