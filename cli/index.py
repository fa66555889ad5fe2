"""`fgplugin index`: encode a catalog with an exported model and write it into a store (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, err_console, friendly_errors, print_json


@friendly_errors
def index(
    catalog: Path = typer.Option(..., "--catalog", help="Catalog manifest (.jsonl or .csv)."),
    model: Path = typer.Option(..., "--model", help="Export folder written by `fgplugin export`."),
    store: str = typer.Option("embedded:fgplugin-store", "--store", help="embedded:DIR or opensearch:URL."),
    index_name: Optional[str] = typer.Option(None, "--index", help="OpenSearch index name (OpenSearch stores only)."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Schema file (default: the one beside the catalog)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per model batch (and per store write)."),
    workers: int = typer.Option(4, "--workers", min=1, help="Threads reading and decoding images."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda, cuda:1, ..."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per image download attempt."),
    errors: Optional[Path] = typer.Option(
        None, "--errors", help="Errors file (default: DIR/errors.jsonl for embedded stores, INDEX.errors.jsonl here otherwise)."
    ),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Reprocess only the items in the errors file."),
    prune: bool = typer.Option(
        False, "--prune",
        help="Delete documents whose ids are in no row of the catalog; refused while any row cannot be read or has no id.",
    ),
    max_removal: float = typer.Option(
        10.0, "--max-removal", min=0.0, max=100.0, metavar="PERCENT",
        help="Most documents (percent of those stored) one run may remove: pruned, of invalid rows, or whose update "
             "failed. Past it nothing is removed and the report says how many and why; raise it to confirm.",
    ),
    promote: Optional[bool] = typer.Option(
        None, "--promote/--no-promote",
        help="OpenSearch, new model version: switch the alias to the new index (default: once it holds every item).",
    ),
    engine: Optional[str] = typer.Option(
        None, "--engine", envvar="FGPLUGIN_OPENSEARCH_ENGINE", show_default=False,
        help="k-NN engine of a new OpenSearch index: faiss (default) or lucene (pure Java: clusters without the "
             "k-NN native libraries, such as docker/opensearch-node.sh's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (no progress bar)."),
) -> None:
    """Index a catalog: skips items already current, re-encodes changed images, rewrites changed metadata,
    reports every failure; exit 1 if anything is not indexed."""
    from dataclasses import replace

    from fgplugin.catalog import find_schema, load_catalog
    from fgplugin.errors import FgpluginError
    from fgplugin.export import ExportedEncoder
    from fgplugin.images import DEFAULT_LIMITS
    from fgplugin.indexer import default_errors_path, index_catalog, report_table
    from fgplugin.schema import AttributeSchema
    from fgplugin.stores.open import check_store_url, open_store

    check_store_url(store)  # a typo in --store is reported before the model is loaded
    if schema is None:
        try:
            schema = find_schema(catalog)
        except FgpluginError:
            schema = None  # no schema beside the catalog: read it with the model's own schema
    declared = AttributeSchema.load(schema) if schema is not None else None
    # load(schema=...) refuses an export trained for another schema, naming the difference.
    encoder = ExportedEncoder.load(model, schema=declared, device=device)
    cat = load_catalog(catalog, encoder.schema, strict=False)
    st = open_store(store, index=index_name, engine=engine)
    try:
        errors_path = errors if errors is not None else default_errors_path(st, index_name)
        if not as_json:
            console.print(
                f"indexing {len(cat)} items of {catalog} with {encoder.card.get('variant')} "
                f"{encoder.version[:12]} on {encoder.device} into {getattr(st, 'url', store)}",
                highlight=False,
            )
        report = index_catalog(
            cat, encoder, st, batch_size=batch_size, workers=workers, errors_path=errors_path,
            retry_errors=retry_errors, prune=prune, max_removal=max_removal / 100, progress=not as_json,
            limits=replace(DEFAULT_LIMITS, timeout_s=timeout), model_path=model, promote=promote,
        )
    finally:
        st.close()
    if as_json:
        print_json(report.to_dict())
    else:
        console.print(report_table(report))
        if report.errors_in_file:
            err_console.print(f"failures are listed in {report.errors_path}", highlight=False)
    if report.aborted and report.aborted.startswith("interrupted"):
        raise typer.Exit(130)  # the shell's code for a run ended by Ctrl-C
    if not report.ok:
        raise typer.Exit(1)
