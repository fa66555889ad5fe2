"""A self-contained HTML report of one query: the query image, the hits with per-attribute scores.

Images are embedded as base64 JPEG thumbnails, so the page can be mailed or archived as one file.
With ``explain``, the page also shows where each asked-for attribute looks (attention heat map and
ROI box) when the model offers it; when it does not, the page says why instead of drawing anything.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ..encoding import AttentionModel
from ..errors import FgpluginError
from ..images import ImageLimits, load_image
from .execute import QueryRun, filter_to_dict, key_fields, reference_label

THUMB = 200
_LIMITS = ImageLimits(timeout_s=5.0, retries=0)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px} .sub{color:#666;margin:0 0 16px;font-size:13px}
.query{display:flex;gap:16px;align-items:flex-start;margin-bottom:20px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}
.card img,.query img{max-width:100%;display:block;margin-bottom:6px;border-radius:4px}
.missing{height:120px;display:flex;align-items:center;justify-content:center;background:#f4f4f4;
  color:#888;text-align:center;padding:6px;margin-bottom:6px;border-radius:4px}
.id{font-weight:600;font-size:13px;word-break:break-all} .score{float:right;font-weight:600}
table{border-collapse:collapse;width:100%;margin-top:4px} td{padding:1px 3px;border-top:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{height:6px;background:#4a7bd0;border-radius:3px}
.note{background:#fff8e0;border:1px solid #eed88a;padding:6px 10px;border-radius:4px;margin:6px 0;font-size:13px}
.explain{display:flex;gap:10px;flex-wrap:wrap}
"""


def thumbnail_data_uri(image: Image.Image, size: int = THUMB) -> str:
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_block(source: str | None, *, base_dir: str | Path | None = None) -> str:
    if not source:
        return '<div class="missing">no image recorded</div>'
    try:
        uri = thumbnail_data_uri(load_image(source, base_dir=base_dir, limits=_LIMITS))
    except FgpluginError as e:
        return f'<div class="missing">image unavailable: {html.escape(str(e))}</div>'
    return f'<img src="{uri}" alt="{html.escape(source)}">'


def explain_attention(run: QueryRun) -> tuple[dict[str, Image.Image], str]:
    """Attention overlays for the query's attributes on its image, or ({}, why there are none).

    They need a training model (``run.explainer``, an ``AttentionModel``: ``fgplugin query --checkpoint``);
    an exported encoder keeps only the embedding network, so with one alone this returns the reason.
    """
    model, image, attributes = run.explainer, run.query_image, list(run.resolved.attributes)
    if model is None:
        if run.encoder is None:
            return {}, "no model was loaded for this query (a like-id query does not load one)"
        return {}, (
            f"the model at {run.encoder.path} is an export, which keeps only the encoder; "
            "attention maps need a training checkpoint (see `fgplugin eval --save-attention`)"
        )
    out = attention_overlays(model, image, attributes)
    return out, "" if out else "this model variant has no attention maps or ROI boxes"


def attention_overlays(model: AttentionModel, image: Image.Image, attributes: Sequence[str]) -> dict[str, Image.Image]:
    """Each attribute's attention heat map and ROI box drawn over ``image`` as the model sees it (its input
    size); attributes the model draws nothing for are left out. Shared by this report and ``fgplugin explore``."""
    # Only here is torch needed: a page without attention maps renders on a client without the [train] extra.
    import torch

    from ..attention_viz import overlay  # torch too

    pre = model.preprocess
    x = pre.batch([image])
    shown = Image.fromarray((pre.unnormalize(x[0]).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    names = model.schema.names
    out: dict[str, Image.Image] = {}
    with torch.no_grad():
        for a in attributes:
            maps, box = model.attention(x, torch.full((1,), names.index(a), dtype=torch.long))
            if maps is None and box is None:
                continue
            out[a] = overlay(
                shown,
                None if maps is None else maps[0].float().numpy(),
                pred_box=None if box is None else box[0].float().tolist(),
            )
    return out


def render_report(run: QueryRun, *, explain: bool = False, title: str = "fgplugin query") -> str:
    spec, result = run.resolved, run.result
    attrs = list(spec.attributes)
    fields = key_fields(run.spec, run.layout.metadata_types, limit=6)
    weights = ", ".join(f"{html.escape(a)}={w:g}" for a, w in spec.attributes.items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(reference_label(run.spec))}</h1>",
        f"<p class='sub'>weights {weights} · mode {html.escape(result.mode)} · k {spec.k}"
        + ("" if result.total_candidates is None else f" · {result.total_candidates} candidates")
        + (f" · filters {html.escape(_filters_text(run.spec))}" if run.spec.filters else "")
        + "</p>",
    ]
    for n in run.notes:
        parts.append(f"<div class='note'>{html.escape(n)}</div>")

    # the query
    parts.append("<div class='query'>")
    if run.query_image is not None:
        parts.append(f"<div><img src='{thumbnail_data_uri(run.query_image, 260)}' alt='query'><b>query image</b></div>")
    elif run.spec.like_id is not None:
        parts.append(f"<div>{_image_block(run.reference_image)}<b>query: {html.escape(run.spec.like_id)}</b></div>")
    if explain:
        parts.append(_explain_block(run, attrs))
    parts.append("</div>")

    # the hits
    parts.append("<div class='grid'>")
    for rank, h in enumerate(result.hits, start=1):
        rows = []
        for a in attrs:
            c = h.cosines.get(a)
            if c is None:
                rows.append(f"<tr><td>{html.escape(a)}</td><td class='n'>missing</td><td></td></tr>")
            else:
                width = max(0.0, min(1.0, (c + 1) / 2)) * 100
                rows.append(
                    f"<tr><td>{html.escape(a)}</td><td class='n'>{c:.3f}</td>"
                    f"<td style='width:40%'><div class='bar' style='width:{width:.0f}%'></div></td></tr>"
                )
        for f in fields:
            if f in h.metadata:
                rows.append(f"<tr><td>{html.escape(f)}</td><td colspan='2'>{html.escape(str(h.metadata[f]))}</td></tr>")
        parts.append(
            f"<div class='card' data-id='{html.escape(h.id)}'>{_image_block(h.image)}"
            f"<span class='score'>{h.score:.4f}</span><span class='id'>#{rank} {html.escape(h.id)}</span>"
            f"<table>{''.join(rows)}</table></div>"
        )
    if not result.hits:
        parts.append("<p>No document matched.</p>")
    parts.append("</div></body></html>")
    return "\n".join(parts)


def _explain_block(run: QueryRun, attrs: Sequence[str]) -> str:
    if run.query_image is None:
        return ("<div class='note'>attention maps are drawn for image queries; this query is by "
                f"{html.escape(reference_label(run.spec))}</div>")
    panels, why = explain_attention(run)
    if not panels:
        return f"<div class='note'>no attention map: {html.escape(why)}</div>"
    cells = [
        f"<div><img src='{thumbnail_data_uri(im)}' alt='{html.escape(a)}'><b>{html.escape(a)}</b></div>"
        for a, im in panels.items()
    ]
    return "<div class='explain'>" + "".join(cells) + "</div>"


def _filters_text(spec: Any) -> str:
    return "; ".join(str(filter_to_dict(f)) for f in spec.filters)


def write_report(run: QueryRun, path: str | Path, *, explain: bool = False) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_report(run, explain=explain), encoding="utf-8")
    return p
