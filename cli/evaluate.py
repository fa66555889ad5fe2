"""`fgplugin eval`: the papers' retrieval protocol on a catalog's test (or valid) part."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .common import console, err_console, friendly_errors, print_json


def load_model(checkpoint: Optional[Path], export_dir: Optional[Path], device: str) -> Any:
    """An AttributeModel from a training run/checkpoint folder, or an ExportedEncoder."""
    from fgplugin.errors import FgpluginError

    if (checkpoint is None) == (export_dir is None):
        raise FgpluginError("give exactly one of --checkpoint RUN_DIR or --model EXPORT_DIR")
    if export_dir is not None:
        from fgplugin.export import ExportedEncoder

        return ExportedEncoder.load(export_dir, device=device)
    from fgplugin.models import load_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    model, _ = load_checkpoint(ckpt, map_location="cpu")
    return model


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder (config.json + weights), or a run folder holding best/ or last/ ones."""
    from fgplugin.errors import FgpluginError

    p = Path(path)
    if (p / "config.json").is_file():
        return p
    for sub in ("best", "last", "checkpoint", "final"):
        if (p / sub / "config.json").is_file():
            return p / sub
    raise FgpluginError(f"{p}: no checkpoint here (expected config.json, or best/ or last/ inside a run folder)")


def load_eval_data(catalog: Path, schema_path: Optional[Path], splits_path: Optional[Path], model: Any):
    """(catalog, splits, boxes or None). The catalog is read with the model's schema; a schema file
    beside the catalog (or --schema) must match it."""
    from fgplugin.catalog import find_schema, load_catalog
    from fgplugin.errors import FgpluginError, ModelCardError
    from fgplugin.schema import AttributeSchema
    from fgplugin.splits import Splits

    try:
        declared = AttributeSchema.load(schema_path or find_schema(catalog))
    except FgpluginError:
        if schema_path is not None:
            raise
        declared = None
    if declared is not None and declared.fingerprint() != model.schema.fingerprint():
        raise ModelCardError(
            f"{catalog}: its schema {declared.name!r} ({declared.fingerprint()}) is not the model's "
            f"{model.schema.name!r} ({model.schema.fingerprint()})"
        )
    cat = load_catalog(catalog, model.schema, strict=False)
    if cat.problems:
        err_console.print(
            f"[yellow]warning:[/] {len(cat.problems)} catalog row(s) skipped; first: {cat.problems[0]}",
            highlight=False,
        )
    splits = Splits.load(splits_path or Path(catalog).parent / "splits.json")
    boxes = None
    if (Path(catalog).parent / "boxes.jsonl").is_file():
        from fgplugin.synth import load_boxes

        boxes = load_boxes(Path(catalog).parent)
    return cat, splits, boxes


def _pct(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def report_table(report: Any, title: str) -> Table:
    t = Table(title=title)
    for col, just in (("attribute", "left"), ("queries", "right"), ("MAP %", "right"), ("chance %", "right"),
                      ("triplet acc %", "right"), ("ROI IoU %", "right"), ("peak in box %", "right"),
                      ("box area %", "right")):
        t.add_column(col, justify=just)
    roi = (report.roi or {}).get("per_attribute", {})
    for name, m in report.per_attribute_map.items():
        r = roi.get(name, {})
        t.add_row(name, str(report.queries_per_attribute.get(name, 0)), _pct(m),
                  _pct(report.chance["per_attribute"].get(name)), _pct(report.triplet_per_attribute.get(name)),
                  _pct(r.get("mean_iou")), _pct(r.get("peak_in_box")), _pct(r.get("box_area_fraction")))
    t.add_section()
    r = report.roi or {}
    t.add_row("[bold]overall (weighted)[/]", str(sum(report.queries_per_attribute.values())),
              f"[bold]{_pct(report.overall_weighted)}[/]", _pct(report.chance["overall_weighted"]),
              _pct(report.triplet_accuracy), _pct(r.get("mean_iou")), _pct(r.get("peak_in_box")),
              _pct(r.get("box_area_fraction")))
    t.add_row("overall (mean)", "", _pct(report.overall_mean), _pct(report.chance["overall_mean"]), "", "", "", "")
    return t


@friendly_errors
def evaluate(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Training run or checkpoint folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="Export folder (from `fgplugin export`)."),
    catalog: Path = typer.Option(..., "--catalog", help="Catalog manifest (.jsonl or .csv)."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema file (default: beside the catalog)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Splits file (default: splits.json beside the catalog)."),
    part: str = typer.Option("test", "--part", help="Split part: test or valid."),
    triplets: int = typer.Option(2000, "--triplets", help="Number of fixed (seeded) test triplets."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    save_attention: Optional[Path] = typer.Option(
        None, "--save-attention", help="Write heat-map overlays with ROI boxes (PNG) for a sample of query images here."
    ),
    attention_images: int = typer.Option(8, "--attention-images", help="How many images --save-attention draws."),
) -> None:
    """Per-attribute retrieval MAP (queries vs candidates), chance MAP, triplet accuracy and, on generated
    data, ROI localisation."""
    import torch

    from fgplugin.evaluation import evaluate as run_eval

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    m = load_model(checkpoint, model, dev)
    cat, sp, boxes = load_eval_data(catalog, schema, splits, m)
    report = run_eval(m, cat, sp, part=part, n_triplets=triplets, boxes=boxes, batch_size=batch_size,
                      device=dev, progress=not as_json)
    if save_attention is not None:
        from fgplugin.attention_viz import save_attention as draw

        paths = draw(m, cat, sp.part(part)[0], save_attention, boxes=boxes, device=dev, max_images=attention_images)
        if not as_json:
            console.print(f"wrote {len(paths)} attention overlay(s) to {save_attention}")
    if as_json:
        print_json(report.to_dict())
        return
    console.print(report_table(report, f"{report.variant or 'model'} on {catalog} ({part})"))
    console.print(
        f"encode: {report.encode_ms_per_image:.2f} ms/image (model only {report.forward_ms_per_image:.2f} ms) "
        f"on {dev}; {report.n_queries} queries x {report.n_candidates} candidates; {report.n_triplets} triplets",
        highlight=False,
    )
