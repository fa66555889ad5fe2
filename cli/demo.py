"""`fgplugin demo`: the whole job end to end on generated data, in one command.

generate a catalog -> train a small model -> evaluate -> export -> index into the embedded store ->
show what attribute-specific similarity does that a whole-image embedding does not. Each step calls
the same library function its own command calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import typer
from rich.table import Table

from .common import SideBySide, console, err_console, friendly_errors
from .index import report_table
from .progress import ProgressDisplay
from .query import result_table

if TYPE_CHECKING:
    from fgplugin.catalog import Catalog
    from fgplugin.evaluation import EvalReport
    from fgplugin.search.store import Store
    from fgplugin.splits import Splits


# Small settings so the demo learns every attribute in about three minutes on a two-core CPU
# (measured, README "Set-up"): the ImageNet EfficientNet-Lite0 trunk from its PyPI weight wheel at
# 96 px, its two first stages kept as loaded (no backward pass through them: the costliest part of a
# CPU step), ASEN's attention heads on the stride-16 ImageNet features plus AG-MLAN's classification
# branch on the trained last stage, its posterior in each attribute's vector. A fixed step count, so
# the same seed prints the same figures on any machine; the time budget is only a safety cap.
DEMO_SMALL = {
    "trunk": "efficientnet_lite0",
    "trunk_weights": "imagenet",
    "mean": [0.5, 0.5, 0.5],  # the TF-Lite weights expect [-1, 1] pixels
    "std": [0.5, 0.5, 0.5],
    "freeze_stages": 2,
    "embed_dim": 64,
    "attr_embed_dim": 32,
    "asa_dim": 32,
    "batch_size": 16,
    "steps": 300,
    "eval_every": 100,
    "lr": 1e-3,
    "mining": "batch_all",
    "cls_weight": 1.0,
    "classifier": "linear",
    "proxy_share": 0.5,
}
DEMO_VARIANT = "asen"
DEMO_IMAGE_SIZE = 96
WHOLE_IMAGE = "efficientnet_lite0"  # the whole-image embedding the demo compares against (ImageNet, as shipped)
SHOWN = ("sleeve_length", "colour")  # the single-attribute query, and the attribute its hits should vary in
PAIR = ("neckline", "collar")  # the two-attribute query ("this neckline and that collar")
FILTERS = ("price<100", "in_stock=true")


@friendly_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Working folder (data, run, export, store)."),
    n: int = typer.Option(2000, help="Number of generated catalog items."),
    image_size: int = typer.Option(DEMO_IMAGE_SIZE, help="Model input size (small on CPU)."),
    budget: str = typer.Option("8m", help="Safety cap on training time, e.g. 90s, 3m (training stops there; "
                                          "the figures then depend on this machine's speed)."),
    variant: str = typer.Option(DEMO_VARIANT, help="Model variant."),
    seed: int = typer.Option(0, help="Seed for data, split and training."),
    set_: list[str] = typer.Option(None, "--set", help="Any model/training config key: --set key=value."),
) -> None:
    """Generate data, train, export, index and query: everything on this machine, no server."""
    t0 = time.perf_counter()
    data_dir, run_dir, export_dir, store_dir = out / "data", out / "run", out / "export", out / "store"
    catalog, splits = _generate(data_dir, n, seed)
    t_train = time.perf_counter()
    checkpoint = _train(catalog, splits, run_dir, variant=variant, budget=budget, image_size=image_size, seed=seed,
                        settings=set_ or [])
    t_train = time.perf_counter() - t_train
    _evaluate_and_export(checkpoint, catalog, splits, data_dir, export_dir)
    like = _index_and_query(catalog, splits, export_dir, store_dir, image_size)
    console.print(f"[green]demo finished in {time.perf_counter() - t0:.0f} s[/] (training {t_train:.0f} s); try: "
                  f"fgplugin query --store embedded:{store_dir} --like {like} --attr {PAIR[0]} --attr {PAIR[1]}",
                  highlight=False)


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

    overrides = dict(DEMO_SMALL)
    overrides.update({"image_size": image_size, "seed": seed})
    overrides.update(parse_overrides(settings))
    config = load_config(variant, overrides)
    console.rule(f"[bold]2/5 train {variant} ({config.train.steps} steps, cap {budget})")
    with ProgressDisplay(err_console) as show:
        result = train(config, catalog, splits, run_dir, budget_s=parse_budget(budget), resume=True, on_progress=show)
    if result.stopped == "budget":
        console.print(f"[yellow]note:[/] training stopped at the {budget} cap after {result.steps} of "
                      f"{result.total_steps} steps, so these figures depend on this machine's speed; "
                      "run again to continue from there", highlight=False)
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
    console.print(map_table(report))
    export_model(checkpoint, export_dir, eval_report=report, catalog=catalog)
    return report


def map_table(report: "EvalReport") -> Table:
    """Test MAP per attribute beside chance (ranking the candidates at random) and the lift over it."""
    t = Table(title="Test retrieval (papers' protocol), MAP %")
    t.add_column("attribute", no_wrap=True)
    t.add_column("MAP", justify="right")
    t.add_column("chance", justify="right")
    t.add_column("above chance", justify="right")
    chance = report.chance["per_attribute"]
    for a, m in report.per_attribute_map.items():
        c = chance.get(a, float("nan"))
        t.add_row(a, f"{100 * m:.1f}", f"{100 * c:.1f}", f"{100 * (m - c):+.1f}")
    m, c = report.overall_weighted, report.chance["overall_weighted"]
    t.add_row("[bold]overall (query-weighted)", f"{100 * m:.1f}", f"{100 * c:.1f}", f"{100 * (m - c):+.1f}")
    if report.triplet_accuracy is not None:
        t.caption = f"triplet accuracy {100 * report.triplet_accuracy:.1f} % (chance 50 %)"
    return t


def _index_and_query(catalog: "Catalog", splits: "Splits", export_dir: Path, store_dir: Path,
                     image_size: int) -> str:
    """Steps 4 and 5; returns the reference id (for the closing hint)."""
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
        like = reference_item(catalog, splits)
        _show_single_attribute(store, catalog, like, image_size)
        _show_pair_with_filter(store, catalog, like)
    return like


def reference_item(catalog: "Catalog", splits: "Splits") -> str:
    """The first test query whose shown attributes are all visible (chosen by its labels, not by results)."""
    items = catalog.by_id()
    schema = catalog.schema
    wanted = [a for a in (*SHOWN, *PAIR) if a in schema.names]
    for i in splits.test_query:
        labels = items[i].labels
        if all(labels.get(a) not in (None, schema[a].not_visible) for a in wanted):
            return i
    return splits.test_query[0]


def _show_single_attribute(store: "Store", catalog: "Catalog", like: str, image_size: int) -> None:
    """The hits for one attribute beside what a whole-image embedding returns for the same item."""
    from fgplugin.query.execute import run_query
    from fgplugin.search.spec import QuerySpec

    attr, other = SHOWN
    items = catalog.by_id()
    ref = items[like].labels
    run = run_query(store, QuerySpec(attributes={attr: 1.0}, like_id=like, k=5))
    ours = [h.id for h in run.result.hits]
    theirs = whole_image_neighbours(catalog, like, k=5, image_size=image_size)
    console.print(f"[bold]Same {attr} as {like}[/] ({attr}={ref.get(attr)}, {other}={ref.get(other)}): "
                  f"this model's {attr} vectors, and the whole image (ImageNet {WHOLE_IMAGE} pooled "
                  "features, as shipped)", highlight=False)
    left = _labelled_hits(f"by {attr}", ours, items, (attr, other), ref)
    if theirs is None:
        console.print(left)
        console.print("(no whole-image comparison: the ImageNet trunk is not installed; "
                      "pip install 'fgplugin[train]')", highlight=False)
        return
    console.print(SideBySide(left, _labelled_hits("whole image", theirs, items, (attr, other), ref)))


def _labelled_hits(title: str, ids: Sequence[str], items: dict, attrs: Sequence[str], ref: dict) -> Table:
    """Hits with their catalog labels, the first ticked where it equals the reference's; the caption counts."""
    t = Table(title=title)
    t.add_column("id", no_wrap=True)
    for a in attrs:
        t.add_column(a)
    for i in ids:
        lab = items[i].labels if i in items else {}
        # Only the queried attribute is ticked: the others are there to show that they differ.
        t.add_row(i, _mark(lab.get(attrs[0]), ref.get(attrs[0])), *[lab.get(a) or "" for a in attrs[1:]])
    t.caption = f"{_agree(ids, items, attrs[0], ref)} same {attrs[0]}"
    return t


