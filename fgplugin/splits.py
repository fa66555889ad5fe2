"""Train/valid/test splits with query/candidate partitions, and triplet sampling, as in the papers.

- Splits are fixed by seed and written next to the catalog (``splits.json``).
- Evaluation parts are divided into queries and candidates 1:4 (ASEN / ASEN_v2 protocol).
- A triplet picks an attribute, two different visible values; anchor and positive share one value,
  the negative has the other. "Not visible" and missing labels never take part.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import FgpluginError


@dataclass
class Splits:
    seed: int
    train: list[str]
    valid_query: list[str]
    valid_candidate: list[str]
    test_query: list[str]
    test_candidate: list[str]

    def part(self, name: str) -> tuple[list[str], list[str]]:
        """(query ids, candidate ids) of ``valid`` or ``test``."""
        if name == "valid":
            return self.valid_query, self.valid_candidate
        if name == "test":
            return self.test_query, self.test_candidate
        raise FgpluginError(f"unknown split part {name!r}; use valid or test")

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> "Splits":
        p = Path(path)
        if not p.is_file():
            raise FgpluginError(f"{p}: splits file not found (run `fgplugin data split`)")
        return cls(**json.loads(p.read_text(encoding="utf-8")))


def make_splits(
    ids: list[str],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    query_fraction: float = 0.2,
) -> Splits:
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise FgpluginError(f"split fractions {fractions} must be non-negative and sum to 1")
    if len(set(ids)) != len(ids):
        raise FgpluginError("split ids must be unique")
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    train, valid, test = order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:]

    def qc(part: list[str]) -> tuple[list[str], list[str]]:
        nq = int(round(query_fraction * len(part)))
        return part[:nq], part[nq:]

    vq, vc = qc(valid)
    tq, tc = qc(test)
    return Splits(seed, train, vq, vc, tq, tc)


def sample_triplets(labels: np.ndarray, n: int, *, seed: int = 0, attributes: list[int] | None = None) -> np.ndarray:
    """Sample ``n`` triplets from a label matrix (int [N, A], -1 = missing/not visible).

    Returns int64 [n, 4]: (attribute index, anchor row, positive row, negative row). The attribute is
    drawn uniformly among those with at least two visible values that have two or more items each
    (anchor and positive must differ).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    cand = list(range(labels.shape[1])) if attributes is None else list(attributes)
    groups: dict[int, dict[int, np.ndarray]] = {}
    for a in cand:
        col = labels[:, a]
        by_val = {int(v): np.flatnonzero(col == v) for v in np.unique(col[col >= 0])}
        pos_vals = [v for v, rows in by_val.items() if len(rows) >= 2]
        if pos_vals and len(by_val) >= 2:
            groups[a] = by_val
    if not groups:
        raise FgpluginError("no attribute has two visible values with enough items to form triplets")
    attrs = np.array(sorted(groups))
    out = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        a = int(attrs[rng.integers(len(attrs))])
        by_val = groups[a]
        pos_vals = [v for v, rows in by_val.items() if len(rows) >= 2]
        v = pos_vals[rng.integers(len(pos_vals))]
        others = [u for u in by_val if u != v]
        u = others[rng.integers(len(others))]
        anc, pos = rng.choice(by_val[v], size=2, replace=False)
        neg = rng.choice(by_val[u])
        out[i] = (a, anc, pos, neg)
    return out
