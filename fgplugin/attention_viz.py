"""Attention heat-map overlays: where each attribute's branch looks, with its ROI box.

One PNG per image: the model input, then one panel per attribute with the attention map blended in
(jet colormap, no matplotlib), the model's ROI box in red and, on generated data, the ground-truth
box in green.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .catalog import Catalog, CatalogItem
from .encoding import Encoder
from .errors import FgpluginError
from .evaluation import AttentionModel, EvalMode, run_device, variant_of
from .images import load_image

PRED_COLOUR = (230, 30, 30)
GT_COLOUR = (20, 210, 60)
PANEL = 192  # panel side in pixels (readable even for small model inputs)
HEADER = 16


def colorize(heat: np.ndarray) -> np.ndarray:
    """[h, w] values in [0, 1] -> uint8 [h, w, 3], the classic jet ramp (blue - cyan - yellow - red)."""
    x = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - k), 0, 1) for k in (3, 2, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def overlay(
    image: Image.Image,
    heat: np.ndarray | None,
    *,
    pred_box: Sequence[float] | None = None,
    gt_box: Sequence[float] | None = None,
    alpha: float = 0.45,
) -> Image.Image:
    """Blend a heat map (any resolution, values in [0, 1]) over ``image``; boxes are in ``image`` pixels."""
    base = image.convert("RGB")
    if heat is not None:
        h = np.asarray(heat, dtype=np.float64)
        span = h.max() - h.min()
        h = (h - h.min()) / span if span > 0 else np.zeros_like(h)
        hm = Image.fromarray(colorize(h)).resize(base.size, Image.Resampling.BILINEAR)
        base = Image.blend(base, hm, alpha)
    draw = ImageDraw.Draw(base)
    for box, colour in ((gt_box, GT_COLOUR), (pred_box, PRED_COLOUR)):
        if box is not None:
            draw.rectangle([float(v) for v in box], outline=colour, width=2)
    return base


def _panel(img: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (PANEL, PANEL + HEADER), (255, 255, 255))
    out.paste(img.resize((PANEL, PANEL), Image.Resampling.BILINEAR), (0, HEADER))
    ImageDraw.Draw(out).text((3, 2), title[:30], fill=(0, 0, 0))
    return out


def _sheet(model: AttentionModel, item: CatalogItem, base_dir: Path, gt_boxes: dict[str, Any],
           dev: torch.device) -> Image.Image:
    """One item's overlay sheet: the model input, then one panel per attribute (``gt_boxes``: the
    item's ground-truth box per attribute, in catalog-image pixels)."""
    pre = model.preprocess
    size = pre.image_size
    img = load_image(item.image, base_dir=base_dir)
    sx, sy = size / img.size[0], size / img.size[1]
    x = pre.batch([img]).to(dev)
    shown = Image.fromarray((pre.unnormalize(x[0].cpu()).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    panels = [_panel(shown, str(item.id))]
    any_attention = False
    for a, name in enumerate(model.schema.names):
        maps, pred = model.attention(x, torch.full((1,), a, dtype=torch.long, device=dev))
        any_attention = any_attention or maps is not None or pred is not None
        gt = gt_boxes.get(name)
        gt_scaled = None if gt is None else (gt[0] * sx, gt[1] * sy, gt[2] * sx, gt[3] * sy)
        panel = overlay(
            shown,
            None if maps is None else maps[0].float().cpu().numpy(),
            pred_box=None if pred is None else pred[0].float().cpu().tolist(),
            gt_box=gt_scaled,
        )
        panels.append(_panel(panel, f"{name}: {item.labels.get(name) or '-'}"))
    if not any_attention:
        raise FgpluginError(f"the {variant_of(model) or 'this'} model has no attention maps or ROI boxes to draw")
    sheet = Image.new("RGB", (PANEL * len(panels), PANEL + HEADER), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, (i * PANEL, 0))
    return sheet


def save_attention(
    model: Encoder,
    catalog: Catalog,
    ids: Sequence[str],
    out_dir: str | Path,
    *,
    boxes: dict[str, dict[str, Any]] | None = None,
    device: str | torch.device = "cpu",
    max_images: int = 8,
) -> list[Path]:
    """Write ``<id>.png`` overlays for the first ``max_images`` of ``ids``; returns the paths.

    ``model`` must be a training model whose variant has attention (an export keeps only the encoder).
    """
    if not isinstance(model, AttentionModel):
        raise FgpluginError("attention overlays need a training checkpoint (--checkpoint), not an export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = run_device(model, device)
    lookup = catalog.by_id()
    written: list[Path] = []
    with EvalMode(model, dev), torch.no_grad():
        for item_id in list(ids)[:max_images]:
            sheet = _sheet(model, lookup[item_id], catalog.base_dir, (boxes or {}).get(item_id, {}), dev)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(item_id))
            path = out / f"{safe}.png"
            sheet.save(path)
            written.append(path)
    return written
