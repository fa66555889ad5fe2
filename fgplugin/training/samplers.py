"""Triplet batches for training, reproducible per step (so a resumed run sees the same batches).

The protocol is the papers' (and :func:`fgplugin.splits.sample_triplets`'): a triplet picks an
attribute, an anchor and a positive that share a visible value, and a negative with another visible
value of that attribute; unknown / not-visible labels (-1) never take part. Groups are indexed once
here, so drawing a batch costs O(batch) however large the catalog.

Modes:

- ``balanced`` (the papers' sampler): attribute uniformly, then the positive value uniformly among
  values with two or more items, the negative value uniformly among the others, items uniformly
  within each value. Rare values are seen as often as common ones (class-balanced).
- ``natural``: attribute uniformly, then the anchor uniformly among that attribute's labelled items
  (values with two or more items), so values appear as often as they do in the catalog.
"""

from __future__ import annotations

import numpy as np

from ..errors import FgpluginError


class TripletSampler:
    """``batch(step)`` -> int64 [batch_size, 4]: (attribute, anchor row, positive row, negative row)."""

    def __init__(self, labels: np.ndarray, batch_size: int, *, seed: int = 0, mode: str = "balanced",
                 attributes: list[int] | None = None):
        if mode not in ("balanced", "natural"):
            raise FgpluginError(f"unknown sampling mode {mode!r}; use balanced or natural")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mode = mode
        cand = range(self.labels.shape[1]) if attributes is None else attributes
        self.groups: dict[int, dict[int, np.ndarray]] = {}
        for a in cand:
            col = self.labels[:, a]
            by_val = {int(v): np.flatnonzero(col == v) for v in np.unique(col[col >= 0])}
            if len(by_val) >= 2 and any(len(r) >= 2 for r in by_val.values()):
                self.groups[a] = by_val
        if not self.groups:
            raise FgpluginError(
                "no attribute has two visible values with enough training items to form triplets "
                "(each needs a value with two or more items and a second value)"
            )
        self.attributes = np.array(sorted(self.groups), dtype=np.int64)
        # Per attribute: values usable as anchor/positive, and (natural mode) their pooled rows.
        self._pos_vals = {a: [v for v, r in g.items() if len(r) >= 2] for a, g in self.groups.items()}
        self._anchor_pool = {a: np.concatenate([g[v] for v in self._pos_vals[a]]) for a, g in self.groups.items()}
        self._value_of = {a: self.labels[:, a] for a in self.groups}

    @property
    def skipped_attributes(self) -> list[int]:
        """Attributes that cannot form triplets (too few labelled items)."""
        return [a for a in range(self.labels.shape[1]) if a not in self.groups]

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step)])
        out = np.empty((self.batch_size, 4), dtype=np.int64)
        for i in range(self.batch_size):
            a = int(self.attributes[rng.integers(len(self.attributes))])
            g = self.groups[a]
            if self.mode == "balanced":
                v = self._pos_vals[a][rng.integers(len(self._pos_vals[a]))]
                anc, pos = rng.choice(g[v], size=2, replace=False)
            else:
                anc = self._anchor_pool[a][rng.integers(len(self._anchor_pool[a]))]
                v = int(self._value_of[a][anc])
                rows = g[v]
                pos = rows[rng.integers(len(rows) - 1)]
                if pos == anc:  # draw among the others: the last row stands in for the anchor's slot
                    pos = rows[-1]
            others = [u for u in g if u != v]
            u = others[rng.integers(len(others))]
            neg = g[u][rng.integers(len(g[u]))]
            out[i] = (a, anc, pos, neg)
        return out


__all__ = ["TripletSampler"]