def _show_pair_with_filter(store: "Store", catalog: "Catalog", like: str) -> None:
    from fgplugin.query.execute import run_query
    from fgplugin.search.spec import QuerySpec, parse_filter

    items = catalog.by_id()
    spec = QuerySpec(attributes={PAIR[0]: 1.0, PAIR[1]: 1.0}, like_id=like, k=5,
                     filters=[parse_filter(f) for f in FILTERS])
    run = run_query(store, spec)
    ref = items[like].labels
    shown = [f"{a} (label)" for a in PAIR]
    for h in run.result.hits:  # the catalog's labels beside each hit, so the reader sees whether it worked
        for a, col in zip(PAIR, shown):
            h.metadata[col] = _mark(items[h.id].labels.get(a), ref.get(a)) if h.id in items else None
    table = result_table(run, fields=shown + ["price", "in_stock"])
    # The labels and the filtered fields show that it worked; the cosines go first on a narrow console.
    table.drop_order = [f"cos {a}" for a in reversed(PAIR)] + table.drop_order
    table.table.title = (f"{PAIR[0]} and {PAIR[1]} of {like} ({', '.join(f'{a}={ref.get(a)}' for a in PAIR)}), "
                         f"filtered: {' and '.join(FILTERS)}")
    console.print(table)


