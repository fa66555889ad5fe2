"""Evaluation as in the ASEN / ASEN_v2 papers: per-attribute retrieval MAP, triplet accuracy, ROI IoU.

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

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .similarity import query_form_padded

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


def roi_iou(pred_boxes: Any, gt_boxes: Any) -> np.ndarray:
    """Element-wise IoU of boxes (x0, y0, x1, y1): [N, 4] and [N, 4] -> float [N]."""
    p = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if p.shape != g.shape:
        raise ValueError(f"box arrays differ in shape: {p.shape} vs {g.shape}")
    iw = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    ih = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = iw * ih
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    union = area(p) + area(g) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# -- model-level evaluation ------------------------------------------------------------------------
def _preprocess_of(model: Any):
    from .preprocess import Preprocess

    pre = getattr(model, "preprocess", None)
    if isinstance(pre, Preprocess):  # ExportedEncoder
        return pre
    if callable(pre):  # AttributeModel.preprocess()
        return pre()
    raise TypeError(f"{type(model).__name__} has no preprocess; pass an AttributeModel or ExportedEncoder")


def query_vectors(model: Any, vecs: torch.Tensor) -> torch.Tensor:
    """What ``model``'s (AttributeModel or ExportedEncoder) queries score with, from its vectors
    [N, A, D]: the same vectors, or with posterior = prob the slack value dropped (fgplugin.similarity)."""
    if not getattr(model, "query_slack", False):
        return vecs
    return query_form_padded(vecs, [model.dims[n] for n in model.schema.names], True)


def _model_device(model: Any, device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _EvalMode:
    """Put an nn.Module in eval mode on a device, and restore its training flag afterwards."""

    def __init__(self, model: Any, device: torch.device):
        self.model, self.device = model, device
        self.is_module = isinstance(model, torch.nn.Module)

    def __enter__(self):
        if self.is_module:
            self.was_training = self.model.training
            self.model.to(self.device).eval()
        return self

    def __exit__(self, *exc):
        if self.is_module and self.was_training:
            self.model.train()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=True,
    )


def encode_catalog(
    model: Any,
    catalog: Any,
    ids: Sequence[str],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    workers: int = 0,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Every attribute's vector for items ``ids``: float32 [N, A, D] on CPU.

    ``model`` is an AttributeModel (``embed_all``; put in eval mode, restored after) or an
    ExportedEncoder. ``timings``, if given, receives ``total_s`` (decode + preprocess + forward)
    and ``forward_s`` (model calls only).
    """
    from torch.utils.data import DataLoader

    from .dataset import CatalogImages

    pre = _preprocess_of(model)
    dev = _model_device(model, device) if isinstance(model, torch.nn.Module) else getattr(model, "device", "cpu")
    data = CatalogImages(catalog, list(ids), pre.transform())
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    out: list[torch.Tensor] = []
    fwd = 0.0
    t0 = time.perf_counter()
    with _EvalMode(model, dev), torch.no_grad(), _progress(progress) as bar:
        task = bar.add_task("encoding", total=len(data))
        for x, _ in loader:
            t = time.perf_counter()
            v = model.embed_all(x.to(dev))
            if v.is_cuda:
                torch.cuda.synchronize()
            fwd += time.perf_counter() - t
            out.append(v.float().cpu())
            bar.advance(task, len(x))
    if timings is not None:
        timings["total_s"] = time.perf_counter() - t0
        timings["forward_s"] = fwd
    if not out:
        raise ValueError("no items to encode")
    return torch.cat(out)


