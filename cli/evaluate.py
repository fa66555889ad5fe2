"""`fgplugin eval`: the papers' retrieval protocol on a catalog's test (or valid) part."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from .common import FitWidth, console, err_console, friendly_errors, print_json
from .progress import ProgressDisplay

# The evaluation, the model loaders and the attention drawings need torch: they are imported when a
# command runs, so `fgplugin --help` and the client commands start without it (the [train] extra).
if TYPE_CHECKING:
    from fgplugin.encoding import Encoder
    from fgplugin.evaluation import EvalReport
    from fgplugin.loading import EvalData


def eval_data(catalog: Path, schema: Optional[Path], splits: Optional[Path], model: Encoder) -> EvalData:
    """``load_eval_data``, warning about skipped catalog rows (eval and export --catalog)."""
    from fgplugin.loading import load_eval_data  # torch: see the note at the top

    data = load_eval_data(catalog, schema, splits, model)
    problems = data.catalog.problems
    if problems:
        err_console.print(f"[yellow]warning:[/] {len(problems)} catalog row(s) skipped; first: {problems[0]}",
                          highlight=False)
    return data


def run_evaluation(model: Encoder, data: EvalData, *, show_progress: bool, **options: Any) -> EvalReport:
    """``fgplugin.evaluation.evaluate`` with the CLI's progress display."""
    from fgplugin.evaluation import evaluate as run_eval  # torch: see the note at the top

    with ProgressDisplay(err_console, enabled=show_progress, transient=True) as show:
        return run_eval(model, data.catalog, data.splits, boxes=data.boxes, on_progress=show, **options)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


# Dropped in this order when the console is too narrow (the MAP and chance columns always stay).
_DROP_ORDER = ("box area %", "peak in box %", "ROI IoU %", "queries", "triplet acc %")


def report_table(report: EvalReport, title: str) -> FitWidth:
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
    return FitWidth(t, _DROP_ORDER)


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
    from fgplugin.attention_viz import save_attention as draw_attention  # torch: see the note at the top
    from fgplugin.devices import resolve_device
    from fgplugin.loading import load_encoder

    dev = resolve_device(device)
    m = load_encoder(checkpoint, model, device=dev)
    data = eval_data(catalog, schema, splits, m)
    report = run_evaluation(m, data, show_progress=not as_json, part=part, n_triplets=triplets,
                            batch_size=batch_size, device=dev)
    if save_attention is not None:
        paths = draw_attention(m, data.catalog, data.splits.part(part)[0], save_attention, boxes=data.boxes,
                               device=dev, max_images=attention_images)
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
