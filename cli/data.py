"""`fgplugin data ...`: generate, import, split and check catalogs."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from fgplugin.catalog import find_schema, load_catalog
from fgplugin.errors import FgpluginError
from fgplugin.importers import import_preset, import_table
from fgplugin.schema import AttributeSchema
from fgplugin.splits import make_splits
from fgplugin.synth import generate, synth_schema

from .common import console, err_console, friendly_errors, print_json
from .progress import ProgressDisplay

app = typer.Typer(no_args_is_help=True)


def _schema_for(catalog: Path, schema: Optional[Path]) -> AttributeSchema:
    return AttributeSchema.load(schema or find_schema(catalog))


@app.command("check")
@friendly_errors
def check(
    catalog: Path = typer.Argument(..., help="Catalog manifest (.jsonl or .csv)."),
    schema: Optional[Path] = typer.Option(None, help="Attribute schema (default: schema.toml/json beside the catalog)."),
    images: bool = typer.Option(True, "--images/--no-images", help="Open every local image to find missing or corrupt files."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Validate a catalog and print rows, labelled counts per attribute value, and problems."""
    cat = load_catalog(catalog, _schema_for(catalog, schema), strict=False, check_images=images)
    summary = cat.summary()
    if as_json:
        print_json(summary)
    else:
        console.print(f"[bold]{catalog}[/]: {summary['rows']} valid rows, {len(cat.problems)} problem(s)")
        t = Table(title="Labelled counts per attribute value")
        t.add_column("attribute")
        t.add_column("value")
        t.add_column("items", justify="right")
        for a, counts in summary["attributes"].items():
            for i, (v, c) in enumerate(counts.items()):
                t.add_row(a if i == 0 else "", v, str(c))
        console.print(t)
        if summary["metadata_types"]:
            m = Table(title="Metadata fields")
            m.add_column("field")
            m.add_column("type")
            for k, v in summary["metadata_types"].items():
                m.add_row(k, v)
            console.print(m)
        if cat.problems:
            p = Table(title="Problems", style="red")
            p.add_column("row", justify="right")
            p.add_column("id")
            p.add_column("cause")
            for pr in cat.problems:
                p.add_row(str(pr.row or ""), str(pr.item_id or ""), pr.cause)
            console.print(p)
        for note in cat.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    if cat.problems:
        raise typer.Exit(1)


@app.command("split")
@friendly_errors
def split(
    catalog: Path = typer.Argument(..., help="Catalog manifest."),
    seed: int = typer.Option(0, help="Random seed: the split is a function of the ids and the seed."),
    train: float = typer.Option(0.7, help="Fraction for training."),
    valid: float = typer.Option(0.1, help="Fraction for validation."),
    query_fraction: float = typer.Option(0.2, help="Fraction of each evaluation part used as queries (1:4)."),
    schema: Optional[Path] = typer.Option(None, help="Attribute schema (default: beside the catalog)."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: splits.json beside the catalog)."),
) -> None:
    """Write a seeded train/valid/test split with query/candidate partitions."""
    cat = load_catalog(catalog, _schema_for(catalog, schema))
    s = make_splits(cat.ids, seed=seed, fractions=(train, valid, round(1 - train - valid, 6)), query_fraction=query_fraction)
    path = s.save(out or catalog.parent / "splits.json")
    console.print(
        f"wrote {path}: train {len(s.train)}, valid {len(s.valid_query)}+{len(s.valid_candidate)}, "
        f"test {len(s.test_query)}+{len(s.test_candidate)} (query+candidate)"
    )