def _mark(value: str | None, wanted: str | None) -> str:
    """A label, ticked where it equals the reference's."""
    if value is None:
        return ""
    return f"{value}\u00a0✓" if value == wanted else value  # no-break space: the tick never wraps alone


def _agree(ids: Sequence[str], items: dict, attr: str, ref: dict) -> str:
    same = sum(1 for i in ids if i in items and items[i].labels.get(attr) == ref.get(attr))
    return f"{same}/{len(ids)}"


def whole_image_neighbours(catalog: "Catalog", like: str, *, k: int, image_size: int) -> list[str] | None:
    """The ``k`` catalog items nearest to ``like`` by the cosine of ImageNet-pretrained whole-image features
    (the trunk's pooled last stage, as shipped): what a generic image embedding returns. None when the
    pretrained trunk is not installed."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from fgplugin.dataset import CatalogImages
    from fgplugin.models.pretrained import PretrainedWeightsMissing, recommended_preprocess
    from fgplugin.models.trunks import build_trunk

    try:
        trunk = build_trunk(WHOLE_IMAGE, "imagenet").eval()
    except (PretrainedWeightsMissing, ModuleNotFoundError):
        return None
    ids = catalog.ids
    images = CatalogImages(catalog, ids, recommended_preprocess(WHOLE_IMAGE, image_size).transform())
    feats = []
    with torch.inference_mode():
        for x, _ in DataLoader(images, batch_size=64):
            feats.append(torch.nn.functional.normalize(trunk(x)[-1].mean((2, 3)), dim=1).numpy())
    v = np.concatenate(feats)
    q = ids.index(like)
    sims = v @ v[q]
    sims[q] = -np.inf
    order = sorted(range(len(ids)), key=lambda r: (-sims[r], ids[r]))  # ties by id, as the stores break them
    return [ids[r] for r in order[:k]]
