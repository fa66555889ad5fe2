"""Approximate nearest-neighbour indexes of the embedded store (faiss IVF, inner product), derived
from the row-aligned vector arrays (``fgplugin.search.vectors``) and stored beside them.

One IVF index per attribute (target ``a<i>``, k-means lists): a one-attribute query searches its own
(HNSW measured recall@20 0.51-0.77 at 1M clustered items, its graph splitting between clusters), and a
mix probes the lists of each weighted attribute (``probe``; the store ranks the rows they reach). An
HNSW over the concatenation of all attributes served mixes before: its build took over 30 minutes at 1M
on 2 cores, and the probed lists find the same top 20 (bench/RESULTS.md, "Scale").

Indexes are built from the decoded vectors (``VectorArrays.values``); a store of another codec than float32
keeps its IVF lists as faiss scalar codes (fp16 for float16, 8-bit otherwise: a quarter of IVFFlat's bytes),
whose candidates are rescored on the store's own codes like any others.

Rows are written once (see ``vectors``), so an index only ever grows: it is brought up to date by
adding the rows it lacks, dead rows included (the store drops them, and the rows its filter does
not pass, from what ``probe`` returns). Each index file has a sidecar with the
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

ADD_CHUNK = 50_000  # rows added per faiss call
RETRAIN_GROWTH = 8  # an IVF index is retrained once the rows grew this many times past its training


def load_faiss() -> Any:
    """The faiss module, or None where faiss-cpu is not installed (the store then searches exactly)."""
    try:
        import faiss  # optional heavy dependency: the exact search works without it
    except ImportError:
        return None
    return faiss


def target_of(attributes: list[str], attribute: str) -> str:
    """The index of ``attribute`` (one per attribute, by its place in the layout)."""
    return f"a{attributes.index(attribute)}"


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
    """The IVF indexes of one store, loaded, built or caught up on first use."""

    def __init__(self, faiss: Any, directory: Path, arrays: VectorArrays, epoch: str):
        self.faiss, self.directory, self.arrays, self.epoch = faiss, directory, arrays, epoch
        self._indexes: dict[str, Any] = {}
        self._dirty: set[str] = set()
        self._trained: dict[str, int] = {}  # IVF: how many rows the lists were trained on
        self._members: dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}  # IVF: (ntotal, centres, offsets, rows)

    def _dim(self, target: str) -> int:
        return self.arrays.state.dims[int(target[1:])]

    def _files(self, target: str) -> tuple[Path, Path]:
        return self.directory / f"ann_{target}.faiss", self.directory / f"ann_{target}.json"

    def _load(self, target: str) -> Any:
        """The stored index of this epoch, or a new empty one."""
        f, side = self._files(target)
        try:
            meta = json.loads(side.read_text())
            if meta.get("epoch") == self.epoch and meta.get("kind") == "ivf" and f.is_file():
                index = self.faiss.read_index(str(f))
                if index.d == self._dim(target) and index.ntotal <= self.arrays.state.reserved:
                    self._trained[target] = int(meta.get("trained", 0))
                    return index
        except (OSError, ValueError, RuntimeError):
            pass  # missing or damaged: rebuilt below
        return self._new(target)

    def _new(self, target: str) -> Any:
        """An empty IVF index, its lists trained on a sample of the attribute's rows."""
        self._dirty.add(target)
        n = max(1, self.arrays.state.reserved)
        lists = ivf_lists(n)
        dim, codec = self._dim(target), self.arrays.state.codec
        if codec == "float32":
            index = self.faiss.IndexIVFFlat(self.faiss.IndexFlatIP(dim), dim, lists, self.faiss.METRIC_INNER_PRODUCT)
        else:  # a compact store keeps compact lists (fp16 or 8-bit scalar codes); its candidates are rescored anyway
            qt = self.faiss.ScalarQuantizer.QT_fp16 if codec == "float16" else self.faiss.ScalarQuantizer.QT_8bit
            index = self.faiss.IndexIVFScalarQuantizer(self.faiss.IndexFlatIP(dim), dim, lists, qt,
                                                       self.faiss.METRIC_INNER_PRODUCT, False)
        index.cp.min_points_per_centroid = 1  # a small store trains on what it has, without a warning on stderr
        step = max(1, n // (64 * lists))
        sample = self._rows(target, 0, self.arrays.state.reserved)[::step] if n > 1 else np.zeros((1, self._dim(target)), np.float32)
        index.train(np.ascontiguousarray(sample))
        self._trained[target] = n
        return index

    def _rows(self, target: str, start: int, stop: int) -> np.ndarray:
        rows = np.arange(start, stop)
        return np.ascontiguousarray(self.arrays.values(self.arrays.state.attributes[int(target[1:])], rows))

    def index(self, target: str) -> Any:
        """The index of ``target`` holding every reserved row (adding the rows it lacks)."""
        index = self._indexes.get(target)
        if index is None:
            index = self._indexes[target] = self._load(target)
        if self.arrays.state.reserved > RETRAIN_GROWTH * max(1, self._trained.get(target, 0)):
            index = self._indexes[target] = self._new(target)  # grown far past its lists: train afresh
        have, want = int(index.ntotal), self.arrays.state.reserved
        for s in range(have, want, ADD_CHUNK):
            index.add(self._rows(target, s, min(want, s + ADD_CHUNK)))
            self._dirty.add(target)
        return index

    def forget(self, target: str) -> None:
        """Drop the index of ``target`` (its rows were rewritten in place: an attribute added to a live index),
        in memory and on disk; the next query builds it afresh from the arrays."""
        for held in (self._indexes, self._trained, self._members):
            held.pop(target, None)
        self._dirty.discard(target)
        for f in self._files(target):
            f.unlink(missing_ok=True)

    def search(self, target: str, query: np.ndarray, k: int) -> AnnHits:
        """The best ``k`` rows by inner product with ``query`` (any row: a filtered query, or one on a store
        with dead rows, takes ``probe``'s rows and filters them itself)."""
        index = self.index(target)
        probes = ivf_probes(int(index.nlist), 1.0)
        params = self.faiss.SearchParametersIVF(nprobe=probes)
        scores, rows = index.search(np.ascontiguousarray(query[None, :], dtype=np.float32), int(k), params=params)
        keep = rows[0] >= 0
        return AnnHits(rows[0][keep].astype(np.int64), scores[0][keep], f"IVF ({probes} of {int(index.nlist)} lists)")

    def probe(self, target: str, query: np.ndarray, share: float = 1.0) -> AnnHits:
        """The rows of the IVF lists of attribute index ``target`` nearest to ``query`` (as many lists as a
        search probes for a filter passing ``share``), each scored with its list's centroid score (the
        inner product of ``query`` with the list's k-means centre)."""
        index = self.index(target)
        centres, offsets, members = self._lists(target, index)
        probes = ivf_probes(int(index.nlist), share)
        # the nearest centres by a NumPy product: faiss's own quantizer search starts OpenMP threads,
        # which cost more than the product for one query (measured ~1.4 ms vs ~0.05 ms on 2 busy cores)
        score = centres @ np.asarray(query, dtype=np.float32)
        lists = np.argpartition(-score, probes - 1)[:probes] if probes < len(score) else np.arange(len(score))
        lists = lists[np.argsort(-score[lists])]
        scores = score[lists]
        sizes = offsets[lists + 1] - offsets[lists]
        rows = np.concatenate([members[offsets[i]:offsets[i + 1]] for i in lists]) if len(lists) else members[:0]
        return AnnHits(rows, np.repeat(scores, sizes), f"{probes} of {int(index.nlist)} lists")

    def _lists(self, target: str, index: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The IVF lists' centres and members as NumPy arrays (centres, offsets, rows), read once per index size."""
        got = self._members.get(target)
        if got is None or got[0] != index.ntotal:
            inv = index.invlists
            sizes = np.array([inv.list_size(i) for i in range(index.nlist)], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            members = np.empty(int(offsets[-1]), dtype=np.int64)
            for i in range(index.nlist):
                if sizes[i]:
                    ids = inv.get_ids(i)
                    members[offsets[i]:offsets[i + 1]] = self.faiss.rev_swig_ptr(ids, int(sizes[i]))
                    inv.release_ids(i, ids)
            centres = self.faiss.rev_swig_ptr(self.faiss.downcast_index(index.quantizer).get_xb(),
                                              int(index.nlist) * int(index.d)).reshape(int(index.nlist), int(index.d)).copy()
            got = self._members[target] = (int(index.ntotal), centres, offsets, members)
        return got[1], got[2], got[3]

    def save(self) -> None:
        """Write the indexes that changed (the index first, then its sidecar: a crash leaves a stale sidecar
        or an index the next open catches up)."""
        for target in sorted(self._dirty & set(self._indexes)):
            f, side = self._files(target)
            tmp = f.with_name(f.name + ".tmp")
            self.faiss.write_index(self._indexes[target], str(tmp))
            os.replace(tmp, f)
            side.write_text(json.dumps({"epoch": self.epoch, "kind": "ivf", "ntotal": int(self._indexes[target].ntotal),
                                        "trained": self._trained.get(target, 0)}))
        self._dirty.clear()
