"""ROI / attention measures on generated data: does each attribute's attention find its ground-truth
region (IoU of the model's ROI box, attention peak inside the box)?"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..catalog import Catalog
from ..images import load_image
from .inference import AttentionModel, EvalMode, run_device
from .metrics import box_area, roi_iou


@dataclass
class _AttributeROI:
    """One attribute's measures, batch by batch."""

    n: int
    area: list[np.ndarray] = field(default_factory=list)  # box area / image area
    ious: list[np.ndarray] = field(default_factory=list)
    peaks: list[np.ndarray] = field(default_factory=list)  # attention peak inside the box

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "box_area_fraction": float(np.concatenate(self.area).mean())}
        if self.ious:
            out["mean_iou"] = float(np.concatenate(self.ious).mean())
        if self.peaks:
            out["peak_in_box"] = float(np.concatenate(self.peaks).mean())
        return out


def _peaks_in_boxes(maps: torch.Tensor, gt: np.ndarray, size: int) -> np.ndarray:
    """Whether each map's argmax cell centre (scaled to the S x S input) lies in its box."""
    m = maps.float().cpu()
    h, w = m.shape[-2:]
    flat = m.reshape(len(gt), -1).argmax(1).numpy()
    py, px = (flat // w + 0.5) * size / h, (flat % w + 0.5) * size / w
    return (px >= gt[:, 0]) & (px <= gt[:, 2]) & (py >= gt[:, 1]) & (py <= gt[:, 3])


def _attribute_roi(
    model: AttentionModel, catalog: Catalog, sel: list[str], a: int, boxes: dict[str, dict[str, Any]],
    dev: torch.device, batch_size: int,
) -> _AttributeROI:
    """Attribute ``a``'s measures over items ``sel`` (each has a ground-truth box for it)."""
    pre, name, lookup = model.preprocess, catalog.schema.names[a], catalog.by_id()
    size = pre.image_size
    out = _AttributeROI(len(sel))
    for s in range(0, len(sel), batch_size):
        chunk = sel[s:s + batch_size]
        imgs = [load_image(lookup[i].image, base_dir=catalog.base_dir) for i in chunk]
        gt = np.array([boxes[i][name] for i in chunk], dtype=np.float64)
        wh = np.array([im.size for im in imgs], dtype=np.float64)
        gt = gt * np.concatenate([size / wh, size / wh], axis=1)  # catalog pixels -> model input pixels
        maps, pred = model.attention(pre.batch(imgs).to(dev), torch.full((len(chunk),), a, dtype=torch.long, device=dev))
        out.area.append(box_area(gt) / size**2)
        if pred is not None:
            out.ious.append(roi_iou(pred.float().cpu().numpy(), gt))
        if maps is not None:
            out.peaks.append(_peaks_in_boxes(maps, gt, size))
    return out


def roi_metrics(
    model: AttentionModel,
    catalog: Catalog,
    ids: Sequence[str],
    boxes: dict[str, dict[str, Any]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    max_items: int = 256,
) -> dict[str, Any] | None:
    """How well each attribute's attention finds its ground-truth region (generated data).

    For up to ``max_items`` items per attribute that have a ground-truth box: IoU between the
    model's ROI box and the box, and whether the attention map's peak falls inside it. Boxes are
    in catalog-image pixels and are scaled to the model input (the preprocessing squashes the image
    to S x S). Reference: ``box_area_fraction`` (box area / image area) is both the IoU of a
    whole-image "ROI" (a model that does not localise) and the chance a random peak lands in the box.
    Returns None when the model gives neither maps nor boxes (a variant without attention).
    """
    dev = run_device(model, device)
    per: dict[str, _AttributeROI] = {}
    with EvalMode(model, dev), torch.no_grad():
        for a, name in enumerate(catalog.schema.names):
            sel = [i for i in ids if (boxes.get(i) or {}).get(name) is not None][:max_items]
            if sel:
                per[name] = _attribute_roi(model, catalog, sel, a, boxes, dev, batch_size)
    if not any(r.ious or r.peaks for r in per.values()):
        return None
    entries = {name: r.entry() for name, r in per.items()}
    all_iou = [x for r in per.values() for x in r.ious]
    all_peak = [x for r in per.values() for x in r.peaks]
    return {
        "per_attribute": entries,
        "mean_iou": float(np.concatenate(all_iou).mean()) if all_iou else None,
        "peak_in_box": float(np.concatenate(all_peak).mean()) if all_peak else None,
        "box_area_fraction": float(np.mean([e["box_area_fraction"] for e in entries.values()])),
    }
