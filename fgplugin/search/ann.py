"""Approximate nearest-neighbour indexes of the embedded store (faiss HNSW, inner product), derived
from the row-aligned vector arrays (``fgplugin.search.vectors``) and stored beside them.

Two kinds of target: one IVF index per attribute (``a<i>``, k-means lists; HNSW measured recall@20
0.51-0.77 at 1M clustered items, its graph splitting between clusters), which serves one-attribute
queries, and one HNSW over the concatenation of every attribute (``all``), which serves mixes: a query puts ``w_a * q_a`` in
the chosen attributes' parts and zeros elsewhere, so the inner product is the weighted sum (a missing
vector counts 0 here instead of -1; the exact rescoring puts that right).

Rows are written once (see ``vectors``), so an index only ever grows: it is brought up to date by
adding the rows it lacks, dead rows included (the search excludes them with an ``IDSelectorBitmap``
of the live rows, which also carries the query's filter). Each index file has a sidecar with the
cache epoch; a file of another epoch, or one that does not load, is rebuilt from the arrays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .vectors import VectorArrays

HNSW_M = 24  # graph degree
EF_CONSTRUCTION = 80
ADD_CHUNK = 50_000  # rows added per faiss call
RETRAIN_GROWTH = 8  # an IVF index is retrained once the rows grew this many times past its training


def load_faiss() -> Any:
    """The faiss module, or None where faiss-cpu is not installed (the store then searches exactly)."""
    try:
        import faiss  # optional heavy dependency: the exact search works without it
    except ImportError:
        return None
    return faiss


def target_of(attributes: list[str], chosen: list[str]) -> str:
    """Which index serves a query on ``chosen``: the attribute's own for one, the concatenation for a mix."""
    return f"a{attributes.index(chosen[0])}" if len(chosen) == 1 else "all"


@dataclass
class AnnHits:
    rows: np.ndarray  # int64, best first
    scores: np.ndarray  # the index's inner products (float32)
    how: str = ""  # the index and its search parameters, for the plan


def ivf_lists(rows: int) -> int:
    """k-means lists for an IVF index over ``rows`` vectors (sqrt rule; training stays seconds at 1M)."""
    return int(min(4096, max(1, round(rows ** 0.5))))


