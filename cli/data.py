"""`fgplugin data ...`: generate, import, split and check catalogs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import console, friendly_errors, not_built, print_json

app = typer.Typer(no_args_is_help=True)


def _schema_for(catalog: Path, schema: Optional[Path]):
    from fgplugin.catalog import find_schema
    from fgplugin.schema import AttributeSchema

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
    from fgplugin.catalog import load_catalog

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
    from fgplugin.catalog import load_catalog
    from fgplugin.splits import make_splits

    cat = load_catalog(catalog, _schema_for(catalog, schema))
    s = make_splits(cat.ids, seed=seed, fractions=(train, valid, round(1 - train - valid, 6)), query_fraction=query_fraction)
    path = s.save(out or catalog.parent / "splits.json")
    console.print(
        f"wrote {path}: train {len(s.train)}, valid {len(s.valid_query)}+{len(s.valid_candidate)}, "
        f"test {len(s.test_query)}+{len(s.test_candidate)} (query+candidate)"
    )


@app.command("synth")
def synth() -> None:
    """Not built yet: render the generated fashion benchmark."""
    not_built("data synth", "foundation issue")


@app.command("import")
def import_() -> None:
    """Not built yet: import a labelled table of images as a catalog + schema."""
    not_built("data import", "foundation issue")
