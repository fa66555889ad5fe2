"""The papers' evaluation protocol on one split part: encode its items with an encoder, then MAP of
queries vs candidates, chance MAP, triplet accuracy and (generated data) ROI measures, as an
``EvalReport``. The metrics themselves are in ``metrics``; nothing here prints."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..catalog import Catalog
from ..dataset import CatalogImages
from ..encoding import Encoder
from ..errors import FgpluginError, ModelCardError
from ..progress import OnProgress, report
from ..schema import require_same_schema
from ..similarity import query_form_padded
from ..splits import Splits, sample_triplets
from .inference import AttentionModel, EvalMode, run_device, variant_of
from .metrics import chance_map, retrieval_map, triplet_accuracy
from .roi import roi_metrics


def query_vectors(model: Encoder, vecs: torch.Tensor) -> torch.Tensor:
    """What ``model``'s queries score with, from its vectors [N, A, D]: the same vectors, or with
    posterior = prob the slack value dropped (fgplugin.similarity)."""
    if not model.query_slack:
        return vecs
    return query_form_padded(vecs, [model.dims[n] for n in model.schema.names], True)


def encode_catalog(
    model: Encoder,
    catalog: Catalog,
    ids: Sequence[str],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    on_progress: OnProgress | None = None,
    workers: int = 0,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Every attribute's vector for items ``ids``: float32 [N, A, D] on CPU.

    ``model`` is a training model (moved to ``device`` and put in eval mode, restored after) or a
    loaded export (runs where it was loaded). ``on_progress`` hears ``encoding`` steps (items done).
    ``timings``, if given, receives ``total_s`` (decode + preprocess + forward) and ``forward_s``
    (model calls only).
    """
    dev = run_device(model, device)
    data = CatalogImages(catalog, list(ids), model.preprocess.transform())
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    out: list[torch.Tensor] = []
    fwd, done = 0.0, 0
    t0 = time.perf_counter()
    with EvalMode(model, dev), torch.no_grad():
        report(on_progress, "encoding", 0, len(data))
        for x, _ in loader:
            t = time.perf_counter()
            v = model.embed_all(x.to(dev))
            if v.is_cuda:
                torch.cuda.synchronize()
            fwd += time.perf_counter() - t
            out.append(v.float().cpu())
            done += len(x)
            report(on_progress, "encoding", done, len(data))
    if timings is not None:
        timings["total_s"] = time.perf_counter() - t0
        timings["forward_s"] = fwd
    if not out:
        raise ValueError("no items to encode")
    return torch.cat(out)


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
    # per attribute, the largest |component| of any vector seen: the export's int8 scale comes from it
    max_abs_component: dict[str, float] = field(default_factory=dict)
    catalog: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes null)."""
        return _json_safe(asdict(self))


def _part_ids(catalog: Catalog, splits: Splits, part: str) -> tuple[list[str], list[str]]:
    """(query ids, candidate ids) of ``part``; every one must be in the catalog."""
    q_ids, c_ids = splits.part(part)
    lookup = catalog.by_id()
    missing = [i for i in list(q_ids) + list(c_ids) if i not in lookup]
    if missing:
        raise FgpluginError(
            f"{len(missing)} {part} ids of the splits are not in {catalog.path} (first: {missing[0]!r}); "
            "re-split the catalog"
        )
    return list(q_ids), list(c_ids)


def _triplets(labels: np.ndarray, vecs: torch.Tensor, queries: torch.Tensor, names: list[str],
              n_triplets: int, seed: int) -> tuple[dict[str, Any], int]:
    """Triplet accuracy on ``n_triplets`` seeded triplets of the part, and how many were drawn."""
    try:
        trip = sample_triplets(labels, n_triplets, seed=seed)
    except FgpluginError:  # no attribute can form a triplet in this part
        return {"overall": None, "per_attribute": {}}, 0
    return triplet_accuracy(vecs, trip, attribute_names=names, anchor_vecs=queries), len(trip)


def evaluate(
    model: Encoder,
    catalog: Catalog,
    splits: Splits,
    *,
    part: str = "test",
    n_triplets: int = 2000,
    triplet_seed: int = 0,
    boxes: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    on_progress: OnProgress | None = None,
    max_roi_items: int = 256,
    workers: int = 0,
) -> EvalReport:
    """The papers' protocol on one split part: per-attribute MAP (queries vs candidates), chance MAP,
    triplet accuracy on ``n_triplets`` fixed triplets (seeded) drawn from the part's items, and ROI
    metrics when ``boxes`` (``fgplugin.synth.load_boxes``) are given and the model has attention.

    ``model``: a training model or a loaded export; its schema must be the catalog's.
    """
    require_same_schema(model.schema, catalog.schema, have_is="the model",
                        want_is=f"the catalog {catalog.path}", error=ModelCardError)
    q_ids, c_ids = _part_ids(catalog, splits, part)
    ids = q_ids + c_ids
    names = model.schema.names
    timings: dict[str, float] = {}
    vecs = encode_catalog(model, catalog, ids, batch_size=batch_size, device=device, on_progress=on_progress,
                          workers=workers, timings=timings)
    row = {it.id: r for r, it in enumerate(catalog.items)}
    labels = catalog.label_matrix()[[row[i] for i in ids]]
    nq = len(q_ids)
    queries = query_vectors(model, vecs)
    m = retrieval_map(queries[:nq], labels[:nq], vecs[nq:], labels[nq:], attribute_names=names)
    ta, drawn = _triplets(labels, vecs, queries, names, n_triplets, triplet_seed)
    roi = None
    if boxes is not None and isinstance(model, AttentionModel):
        roi = roi_metrics(model, catalog, ids, boxes, device=device, max_items=max_roi_items)
    return EvalReport(
        variant=variant_of(model),
        part=part,
        n_queries=nq,
        n_candidates=len(c_ids),
        per_attribute_map=m["per_attribute"],
        overall_weighted=m["overall_weighted"],
        overall_mean=m["overall_mean"],
        chance=chance_map(labels[:nq], labels[nq:], attribute_names=names),
        queries_per_attribute=m["n_queries"],
        triplet_accuracy=ta["overall"],
        triplet_per_attribute=ta["per_attribute"],
        n_triplets=drawn,
        roi=roi,
        encode_ms_per_image=1000 * timings["total_s"] / len(ids),
        forward_ms_per_image=1000 * timings["forward_s"] / len(ids),
        max_abs_component={a: float(vecs[:, i].abs().max()) for i, a in enumerate(names)},
        catalog=str(catalog.path),
    )