def ivf_probes(lists: int, share: float) -> int:
    """Lists searched: 1/32 of them, at least 16, more when a filter passes only ``share`` of the rows."""
    return int(min(lists, max(16, lists // 32) / max(share, 0.05) ** 0.5))


class AnnIndexes:
    """The HNSW indexes of one store, loaded, built or caught up on first use."""

    def __init__(self, faiss: Any, directory: Path, arrays: VectorArrays, epoch: str):
        self.faiss, self.directory, self.arrays, self.epoch = faiss, directory, arrays, epoch
        self._indexes: dict[str, Any] = {}
        self._dirty: set[str] = set()
        self._trained: dict[str, int] = {}  # IVF: how many rows the lists were trained on

    def _dim(self, target: str) -> int:
        dims = self.arrays.state.dims
        return sum(dims) if target == "all" else dims[int(target[1:])]

    @staticmethod
    def _kind(target: str) -> str:
        return "hnsw" if target == "all" else "ivf"

    def _files(self, target: str) -> tuple[Path, Path]:
        return self.directory / f"ann_{target}.faiss", self.directory / f"ann_{target}.json"

    def _load(self, target: str) -> Any:
        """The stored index of this epoch, or a new empty one."""
        f, side = self._files(target)
        try:
            meta = json.loads(side.read_text())
            if meta.get("epoch") == self.epoch and meta.get("kind") == self._kind(target) and f.is_file():
                index = self.faiss.read_index(str(f))
                if index.d == self._dim(target) and index.ntotal <= self.arrays.state.reserved:
                    self._trained[target] = int(meta.get("trained", 0))
                    return index
        except (OSError, ValueError, RuntimeError):
            pass  # missing or damaged: rebuilt below
        return self._new(target)

    def _new(self, target: str) -> Any:
        """An empty index: HNSW for the concatenation, IVF trained on a sample of the rows for an attribute."""
        self._dirty.add(target)
        if target == "all":
            index = self.faiss.IndexHNSWFlat(self._dim(target), HNSW_M, self.faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = EF_CONSTRUCTION
            return index
        n = max(1, self.arrays.state.reserved)
        lists = ivf_lists(n)
        index = self.faiss.IndexIVFFlat(self.faiss.IndexFlatIP(self._dim(target)), self._dim(target), lists,
                                        self.faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # a small store trains on what it has, without a warning on stderr
        step = max(1, n // (64 * lists))
        sample = self._rows(target, 0, self.arrays.state.reserved)[::step] if n > 1 else np.zeros((1, self._dim(target)), np.float32)
        index.train(np.ascontiguousarray(sample))
        self._trained[target] = n
        return index

    def _rows(self, target: str, start: int, stop: int) -> np.ndarray:
        rows = np.arange(start, stop)
        if target == "all":
            return np.ascontiguousarray(np.concatenate(
                [self.arrays.rows_of(a, rows) for a in self.arrays.state.attributes], axis=1))
        return np.ascontiguousarray(self.arrays.rows_of(self.arrays.state.attributes[int(target[1:])], rows))

    def index(self, target: str) -> Any:
        """The index of ``target`` holding every reserved row (adding the rows it lacks)."""
        index = self._indexes.get(target)
        if index is None:
            index = self._indexes[target] = self._load(target)
        if target != "all" and self.arrays.state.reserved > RETRAIN_GROWTH * max(1, self._trained.get(target, 0)):
            index = self._indexes[target] = self._new(target)  # grown far past its lists: train afresh
        have, want = int(index.ntotal), self.arrays.state.reserved
        for s in range(have, want, ADD_CHUNK):
            index.add(self._rows(target, s, min(want, s + ADD_CHUNK)))
            self._dirty.add(target)
        return index

    def search(self, target: str, query: np.ndarray, k: int, ef: int, allowed: np.ndarray | None,
               share: float = 1.0) -> AnnHits:
        """The best ``k`` rows among ``allowed`` (bool per reserved row; None: all) by inner product with
        ``query``; ``share``: the part of the live rows allowed (a filter's selectivity)."""
        index = self.index(target)
        selector = None
        if allowed is not None:
            bitmap = np.packbits(allowed[: index.ntotal], bitorder="little")
            selector = self.faiss.IDSelectorBitmap(int(index.ntotal), self.faiss.swig_ptr(bitmap))
        if target == "all":
            params = self.faiss.SearchParametersHNSW(sel=selector, efSearch=int(max(ef, k)))
            how = f"HNSW over all attributes (weighted query), efSearch {int(max(ef, k))}"
        else:
            probes = ivf_probes(int(index.nlist), share)
            params = self.faiss.SearchParametersIVF(sel=selector, nprobe=probes)
            how = f"IVF ({probes} of {int(index.nlist)} lists)"
        scores, rows = index.search(np.ascontiguousarray(query[None, :], dtype=np.float32), int(k), params=params)
        keep = rows[0] >= 0
        return AnnHits(rows[0][keep].astype(np.int64), scores[0][keep], how)

    def save(self) -> None:
        """Write the indexes that changed (the index first, then its sidecar: a crash leaves a stale sidecar
        or an index the next open catches up)."""
        for target in sorted(self._dirty & set(self._indexes)):
            f, side = self._files(target)
            tmp = f.with_name(f.name + ".tmp")
            self.faiss.write_index(self._indexes[target], str(tmp))
            os.replace(tmp, f)
            side.write_text(json.dumps({"epoch": self.epoch, "kind": self._kind(target), "ntotal": int(self._indexes[target].ntotal),
                                        "trained": self._trained.get(target, 0),
                                        "M": HNSW_M, "efConstruction": EF_CONSTRUCTION}))
        self._dirty.clear()
