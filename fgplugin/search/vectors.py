"""Row-aligned vector arrays beside the embedded store: a derived cache of the DuckDB file's vectors.

Each document has a row number (``fg_row`` in DuckDB). Attribute ``i`` of the layout keeps its
vectors' codes (``fgplugin.codecs``) in ``<i>.f32``, ``<i>.f16`` or ``<i>.i8`` (row r at bytes ``r*d*size``),
a binary store also their sign bits in ``<i>.b1`` (the scan reads those, the int8 codes rescore), every codec
but float32 the inverse norm of each row's codes in ``norms.f32`` (queries score cosines with the decoded vectors), and ``present.u8`` says per row and
attribute whether the document has that vector (a missing one scores as cosine -1). Rows are written
once: a document whose vectors change gets a new row and its old row becomes dead (no DuckDB row
points at it), so a row's contents never change after it is written. That makes the cache safe to
keep across crashes: rows are reserved in ``state.json`` and written (and flushed) before the DuckDB
transaction that points documents at them commits; a crash in between leaves only dead rows, which
no query returns and no later write reuses.

``state.json`` carries the cache's epoch, which must equal the ``cache_epoch`` recorded in DuckDB;
any mismatch, a missing or short file means the cache is rebuilt from DuckDB (the source of truth).
The files are memory-mapped: the operating system's page cache holds them, so a scan reads RAM.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..codecs import bit_bytes, bit_cosines, bit_tables, bits, code_dtype, inverse_norms, normalised, stored_codec

CACHE_DIR = "fgplugin.cache"
STATE_FILE = "state.json"
DECODE_ROWS = 8_192  # float16 / int8 rows converted to float32 per step of a scan (fits in L2 at 64-d)
GROW_ROWS = 65_536  # files grow by at least this many rows (and by half their size), not per batch


def new_epoch() -> str:
    return secrets.token_hex(8)


@dataclass
class CacheState:
    epoch: str
    attributes: list[str]
    dims: list[int]
    reserved: int  # rows below this may have been written (committed or dead); never reused
    capacity: int  # rows the files have room for
    codec: str = "float32"

    def to_json(self) -> str:
        return json.dumps({"epoch": self.epoch, "attributes": self.attributes, "dims": self.dims,
                           "reserved": self.reserved, "capacity": self.capacity, "codec": self.codec})

    def files(self) -> list[tuple[str, int]]:
        """(file name, bytes per row) of every array of this codec."""
        ext = {"float32": "f32", "float16": "f16", "int8": "i8"}[stored_codec(self.codec)]
        size = code_dtype(self.codec).itemsize
        out = [(f"{i}.{ext}", d * size) for i, d in enumerate(self.dims)]
        if self.codec == "binary":
            out += [(f"{i}.b1", bit_bytes(d)) for i, d in enumerate(self.dims)]
        if normalised(self.codec):
            out.append(("norms.f32", 4 * len(self.dims)))
        return out + [("present.u8", len(self.dims))]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class VectorArrays:
    """The memory-mapped arrays of one store; open with ``open_valid`` or ``create``."""

    def __init__(self, directory: Path, state: CacheState, writable: bool):
        self.directory = directory
        self.state = state
        self.writable = writable
        self._map()

    # -- opening --------------------------------------------------------------------------------------
    @classmethod
    def open_valid(cls, directory: Path, epoch: str, attributes: Sequence[str], dims: Mapping[str, int],
                   writable: bool, codec: str = "float32") -> "VectorArrays | None":
        """The cache in ``directory`` if it belongs to ``epoch`` and the layout and its files are whole; else None."""
        try:
            raw = json.loads((directory / STATE_FILE).read_text())
            state = CacheState(str(raw["epoch"]), list(raw["attributes"]), [int(d) for d in raw["dims"]],
                               int(raw["reserved"]), int(raw["capacity"]), str(raw.get("codec", "float32")))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # by name: an attribute added in place has the next file number whatever its place in the layout
        if state.epoch != epoch or sorted(state.attributes) != sorted(attributes) or state.codec != codec or \
                state.dims != [int(dims[a]) for a in state.attributes] or not 0 <= state.reserved <= state.capacity:
            return None
        for name, width in state.files():
            f = directory / name
            if not f.is_file() or f.stat().st_size != state.capacity * width:
                return None
        return cls(directory, state, writable)

    @classmethod
    def create(cls, directory: Path, epoch: str, attributes: Sequence[str], dims: Mapping[str, int],
               capacity: int, codec: str = "float32") -> "VectorArrays":
        """Fresh, empty files (any old cache in ``directory`` is replaced)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATE_FILE).unlink(missing_ok=True)  # invalid until the files are whole
        for old in directory.glob("*.[fib][0-9]*"):  # arrays of another codec (a rebuilt store)
            old.unlink(missing_ok=True)
        state = CacheState(epoch, list(attributes), [int(dims[a]) for a in attributes], 0, max(1, capacity), codec)
        for name, width in state.files():
            cls._sized(directory / name, state.capacity * width, fresh=True)
        _write_atomic(directory / STATE_FILE, state.to_json())
        return cls(directory, state, True)

    @staticmethod
    def _sized(path: Path, size: int, fresh: bool = False) -> None:
        with open(path, "wb" if fresh else "r+b") as f:
            f.truncate(size)  # sparse zeros

    def _map(self) -> None:
        mode = "r+" if self.writable else "r"
        cap, n = self.state.capacity, len(self.state.dims)
        files = self.state.files()
        dtype = code_dtype(self.state.codec)
        self.vectors = [np.memmap(self.directory / files[i][0], dtype, mode, shape=(cap, d))
                        for i, d in enumerate(self.state.dims)]
        self.bits = [np.memmap(self.directory / files[n + i][0], np.uint8, mode, shape=(cap, bit_bytes(d)))
                     for i, d in enumerate(self.state.dims)] if self.state.codec == "binary" else []
        self.norms = np.memmap(self.directory / "norms.f32", np.float32, mode, shape=(cap, n)) \
            if normalised(self.state.codec) else None
        self.present = np.memmap(self.directory / "present.u8", np.uint8, mode, shape=(cap, n))

    def reload(self) -> bool:
        """Re-read ``state.json`` (another store object of this process may have grown the files); False if gone."""
        again = VectorArrays.open_valid(self.directory, self.state.epoch, self.state.attributes,
                                        dict(zip(self.state.attributes, self.state.dims)), self.writable, self.state.codec)
        if again is None:
            return False
        self.state, self.vectors, self.present = again.state, again.vectors, again.present
        self.bits, self.norms = again.bits, again.norms
        return True

    # -- writing --------------------------------------------------------------------------------------
    def reserve(self, upto: int) -> None:
        """Make rows below ``upto`` writable and record them as possibly written (before writing them)."""
        if upto <= self.state.reserved:
            return
        if upto > self.state.capacity:
            cap = max(upto, self.state.capacity + max(GROW_ROWS, self.state.capacity // 2))
            self.flush()
            for name, width in self.state.files():
                self._sized(self.directory / name, cap * width)
            self.state.capacity = cap
        self.state.reserved = upto
        _write_atomic(self.directory / STATE_FILE, self.state.to_json())
        if self.vectors[0].shape[0] != self.state.capacity:
            self._map()

    def write(self, rows: np.ndarray, attribute_index: int, codes: np.ndarray, present: np.ndarray) -> None:
        """The codes (``fgplugin.codecs.encode``) of one attribute at ``rows`` (reserved, never written
        before); ``present`` per row. Bits and norms are derived here."""
        codes = np.asarray(codes, dtype=code_dtype(self.state.codec))
        self.vectors[attribute_index][rows] = codes
        if self.bits:
            self.bits[attribute_index][rows] = bits(codes)
        if self.norms is not None:
            self.norms[rows, attribute_index] = inverse_norms(codes)
        self.present[rows, attribute_index] = present.astype(np.uint8)

    def flush(self) -> None:
        for v in [*self.vectors, *self.bits]:
            v.flush()
        if self.norms is not None:
            self.norms.flush()
        self.present.flush()

    # -- an attribute added in place (fgplugin train --extend) ---------------------------------------------
    def add_attributes(self, names: Sequence[str], dims: Sequence[int]) -> None:
        """Files for new attributes (empty: every row missing them), numbered after the others; the per-row
        files of every attribute (``present``, ``norms``) are copied one column wider. ``state.json`` is
        gone meanwhile, so a crash leaves a cache the store rebuilds."""
        self.flush()
        old = self.state
        new = CacheState(old.epoch, [*old.attributes, *names], [*old.dims, *map(int, dims)], old.reserved,
                         old.capacity, old.codec)
        (self.directory / STATE_FILE).unlink(missing_ok=True)
        widths = dict(new.files())
        for name, width in new.files():
            f = self.directory / name
            if name in ("present.u8", "norms.f32"):
                dtype = np.uint8 if name == "present.u8" else np.float32
                n_old, n_new = len(old.dims), len(new.dims)
                tmp = f.with_name(name + ".tmp")
                self._sized(tmp, new.capacity * widths[name], fresh=True)
                wide = np.memmap(tmp, dtype, "r+", shape=(new.capacity, n_new))
                wide[:, :n_old] = np.memmap(f, dtype, "r", shape=(old.capacity, n_old))
                wide.flush()
                del wide
                os.replace(tmp, f)
            elif not any(name == n for n, _ in old.files()):
                self._sized(f, new.capacity * width, fresh=True)
        _write_atomic(self.directory / STATE_FILE, new.to_json())
        self.state = new
        self._map()

    def overwrite(self, rows: np.ndarray, attribute_index: int, codes: np.ndarray) -> None:
        """Codes of an attribute added in place, into rows already written (inside ``rewriting``)."""
        self.write(rows, attribute_index, codes, np.ones(len(rows), bool))

    def rewriting(self) -> "_Rewriting":
        """A context in which rows already written may change (``overwrite``): ``state.json`` names no epoch
        until it ends, so a crash meanwhile makes the store rebuild the cache from DuckDB."""
        return _Rewriting(self)

    # -- reading --------------------------------------------------------------------------------------
    def index_of(self, attribute: str) -> int:
        return self.state.attributes.index(attribute)

    def rows_of(self, attribute: str, rows: np.ndarray | None) -> np.ndarray:
        """The stored codes [len(rows), d] (all reserved rows when ``rows`` is None, a view without a copy)."""
        v = self.vectors[self.index_of(attribute)]
        # np.take on a plain ndarray view: fancy indexing a np.memmap costs several times more per row
        return v[: self.state.reserved] if rows is None else np.take(np.asarray(v), rows, axis=0)

    def values(self, attribute: str, rows: np.ndarray | None) -> np.ndarray:
        """float32 [len(rows), d]: the vectors queries score against (decoded and normalised but for float32: see
        ``fgplugin.codecs``)."""
        x = self.rows_of(attribute, rows)
        if self.norms is None:
            return np.asarray(x, dtype=np.float32)
        inv = self.norms[: self.state.reserved, self.index_of(attribute)] if rows is None else \
            self.norms[rows, self.index_of(attribute)]
        return x.astype(np.float32) * inv[:, None]

    @property
    def scans_bits(self) -> bool:
        """Whether ``cosines`` scores the sign bits (binary): candidates, to be rescored on ``values``."""
        return bool(self.bits)

    def cosines(self, attribute: str, rows: np.ndarray | None, query: np.ndarray) -> np.ndarray:
        """float32 cosine of the unit ``query`` with each row's codes: on the decoded values (float32,
        float16), the normalised int8 codes (int8), or the decoded sign bits (binary: a candidate score)."""
        i = self.index_of(attribute)
        if self.bits:
            b = self.bits[i]
            return bit_cosines(b[: self.state.reserved] if rows is None else b[rows], bit_tables(query))
        x = self.rows_of(attribute, rows)
        q = np.asarray(query, dtype=np.float32)
        # einsum's own loop, not BLAS: OpenBLAS threads spin on a busy machine (a 20k-row product took 7 ms)
        if x.dtype == np.float32:
            c = np.einsum("ij,j->i", x, q)
        else:  # NumPy has no half or int8 kernel: convert a cache-sized block at a time (4x faster than all at once)
            c = np.empty(len(x), np.float32)
            for lo in range(0, len(x), DECODE_ROWS):
                c[lo:lo + DECODE_ROWS] = np.einsum("ij,j->i", x[lo:lo + DECODE_ROWS].astype(np.float32), q)
        if self.norms is not None:
            c *= self.norms[: self.state.reserved, i] if rows is None else self.norms[rows, i]
        return c

    def missing(self, attribute: str, rows: np.ndarray | None) -> np.ndarray:
        """bool per row: the document has no vector for ``attribute`` there."""
        p = self.present[: self.state.reserved, self.index_of(attribute)] if rows is None else \
            self.present[rows, self.index_of(attribute)]
        return p == 0


class _Rewriting:
    def __init__(self, arrays: VectorArrays):
        self.arrays = arrays

    def __enter__(self) -> VectorArrays:
        state = json.loads(self.arrays.state.to_json())
        _write_atomic(self.arrays.directory / STATE_FILE, json.dumps({**state, "epoch": ""}))
        return self.arrays

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:  # left invalid after a failure: rebuilt on next open
            self.arrays.flush()
            _write_atomic(self.arrays.directory / STATE_FILE, self.arrays.state.to_json())