def roi_metrics(
    model: Any,
    catalog: Any,
    ids: Sequence[str],
    boxes: dict[str, dict[str, Any]],
    *,
    device: str | torch.device | None = "cpu",
    batch_size: int = 32,
    max_items: int = 256,
) -> dict[str, Any] | None:
    """How well each attribute's attention finds its ground-truth region (generated data).

    For up to ``max_items`` items per attribute that have a ground-truth box: IoU between the
    model's ROI box and the box, and whether the attention map's peak falls inside it. Boxes are
    in catalog-image pixels and are scaled to the model input (the preprocessing squashes the image
    to S x S). Reference: ``box_area_fraction`` (box area / image area) is both the IoU of a
    whole-image "ROI" (a model that does not localise) and the chance a random peak lands in the box.
    Returns None when the model gives neither maps nor boxes (no attention).
    """
    from .images import load_image

    if not hasattr(model, "attention"):
        return None
    pre = _preprocess_of(model)
    dev = _model_device(model, device)
    size = pre.image_size
    lookup = catalog.by_id()
    per: dict[str, dict[str, Any]] = {}
    all_iou: list[np.ndarray] = []
    all_peak: list[np.ndarray] = []
    has_attention = False
    with _EvalMode(model, dev), torch.no_grad():
        for a, name in enumerate(catalog.schema.names):
            sel = [i for i in ids if (boxes.get(i) or {}).get(name) is not None][:max_items]
            ious, peaks, area = [], [], []
            for s in range(0, len(sel), batch_size):
                chunk = sel[s:s + batch_size]
                imgs = [load_image(lookup[i].image, base_dir=catalog.base_dir) for i in chunk]
                gt = np.array([boxes[i][name] for i in chunk], dtype=np.float64)
                wh = np.array([im.size for im in imgs], dtype=np.float64)
                gt = gt * np.concatenate([size / wh, size / wh], axis=1)
                x = pre.batch(imgs).to(dev)
                maps, pred = model.attention(x, torch.full((len(chunk),), a, dtype=torch.long, device=dev))
                area.append(np.clip(gt[:, 2] - gt[:, 0], 0, None) * np.clip(gt[:, 3] - gt[:, 1], 0, None) / size**2)
                if pred is not None:
                    ious.append(roi_iou(pred.float().cpu().numpy(), gt))
                if maps is not None:
                    m = maps.float().cpu()
                    h, w = m.shape[-2:]
                    flat = m.reshape(len(chunk), -1).argmax(1).numpy()
                    py, px = (flat // w + 0.5) * size / h, (flat % w + 0.5) * size / w
                    peaks.append((px >= gt[:, 0]) & (px <= gt[:, 2]) & (py >= gt[:, 1]) & (py <= gt[:, 3]))
            if not sel:
                continue
            has_attention = has_attention or bool(ious or peaks)
            entry: dict[str, Any] = {
                "n": len(sel),
                "box_area_fraction": float(np.concatenate(area).mean()),
            }
            if ious:
                entry["mean_iou"] = float(np.concatenate(ious).mean())
                all_iou.append(np.concatenate(ious))
            if peaks:
                entry["peak_in_box"] = float(np.concatenate(peaks).mean())
                all_peak.append(np.concatenate(peaks))
            per[name] = entry
    if not has_attention:
        return None
    return {
        "per_attribute": per,
        "mean_iou": float(np.concatenate(all_iou).mean()) if all_iou else None,
        "peak_in_box": float(np.concatenate(all_peak).mean()) if all_peak else None,
        "box_area_fraction": float(np.mean([e["box_area_fraction"] for e in per.values()])),
    }


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass
class EvalReport:
    variant: str | None
    part: str
    n_queries: int
    n_candidates: int
    per_attribute_map: dict[str, float]
    overall_weighted: float
    overall_mean: float
    chance: dict[str, Any]
    queries_per_attribute: dict[str, int]
    triplet_accuracy: float | None
    triplet_per_attribute: dict[str, float] = field(default_factory=dict)
    n_triplets: int = 0
    roi: dict[str, Any] | None = None
    encode_ms_per_image: float = 0.0  # decode + preprocess + forward
    forward_ms_per_image: float = 0.0  # model only
    max_abs_component: dict[str, float] = field(default_factory=dict)
    catalog: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes null)."""
        return _json_safe(asdict(self))


def evaluate(
    model: Any,
    catalog: Any,
    splits: Any,
    *,
    part: str = "test",
    n_triplets: int = 2000,
    triplet_seed: int = 0,
    boxes: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = "cpu",
    progress: bool = False,
    max_roi_items: int = 256,
    workers: int = 0,
) -> EvalReport:
    """The papers' protocol on one split part: per-attribute MAP (queries vs candidates), chance MAP,
    triplet accuracy on ``n_triplets`` fixed triplets (seeded) drawn from the part's items, and ROI
    metrics when ``boxes`` (``fgplugin.synth.load_boxes``) are given and the model has attention.

    ``model``: AttributeModel or ExportedEncoder; its schema must be the catalog's.
    """
    from .errors import FgpluginError, ModelCardError
    from .splits import sample_triplets

    schema = model.schema
    if schema.fingerprint() != catalog.schema.fingerprint():
        raise ModelCardError(
            f"model schema {schema.name!r} ({schema.fingerprint()}) is not the catalog's "
            f"{catalog.schema.name!r} ({catalog.schema.fingerprint()}) at {catalog.path}"
        )
    q_ids, c_ids = splits.part(part)
    lookup = catalog.by_id()
    missing = [i for i in list(q_ids) + list(c_ids) if i not in lookup]
    if missing:
        raise FgpluginError(
            f"{len(missing)} {part} ids of the splits are not in {catalog.path} (first: {missing[0]!r}); "
            "re-split the catalog"
        )
    ids = list(q_ids) + list(c_ids)
    names = schema.names
    timings: dict[str, float] = {}
    vecs = encode_catalog(model, catalog, ids, batch_size=batch_size, device=device, progress=progress,
                          workers=workers, timings=timings)
    row = {it.id: r for r, it in enumerate(catalog.items)}
    labels = catalog.label_matrix()[[row[i] for i in ids]]
    nq = len(q_ids)
    queries = query_vectors(model, vecs)
    m = retrieval_map(queries[:nq], labels[:nq], vecs[nq:], labels[nq:], attribute_names=names)
    chance = chance_map(labels[:nq], labels[nq:], attribute_names=names)
    try:
        trip = sample_triplets(labels, n_triplets, seed=triplet_seed)
        ta = triplet_accuracy(vecs, trip, attribute_names=names, anchor_vecs=queries)
    except FgpluginError:  # no attribute can form a triplet in this part
        ta = {"overall": None, "per_attribute": {}}
        trip = np.zeros((0, 4))
    roi = None
    if boxes is not None:
        roi = roi_metrics(model, catalog, ids, boxes, device=device, max_items=max_roi_items)
    n = len(ids)
    return EvalReport(
        variant=(getattr(model, "config", None) and getattr(model.config, "variant", None))
        or (getattr(model, "card", None) or {}).get("variant"),
        part=part,
        n_queries=nq,
        n_candidates=len(c_ids),
        per_attribute_map=m["per_attribute"],
        overall_weighted=m["overall_weighted"],
        overall_mean=m["overall_mean"],
        chance=chance,
        queries_per_attribute=m["n_queries"],
        triplet_accuracy=ta["overall"],
        triplet_per_attribute=ta["per_attribute"],
        n_triplets=len(trip),
        roi=roi,
        encode_ms_per_image=1000 * timings["total_s"] / n,
        forward_ms_per_image=1000 * timings["forward_s"] / n,
        max_abs_component={a: float(vecs[:, i].abs().max()) for i, a in enumerate(names)},
        catalog=str(catalog.path),
    )
