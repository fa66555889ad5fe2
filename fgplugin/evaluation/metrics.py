"""Retrieval metrics as in the ASEN / ASEN_v2 papers: per-attribute MAP, exact chance MAP, triplet
accuracy, ROI IoU. Arrays in (numpy or torch), numbers out; no model, catalog or device here.

Protocol (the papers' reference code):

- An evaluation part (valid or test) is split into queries and candidates (1:4, see splits.py).
- For each attribute, every query with a visible value is ranked against every candidate that has a
  visible value for that attribute, by cosine similarity of that attribute's embeddings. A candidate
  is relevant when it has the query's value. AP is taken over the full ranking.
- Per-attribute MAP is the mean AP over that attribute's queries. The overall MAP is weighted by each
  attribute's number of queries ("overall_weighted", what the reference code reports); the plain mean
  over attributes is "overall_mean".

Choices worth knowing:

- Ties in similarity are broken pessimistically: among equal scores, non-relevant candidates rank
  first. A model cannot gain from ties, and a collapsed model (all vectors equal) scores at or below
  chance instead of benefiting from the candidate order.
- A query whose value no candidate shares has no defined AP; it is left out and counted in
  ``n_skipped`` (the reference code never meets this case: its parts are large).
- Chance MAP is exact: the expected AP of a uniformly random ranking of N candidates with R relevant
  is ``H_N / N + (R - 1)(N - H_N) / (N (N - 1))`` (H_N the N-th harmonic number), averaged the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

# Rank at most this many query x candidate scores at once (bounds memory on large catalogs).
_MAX_SCORES_PER_CHUNK = 8_000_000


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _attr_names(n: int, attribute_names: Sequence[str] | None) -> list[str]:
    if attribute_names is None:
        return [str(i) for i in range(n)]
    names = list(attribute_names)
    if len(names) != n:
        raise ValueError(f"{len(names)} attribute names for {n} attributes")
    return names


def _check_shapes(query_vecs, query_labels, cand_vecs, cand_labels) -> None:
    if query_vecs.ndim != 3 or cand_vecs.ndim != 3:
        raise ValueError(f"vectors must be [N, A, D]; got {tuple(query_vecs.shape)} and {tuple(cand_vecs.shape)}")
    if query_labels.shape != query_vecs.shape[:2]:
        raise ValueError(f"query labels {tuple(query_labels.shape)} do not match vectors {tuple(query_vecs.shape)}")
    if cand_labels.shape != cand_vecs.shape[:2]:
        raise ValueError(f"candidate labels {tuple(cand_labels.shape)} do not match vectors {tuple(cand_vecs.shape)}")
    if query_vecs.shape[1:] != cand_vecs.shape[1:]:
        raise ValueError(f"query vectors {tuple(query_vecs.shape)} and candidates {tuple(cand_vecs.shape)} differ")


def average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """AP of each row: ``scores`` float [Q, C], ``relevant`` bool [Q, C] -> float64 [Q] (NaN if no relevant).

    Pessimistic ties: a stable sort by relevance (non-relevant first) and then a stable sort by
    descending score keeps non-relevant candidates ahead of relevant ones with the same score.
    """
    rel = relevant.to(torch.float64)
    pre = torch.argsort(rel, dim=1, stable=True)
    s = torch.gather(scores, 1, pre)
    order = torch.gather(pre, 1, torch.argsort(s, dim=1, descending=True, stable=True))
    rel_sorted = torch.gather(rel, 1, order)
    hits = torch.cumsum(rel_sorted, dim=1)
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    n_rel = rel.sum(dim=1)
    ap = (hits / ranks * rel_sorted).sum(dim=1) / n_rel
    return torch.where(n_rel > 0, ap, torch.full_like(ap, float("nan")))


def _weighted(per: dict[str, float], counts: dict[str, int]) -> tuple[float, float]:
    used = [k for k in per if counts[k] > 0 and per[k] == per[k]]
    if not used:
        return float("nan"), float("nan")
    total = sum(counts[k] for k in used)
    weighted = sum(per[k] * counts[k] for k in used) / total
    mean = sum(per[k] for k in used) / len(used)
    return float(weighted), float(mean)


def retrieval_map(
    query_vecs: Any,
    query_labels: Any,
    cand_vecs: Any,
    cand_labels: Any,
    *,
    attribute_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-attribute retrieval MAP (see the module docstring for the protocol).

    ``*_vecs`` float [N, A, D] (each attribute's vector L2-normalised), ``*_labels`` int [N, A] with -1
    for missing / not visible; numpy arrays or tensors. Returns::

        {"per_attribute": {name: MAP}, "overall_weighted": float, "overall_mean": float,
         "n_queries": {name: int}, "n_candidates": {name: int}, "n_skipped": {name: int}}

    An attribute with no usable query has MAP NaN and is left out of both overall figures.
    """
    qv, cv = _as_tensor(query_vecs, torch.float32), _as_tensor(cand_vecs, torch.float32)
    ql, cl = _as_tensor(query_labels, torch.int64), _as_tensor(cand_labels, torch.int64)
    _check_shapes(qv, ql, cv, cl)
    names = _attr_names(qv.shape[1], attribute_names)
    per: dict[str, float] = {}
    n_q: dict[str, int] = {}
    n_c: dict[str, int] = {}
    n_skip: dict[str, int] = {}
    for a, name in enumerate(names):
        qmask, cmask = ql[:, a] >= 0, cl[:, a] >= 0
        q, c = qv[qmask, a], cv[cmask, a]
        qlab, clab = ql[qmask, a], cl[cmask, a]
        n_c[name] = int(c.shape[0])
        aps: list[torch.Tensor] = []
        if q.shape[0] and c.shape[0]:
            step = max(1, _MAX_SCORES_PER_CHUNK // c.shape[0])
            for s in range(0, q.shape[0], step):
                scores = q[s:s + step] @ c.T
                aps.append(average_precision(scores, qlab[s:s + step, None] == clab[None, :]))
        ap = torch.cat(aps) if aps else torch.zeros(0, dtype=torch.float64)
        valid = ~torch.isnan(ap)
        n_q[name] = int(valid.sum())
        n_skip[name] = int(qmask.sum()) - n_q[name]
        per[name] = float(ap[valid].mean()) if n_q[name] else float("nan")
    weighted, mean = _weighted(per, n_q)
    return {
        "per_attribute": per,
        "overall_weighted": weighted,
        "overall_mean": mean,
        "n_queries": n_q,
        "n_candidates": n_c,
        "n_skipped": n_skip,
    }


def expected_random_ap(n_candidates: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Exact expected AP of a uniformly random ranking (see module docstring); NaN where R == 0."""
    n = np.asarray(n_candidates, dtype=np.float64)
    r = np.asarray(n_relevant, dtype=np.float64)
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(k) + 1)) for k in np.atleast_1d(n)]).reshape(n.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        second = np.where(n > 1, (r - 1) * (n - harmonic) / (n * (n - 1)), 0.0)
        out = harmonic / n + second
    return np.where(r > 0, out, np.nan)


def chance_map(
    query_labels: Any, cand_labels: Any, *, attribute_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Expected MAP of a random ranking, computed exactly, with the same query selection and weighting
    as :func:`retrieval_map`. Returns ``{"per_attribute", "overall_weighted", "overall_mean"}``."""
    ql, cl = np.asarray(query_labels, dtype=np.int64), np.asarray(cand_labels, dtype=np.int64)
    if ql.ndim != 2 or cl.ndim != 2 or ql.shape[1] != cl.shape[1]:
        raise ValueError(f"labels must be [N, A] with the same A; got {ql.shape} and {cl.shape}")
    names = _attr_names(ql.shape[1], attribute_names)
    per: dict[str, float] = {}
    counts: dict[str, int] = {}
    for a, name in enumerate(names):
        q = ql[ql[:, a] >= 0, a]
        c = cl[cl[:, a] >= 0, a]
        vals, freq = np.unique(c, return_counts=True)
        r = np.zeros(len(q), dtype=np.int64)
        if len(vals):
            pos = np.clip(np.searchsorted(vals, q), 0, len(vals) - 1)
            r = np.where(vals[pos] == q, freq[pos], 0)
        ap = expected_random_ap(np.full(len(q), len(c)), r) if len(q) else np.zeros(0)
        ok = ~np.isnan(ap)
        counts[name] = int(ok.sum())
        per[name] = float(ap[ok].mean()) if counts[name] else float("nan")
    weighted, mean = _weighted(per, counts)
    return {"per_attribute": per, "overall_weighted": weighted, "overall_mean": mean}


def triplet_accuracy(
    vecs: Any, triplets: Any, *, attribute_names: Sequence[str] | None = None, anchor_vecs: Any = None
) -> dict[str, Any]:
    """Fraction of triplets (attr, anchor, positive, negative) with cos(a, p) > cos(a, n), strictly
    (a tie counts as wrong). ``vecs`` float [N, A, D]; rows index ``vecs``. ``anchor_vecs`` (same
    shape; default ``vecs``): what the anchor scores with, its query form (``fgplugin.similarity``).
    Returns ``{"overall": float, "per_attribute": {name: float}, "n": {name: int}}``."""
    v = _as_tensor(vecs, torch.float32)
    t = _as_tensor(triplets, torch.int64)
    if v.ndim != 3 or t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"need vecs [N, A, D] and triplets [T, 4]; got {tuple(v.shape)}, {tuple(t.shape)}")
    names = _attr_names(v.shape[1], attribute_names)
    v = torch.nn.functional.normalize(v, dim=-1)
    q = v if anchor_vecs is None else torch.nn.functional.normalize(_as_tensor(anchor_vecs, torch.float32), dim=-1)
    if q.shape != v.shape:
        raise ValueError(f"anchor_vecs {tuple(q.shape)} must have the shape of vecs {tuple(v.shape)}")
    attr, anc, pos, neg = t.unbind(1)
    va, vp, vn = q[anc, attr], v[pos, attr], v[neg, attr]
    correct = (va * vp).sum(-1) > (va * vn).sum(-1)
    per: dict[str, float] = {}
    n: dict[str, int] = {}
    for a, name in enumerate(names):
        m = attr == a
        n[name] = int(m.sum())
        if n[name]:
            per[name] = float(correct[m].float().mean())
    overall = float(correct.float().mean()) if len(correct) else float("nan")
    return {"overall": overall, "per_attribute": per, "n": n}


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of boxes (x0, y0, x1, y1) [N, 4] -> [N]; an inverted box has area 0."""
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def roi_iou(pred_boxes: Any, gt_boxes: Any) -> np.ndarray:
    """Element-wise IoU of boxes (x0, y0, x1, y1): [N, 4] and [N, 4] -> float [N]."""
    p = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if p.shape != g.shape:
        raise ValueError(f"box arrays differ in shape: {p.shape} vs {g.shape}")
    iw = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    ih = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = iw * ih
    union = box_area(p) + box_area(g) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
