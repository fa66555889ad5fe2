"""`fgplugin demo`: the whole job end to end on generated data, in one command.

generate a catalog -> train a small model -> evaluate -> export -> index into the embedded store ->
run two queries. Each step calls the same library function its own command calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from .common import console, err_console, friendly_errors
from .index import report_table
from .progress import ProgressDisplay
from .query import result_table

if TYPE_CHECKING:
    from fgplugin.catalog import Catalog
    from fgplugin.evaluation import EvalReport
    from fgplugin.search.store import Store
    from fgplugin.splits import Splits


# Small settings so the demo learns in about three minutes on a two-core CPU: the tiny ResNet at 64 px
# with in-batch triplets (measured: colour and hem length clearly learned; sleeves, neckline, collar
# and pocket need longer runs or ImageNet weights). The paper defaults are in fgplugin/configs/.
DEMO_SMALL = {
    "trunk": "resnet_tiny",
    "local_trunk": "resnet_tiny",
    "local_size": 32,
    "embed_dim": 64,
    "attr_embed_dim": 32,
    "asa_dim": 32,
    "local_asa_dim": 32,
    "batch_size": 32,
    "steps": 1200,
    "lr": 1e-3,
    "mining": "batch_all",
}


@friendly_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Working folder (data, run, export, store)."),
    n: int = typer.Option(2000, help="Number of generated catalog items."),
    image_size: int = typer.Option(64, help="Model input size (small on CPU)."),
    budget: str = typer.Option("3m", help="Training time budget, e.g. 90s, 3m."),
    variant: str = typer.Option("asen_v2", help="Model variant."),
    seed: int = typer.Option(0, help="Seed for data, split and training."),
    set_: list[str] = typer.Option(None, "--set", help="Any model/training config key: --set key=value."),
) -> None:
    """Generate data, train, export, index and query: everything on this machine, no server."""
    t0 = time.perf_counter()
    data_dir, run_dir, export_dir, store_dir = out / "data", out / "run", out / "export", out / "store"
    catalog, splits = _generate(data_dir, n, seed)
    checkpoint = _train(catalog, splits, run_dir, variant=variant, budget=budget, image_size=image_size, seed=seed,
                        settings=set_ or [])
    report = _evaluate_and_export(checkpoint, catalog, splits, data_dir, export_dir)
    like, best = _index_and_query(catalog, splits, report, export_dir, store_dir)
    console.print(f"[green]demo finished in {time.perf_counter() - t0:.0f} s[/]; try: "
                  f"fgplugin query --store embedded:{store_dir} --like {like} --attr {best}")


# Each step imports the library parts it uses when it runs: they need torch (the [train] extra), and
# `fgplugin --help` must not load it.
def _generate(data_dir: Path, n: int, seed: int) -> tuple["Catalog", "Splits"]:
    from fgplugin import synth
    from fgplugin.catalog import load_catalog
    from fgplugin.schema import AttributeSchema
    from fgplugin.splits import Splits

    console.rule("[bold]1/5 generate")
    catalog_path = data_dir / "catalog.jsonl"
    if not catalog_path.is_file():
        with ProgressDisplay(err_console) as show:
            synth.generate(data_dir, n, seed=seed, on_progress=show)
    schema = AttributeSchema.load(data_dir / "schema.toml")
    catalog = load_catalog(catalog_path, schema)
    console.print(f"{len(catalog)} items, attributes: {', '.join(schema.names)}")
    return catalog, Splits.load(data_dir / "splits.json")


def _train(catalog: "Catalog", splits: "Splits", run_dir: Path, *, variant: str, budget: str, image_size: int,
           seed: int, settings: list[str]) -> Path:
    from fgplugin.models import load_config, parse_overrides
    from fgplugin.training import parse_budget, train

    console.rule(f"[bold]2/5 train {variant} (budget {budget})")
    overrides = dict(DEMO_SMALL)
    overrides.update({"image_size": image_size, "seed": seed})
    overrides.update(parse_overrides(settings))
    config = load_config(variant, overrides)
    with ProgressDisplay(err_console) as show:
        result = train(config, catalog, splits, run_dir, budget_s=parse_budget(budget), resume=True, on_progress=show)
    return result.checkpoint


def _evaluate_and_export(checkpoint: Path, catalog: "Catalog", splits: "Splits", data_dir: Path,
                         export_dir: Path) -> "EvalReport":
    from fgplugin import synth
    from fgplugin.evaluation import evaluate
    from fgplugin.export import export_model
    from fgplugin.models import load_checkpoint

    console.rule("[bold]3/5 evaluate and export")
    model, _ = load_checkpoint(checkpoint)
    with ProgressDisplay(err_console, transient=True) as show:
        report = evaluate(model, catalog, splits, part="test", boxes=synth.load_boxes(data_dir), on_progress=show)
    t = Table(title="Test retrieval (papers' protocol)")
    t.add_column("attribute")
    t.add_column("MAP", justify="right")
    t.add_column("chance", justify="right")
    for a, m in report.per_attribute_map.items():
        t.add_row(a, f"{100 * m:.1f}", f"{100 * report.chance['per_attribute'].get(a, float('nan')):.1f}")
    t.add_row(
        "[bold]overall (query-weighted)",
        f"{100 * report.overall_weighted:.1f}",
        f"{100 * report.chance['overall_weighted']:.1f}",
    )
    if report.triplet_accuracy is not None:
        t.caption = f"triplet accuracy {100 * report.triplet_accuracy:.1f} %"
    console.print(t)
    export_model(checkpoint, export_dir, eval_report=report, catalog=catalog)
    return report


def _index_and_query(catalog: "Catalog", splits: "Splits", report: "EvalReport", export_dir: Path,
                     store_dir: Path) -> tuple[str, str]:
    """Steps 4 and 5; returns the reference id and the best-learned attribute (for the closing hint)."""
    from fgplugin.export import ExportedEncoder
    from fgplugin.indexer import index_catalog
    from fgplugin.stores import open_store

    console.rule("[bold]4/5 index into the embedded store")
    encoder = ExportedEncoder.load(export_dir)
    with open_store(f"embedded:{store_dir}") as store:
        with ProgressDisplay(err_console, rate=True) as show:
            report_ix = index_catalog(catalog, encoder, store, model_path=export_dir,
                                      errors_path=store_dir / "errors.jsonl", on_progress=show)
        console.print(report_table(report_ix))
        console.rule("[bold]5/5 query")
        # Query the two attributes this run learned best (lift over chance): on a short CPU run the
        # fine shape attributes may still be at chance, and a demo should show what was learned.
        lift = {a: m - report.chance["per_attribute"].get(a, 0.0) for a, m in report.per_attribute_map.items()}
        best = sorted(lift, key=lift.get, reverse=True)[:2]
        like = splits.test_query[0]
        _show_queries(store, catalog, like, best)
    return like, best[0]


def _show_queries(store: "Store", catalog: "Catalog", like: str, best: list[str]) -> None:
    from fgplugin.query.execute import key_fields, run_query
    from fgplugin.search.spec import QuerySpec, parse_filter

    items = catalog.by_id()
    queries = [
        QuerySpec(attributes={best[0]: 1.0}, like_id=like, k=5),
        QuerySpec(
            attributes={best[0]: 1.0, best[1]: 0.5}, like_id=like, k=5,
            filters=[parse_filter("price<100"), parse_filter("in_stock=true")],
        ),
    ]
    for spec in queries:
        run = run_query(store, spec)
        # The catalog's labels beside each hit, so the reader can see whether the ranking is right.
        shown = [f"{a} (label)" for a in spec.attributes]
        for h in run.result.hits:
            for a, col in zip(spec.attributes, shown):
                h.metadata[col] = items[h.id].labels.get(a) if h.id in items else None
        table = result_table(run, fields=shown + key_fields(spec, run.layout.metadata_types, limit=2))
        table.title = f"like {like} ({', '.join(f'{a}={items[like].labels[a]}' for a in spec.attributes)})"
        console.print(table)
