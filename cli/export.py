"""`fgplugin export`: a self-contained encoder for serving (encoder program + weights + model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fgplugin.card import read_card
from fgplugin.errors import SettingError

from .common import console, err_console, friendly_errors, print_json
from .evaluate import eval_data, report_table, run_evaluation
from .progress import ProgressDisplay


@friendly_errors
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Training run or checkpoint folder."),
    out: Path = typer.Option(..., "--out", help="Export folder to write (an existing export there is replaced)."),
    catalog: Optional[Path] = typer.Option(
        None, "--catalog", help="Training catalog: evaluate on it and record metrics and a data summary in the card."
    ),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema file (default: beside the catalog)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Splits file (default: splits.json beside the catalog)."),
    part: str = typer.Option("test", "--part", help="Split part the recorded metrics come from."),
    triplets: int = typer.Option(2000, "--triplets"),
    device: str = typer.Option("cpu", "--device", help="Device for the evaluation (the export is written on CPU)."),
    dim: Optional[int] = typer.Option(
        None, "--dim", min=1,
        help="Compact vectors: project each attribute's vector to DIM values (principal axes fitted on the "
             "catalog's training split; needs --catalog). See README 'Compact vectors'."),
    as_json: bool = typer.Option(False, "--json", help="Print the model card as JSON."),
) -> None:
    """Export a trained model: its encoder, safetensors weights and a model card."""
    from fgplugin.export import export_model  # torch: imported when the command runs, not at CLI start
    from fgplugin.loading import load_encoder, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    if dim is not None and catalog is None:
        raise SettingError("--dim fits its projection on the training split: give --catalog too")
    report, cat, compact = None, None, None
    if catalog is not None:
        model = load_encoder(ckpt, device="cpu")
        data = eval_data(catalog, schema, splits, model)
        if dim is not None:
            from fgplugin.training.compact import compact_model  # torch: see fgplugin.export above

            with ProgressDisplay(err_console, enabled=not as_json, transient=True) as show:
                model = compact = compact_model(model, data.catalog, data.splits, dim, device=device, on_progress=show)
        report = run_evaluation(model, data, show_progress=not as_json, part=part, n_triplets=triplets,
                                device=device)
        cat = data.catalog
    path = export_model(ckpt, out, eval_report=report, catalog=cat, compact=compact)
    card = read_card(path)  # the export was verified by loading it; the card is all that is printed
    if as_json:
        print_json(card)
        return
    if report is not None:
        console.print(report_table(report, f"{report.variant} on {catalog} ({part}), recorded in the card"))
    dims = ", ".join(f"{a}:{d}" for a, d in card["dims"].items())
    if card.get("compact"):
        kept = ", ".join(f"{a}:{100 * v:.0f}%" for a, v in card["compact"]["kept_variance"].items())
        dims += f" (compact, from {max(card['compact']['from_dims'].values())}; training variance kept {kept})"
    console.print(
        f"[bold green]exported[/] {card['variant']} to {path}\n"
        f"  version {card['version'][:16]}  encoder {card['encoder']['kind']}  "
        f"input {card['preprocess']['image_size']}px\n  dims {dims}",
        highlight=False,
    )
