"""Row-aligned vector arrays beside the embedded store: a derived cache of the DuckDB file's vectors.

Each document has a row number (``fg_row`` in DuckDB). Attribute ``i`` of the layout keeps its
float32 vectors in ``<i>.f32`` (row r at bytes ``r*d*4``), and ``present.u8`` says per row and
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

CACHE_DIR = "fgplugin.cache"
STATE_FILE = "state.json"
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

    def to_json(self) -> str:
        return json.dumps({"epoch": self.epoch, "attributes": self.attributes, "dims": self.dims,
                           "reserved": self.reserved, "capacity": self.capacity})


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
                   writable: bool) -> "VectorArrays | None":
        """The cache in ``directory`` if it belongs to ``epoch`` and the layout and its files are whole; else None."""
        try:
            raw = json.loads((directory / STATE_FILE).read_text())
            state = CacheState(str(raw["epoch"]), list(raw["attributes"]), [int(d) for d in raw["dims"]],
                               int(raw["reserved"]), int(raw["capacity"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if state.epoch != epoch or state.attributes != list(attributes) or \
                state.dims != [int(dims[a]) for a in attributes] or not 0 <= state.reserved <= state.capacity:
            return None
        for i, d in enumerate(state.dims):
            f = directory / f"{i}.f32"
            if not f.is_file() or f.stat().st_size != state.capacity * d * 4:
                return None
        p = directory / "present.u8"
        if not p.is_file() or p.stat().st_size != state.capacity * len(state.dims):
            return None
        return cls(directory, state, writable)

    @classmethod
    def create(cls, directory: Path, epoch: str, attributes: Sequence[str], dims: Mapping[str, int],
               capacity: int) -> "VectorArrays":
        """Fresh, empty files (any old cache in ``directory`` is replaced)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATE_FILE).unlink(missing_ok=True)  # invalid until the files are whole
        state = CacheState(epoch, list(attributes), [int(dims[a]) for a in attributes], 0, max(1, capacity))
        for i, d in enumerate(state.dims):
            cls._sized(directory / f"{i}.f32", state.capacity * d * 4, fresh=True)
        cls._sized(directory / "present.u8", state.capacity * len(state.dims), fresh=True)
        _write_atomic(directory / STATE_FILE, state.to_json())
        return cls(directory, state, True)

    @staticmethod
    def _sized(path: Path, size: int, fresh: bool = False) -> None:
        with open(path, "wb" if fresh else "r+b") as f:
            f.truncate(size)  # sparse zeros

    def _map(self) -> None:
        mode = "r+" if self.writable else "r"
        cap = self.state.capacity
        self.vectors = [np.memmap(self.directory / f"{i}.f32", np.float32, mode, shape=(cap, d))
                        for i, d in enumerate(self.state.dims)]
        self.present = np.memmap(self.directory / "present.u8", np.uint8, mode, shape=(cap, len(self.state.dims)))

    def reload(self) -> bool:
        """Re-read ``state.json`` (another store object of this process may have grown the files); False if gone."""
        again = VectorArrays.open_valid(self.directory, self.state.epoch, self.state.attributes,
                                        dict(zip(self.state.attributes, self.state.dims)), self.writable)
        if again is None:
            return False
        self.state, self.vectors, self.present = again.state, again.vectors, again.present
        return True

    # -- writing --------------------------------------------------------------------------------------
    def reserve(self, upto: int) -> None:
        """Make rows below ``upto`` writable and record them as possibly written (before writing them)."""
        if upto <= self.state.reserved:
            return
        if upto > self.state.capacity:
            cap = max(upto, self.state.capacity + max(GROW_ROWS, self.state.capacity // 2))
            for v in self.vectors:
                v.flush()
            for i, d in enumerate(self.state.dims):
                self._sized(self.directory / f"{i}.f32", cap * d * 4)
            self._sized(self.directory / "present.u8", cap * len(self.state.dims))
            self.state.capacity = cap
        self.state.reserved = upto
        _write_atomic(self.directory / STATE_FILE, self.state.to_json())
        if self.vectors[0].shape[0] != self.state.capacity:
            self._map()

    def write(self, rows: np.ndarray, attribute_index: int, vectors: np.ndarray, present: np.ndarray) -> None:
        """Vectors of one attribute at ``rows`` (reserved, never written before); ``present`` per row."""
        self.vectors[attribute_index][rows] = vectors
        self.present[rows, attribute_index] = present.astype(np.uint8)

    def flush(self) -> None:
        for v in self.vectors:
            v.flush()
        self.present.flush()

    # -- reading --------------------------------------------------------------------------------------
    def index_of(self, attribute: str) -> int:
        return self.state.attributes.index(attribute)

    def rows_of(self, attribute: str, rows: np.ndarray | None) -> np.ndarray:
        """float32 [len(rows), d] (all reserved rows when ``rows`` is None, a view without a copy)."""
        v = self.vectors[self.index_of(attribute)]
        return v[: self.state.reserved] if rows is None else v[rows]

    def missing(self, attribute: str, rows: np.ndarray | None) -> np.ndarray:
        """bool per row: the document has no vector for ``attribute`` there."""
        p = self.present[: self.state.reserved, self.index_of(attribute)] if rows is None else \
            self.present[rows, self.index_of(attribute)]
        return p == 0