@app.command("synth")
@friendly_errors
def synth(
    out_dir: Path = typer.Argument(..., help="Output folder (images/, catalog.jsonl, schema.toml, boxes.jsonl, splits.json)."),
    n: int = typer.Option(2000, "-n", "--n", help="Number of items."),
    seed: int = typer.Option(0, help="Seed: same seed, same bytes (whatever the worker count)."),
    size: int = typer.Option(224, help="Image side in pixels."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: min(2, cpu count))."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Render the generated fashion benchmark: garments whose attributes live in different regions."""
    t0 = time.perf_counter()
    with ProgressDisplay(err_console, enabled=progress) as show:
        path = generate(out_dir, n, seed=seed, size=size, workers=workers, on_progress=show)
    elapsed = time.perf_counter() - t0
    schema = synth_schema()
    cat = load_catalog(path, schema)
    t = Table(title=f"{n} items in {elapsed:.1f} s ({n / elapsed:.0f} images/s)")
    t.add_column("attribute")
    t.add_column("region")
    t.add_column("values (items)")
    t.add_column("not visible", justify="right")
    for a in schema:
        c = Counter(it.labels[a.name] for it in cat)
        t.add_row(a.name, a.region or "", ", ".join(f"{v} {c.get(v, 0)}" for v in a.visible_values),
                  str(c.get(a.not_visible, 0)) if a.not_visible else "-")
    console.print(t)
    console.print(f"wrote {path} (+ schema.toml, boxes.jsonl, splits.json, images/)")


def _print_import_report(report) -> None:
    t = Table(title=f"{report.source}: {report.rows_in} rows in, {report.rows_written} written "
                    f"(--rare {report.rare} --min-count {report.min_count})")
    t.add_column("attribute")
    t.add_column("from")
    t.add_column("values kept (rows)")
    t.add_column({"merge": "merged into 'other'", "drop": "rows dropped", "keep": "rare, kept"}[report.rare])
    t.add_column("empty = missing", justify="right")
    for a in report.attributes:
        rare = a.merged or a.dropped or a.rare_kept
        t.add_row(a.name, a.column, ", ".join(f"{v} {k}" for v, k in a.kept.items()),
                  ", ".join(f"{v} {k}" for v, k in rare.items()) or "-", str(a.empty))
    console.print(t)
    for f in report.folds:
        console.print(
            f"[bold]{f.name}[/] folded from {len(f.columns)} flags ({', '.join(f.columns)}): {f.folded} rows with "
            f"exactly one flag yes; missing: {f.ambiguous} ambiguous (several yes), {f.none_yes} with none yes"
        )
    if report.rows_dropped_rare:
        console.print(f"[yellow]{report.rows_dropped_rare} rows dropped for rare values[/]")
    if report.metadata_types:
        console.print("metadata: " + ", ".join(f"{k} ({v})" for k, v in report.metadata_types.items()))
    if report.problems:
        p = Table(title=f"{len(report.problems)} bad row(s) left out", style="red")
        p.add_column("row", justify="right")
        p.add_column("id")
        p.add_column("cause")
        for pr in report.problems:
            p.add_row(str(pr.row or ""), str(pr.item_id or ""), pr.cause)
        console.print(p)
    console.print(f"wrote {report.catalog}, {report.schema}, {report.splits} (seed {report.seed})")


@app.command("import")
@friendly_errors
def import_(
    table: Optional[Path] = typer.Argument(None, help="CSV table of labelled images (generic form; not with --preset)."),
    out: Path = typer.Option(..., "--out", help="Output folder for catalog.jsonl, schema.toml, splits.json."),
    preset: Optional[str] = typer.Option(None, help="A known data set: fpi (fashion-product-images) or clothing (clothing-attributes)."),
    source: Optional[Path] = typer.Option(None, help="The preset's data folder, e.g. ../shared/fashion-product-images."),
    id_column: str = typer.Option("id", help="Column holding the item id."),
    image_template: str = typer.Option("images/{id}.jpg", help="Image path from the row's columns, e.g. 'images/{id}.jpg'."),
    image_root: Optional[Path] = typer.Option(None, help="Folder relative image paths start from (default: the table's folder)."),
    attribute: list[str] = typer.Option([], "--attribute", "-a", help="Attribute column (repeat). Names become lower-case identifiers."),
    metadata: list[str] = typer.Option([], "--metadata", "-m", help="Metadata column, optionally COLUMN:TYPE (repeat)."),
    fold: list[str] = typer.Option([], "--fold", help="NAME=PREFIX: fold yes/no flag columns PREFIX* into one attribute (repeat)."),
    rare: str = typer.Option("merge", help="Values rarer than --min-count: merge (into 'other'), drop (the rows) or keep."),
    min_count: int = typer.Option(20, help="A value with fewer rows than this is rare."),
    seed: int = typer.Option(0, help="Seed of the train/valid/test and query/candidate split."),
    name: Optional[str] = typer.Option(None, help="Schema name (default: the table's folder name)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave bad rows out (listed) instead of stopping."),
    absolute_paths: bool = typer.Option(False, "--absolute-paths", help="Write absolute image paths (default: relative to the catalog)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Import a labelled table of images as a catalog + schema + splits (the images are not copied)."""
    if preset:
        if table is not None or attribute or metadata or fold:
            raise FgpluginError("--preset sets the table and the columns itself; drop TABLE/--attribute/--metadata/--fold")
        if source is None:
            raise FgpluginError("--preset needs --source (the data set's folder)")
        report = import_preset(preset, source, out, rare=rare, min_count=min_count, seed=seed,
                               strict=not skip_bad, absolute_paths=absolute_paths)
    else:
        if table is None:
            raise FgpluginError("give a TABLE (CSV) or --preset with --source")
        folds = {}
        for f in fold:
            if "=" not in f:
                raise FgpluginError(f"--fold {f!r}: use NAME=PREFIX, e.g. pattern=pattern_")
            k, v = f.split("=", 1)
            folds[k.strip()] = v.strip()
        report = import_table(
            table, out, id_column=id_column, image_template=image_template, image_root=image_root,
            attributes=attribute, metadata=metadata, folds=folds, rare=rare, min_count=min_count, seed=seed,
            name=name, strict=not skip_bad, absolute_paths=absolute_paths,
        )
    if as_json:
        print_json(report.to_dict())
    else:
        _print_import_report(report)
