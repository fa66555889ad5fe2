"""`fgplugin index`: encode a catalog with an exported model and write it into a store (resumable)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from fgplugin.catalog import find_schema, load_catalog
from fgplugin.codecs import CODECS
from fgplugin.errors import FgpluginError
from fgplugin.images import DEFAULT_LIMITS
from fgplugin.schema import AttributeSchema
from fgplugin.stores import check_store_url, open_store

from .common import console, err_console, friendly_errors, print_json
from .progress import ProgressDisplay

if TYPE_CHECKING:  # the indexer and the export (torch) load when the command runs, not at every CLI start
    from fgplugin.export import ExportedEncoder
    from fgplugin.indexer import IndexReport


@friendly_errors
def index(  # long: one Typer option per flag (the signature is the command's documentation)
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
        None, "--errors", help="Errors file (default: DIR/errors.jsonl for embedded stores, INDEX.errors.jsonl here "
                               "otherwise; with --shard I/N, errors.shard-I-of-N.jsonl and INDEX.errors.shard-I-of-N.jsonl)."
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
        help="OpenSearch, new model version: switch the alias to the new index (default: once it holds every item; "
             "never in a --shard run, since other shards may not be done).",
    ),
    shard: Optional[str] = typer.Option(
        None, "--shard", metavar="I/N", show_default=False,
        help="Handle only the items whose id hashes into shard I of N (0 <= I < N, e.g. 0/4 .. 3/4): N workers "
             "(machines or GPUs) index disjoint parts of one catalog into one store (OpenSearch: at the same time; "
             "embedded: one after another). Each resumes, reports and removes only its own items, with its own "
             "errors file. Refused with --prune (run an unsharded --prune once all are done); does not switch an "
             "OpenSearch alias to a new model's index unless --promote is given.",
    ),
    engine: Optional[str] = typer.Option(
        None, "--engine", envvar="FGPLUGIN_OPENSEARCH_ENGINE", show_default=False,
        help="k-NN engine of a new OpenSearch index: faiss (default) or lucene (pure Java: clusters without the "
             "k-NN native libraries, such as docker/opensearch-node.sh's)."),
    codec: Optional[str] = typer.Option(
        None, "--codec", show_default=False,
        help="How the store keeps the vectors: float32, float16, int8 or binary (sign bits rescored on int8 codes); "
             "default: the model card's storage.codec, else float32. A store holds one codec: another is refused "
             "(OpenSearch: a new codec builds a new index behind the alias). See README 'Compact vectors'."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (no progress bar)."),
) -> None:
    """Index a catalog: skips items already current, re-encodes changed images, rewrites changed metadata,
    reports every failure; exit 1 if anything is not indexed."""
    from fgplugin.indexer import Shard, index_catalog, refuse_prune_in_shard  # torch: imported when the command runs

    part = Shard.parse(shard) if shard is not None else None  # bad --shard or --prune with it: exit 2 before any work
    refuse_prune_in_shard(part, prune)
    if codec is not None and codec not in CODECS:  # exit 2 before the model is loaded
        raise typer.BadParameter(f"{codec!r} is not a codec; use one of {', '.join(CODECS)}", param_hint="--codec")
    check_store_url(store)  # a typo in --store is reported before the model is loaded
    encoder = _load_encoder(model, catalog, schema, device)
    cat = load_catalog(catalog, encoder.schema, strict=False)
    st = open_store(store, index=index_name, engine=engine)
    try:
        errors_path = errors if errors is not None else st.default_errors_path()
        if part is not None and errors is None:
            errors_path = part.errors_path(errors_path)
        if not as_json:
            what = f"shard {part} of the {len(cat)} items" if part is not None else f"{len(cat)} items"
            console.print(
                f"indexing {what} of {catalog} with {encoder.card.get('variant')} "
                f"{encoder.version[:12]} on {encoder.device} into {st.url}",
                highlight=False,
            )
        with ProgressDisplay(err_console, enabled=not as_json, rate=True) as show:
            report = index_catalog(
                cat, encoder, st, batch_size=batch_size, workers=workers, errors_path=errors_path,
                retry_errors=retry_errors, prune=prune, max_removal=max_removal / 100, on_progress=show,
                limits=replace(DEFAULT_LIMITS, timeout_s=timeout), model_path=model, promote=promote, shard=part,
                codec=codec,
            )
    finally:
        st.close()
    _print_report(report, as_json)
    if report.aborted and report.aborted.startswith("interrupted"):
        raise typer.Exit(130)  # the shell's code for a run ended by Ctrl-C
    if not report.ok:
        raise typer.Exit(1)


def _print_report(report: IndexReport, as_json: bool) -> None:
    if as_json:
        print_json(report.to_dict())
    else:
        console.print(report_table(report))
        if report.errors_in_file:
            err_console.print(f"failures are listed in {report.errors_path}", highlight=False)


def _load_encoder(model: Path, catalog: Path, schema: Optional[Path], device: str) -> "ExportedEncoder":
    """The export, refused (naming the difference) if it was trained for another schema than the one
    beside the catalog or given with --schema; with neither, the catalog is read with the model's own."""
    from fgplugin.export import ExportedEncoder  # torch: imported when the command runs

    if schema is None:
        try:
            schema = find_schema(catalog)
        except FgpluginError:
            schema = None
    declared = AttributeSchema.load(schema) if schema is not None else None
    return ExportedEncoder.load(model, schema=declared, device=device)


def report_table(report: IndexReport) -> Table:
    """The index report as the CLI shows it."""
    t = Table(title="fgplugin index", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    # Long values (the errors file's path, notes) fold onto more lines rather than being cut.
    t.add_column("", justify="right", overflow="fold")
    t.add_row(f"catalog items (shard {report.shard})" if report.shard else "catalog items", str(report.catalog_items))
    t.add_row("[green]indexed", str(report.indexed))
    t.add_row("[green]metadata updated", str(report.metadata_updated))
    if report.added_attributes:
        t.add_row("[green]attributes added", ", ".join(report.added_attributes))
    if report.extended or report.added_attributes:
        t.add_row("[green]extended (added vectors only)", str(report.extended))
    t.add_row("skipped: already current", str(report.skipped_current))
    if report.skipped_failed:
        t.add_row("[yellow]skipped: failed before (--retry-errors)", str(report.skipped_failed))
    if report.not_attempted:
        t.add_row("[yellow]not attempted (run without --retry-errors)", str(report.not_attempted))
    for cause, n in report.failed_by_cause().items():
        t.add_row(f"[red]failed: {cause}", str(n))
    if report.stale_removed:
        t.add_row("[red]out-of-date documents removed (update failed)", str(report.stale_removed))
    if report.invalid_removed:
        t.add_row("[red]documents of invalid rows removed", str(report.invalid_removed))
    if report.pruned:
        t.add_row("pruned (not in catalog)", str(report.pruned))
    elif report.orphans:
        t.add_row("[yellow]in store, not in catalog (--prune)", str(report.orphans))
    if report.not_pruned:
        t.add_row("[bold red]not pruned", report.not_pruned)
    if report.removal_refused:
        t.add_row("[bold red]nothing removed", report.removal_refused)
    for note in report.notes:
        t.add_row("[yellow]note", note)
    if report.promoted:
        t.add_row("[green]now serving", report.promoted)
    if report.not_promoted:
        t.add_row("[yellow]not serving yet", report.not_promoted)
    if report.codec:
        t.add_row("index codec", report.codec)
    if report.errors_path and report.errors_in_file:
        t.add_row("errors file", f"{report.errors_path} ({report.errors_in_file} lines)")
    rate = report.indexed / report.elapsed_s if report.elapsed_s > 0 else 0.0
    t.add_row("time", f"{report.elapsed_s:.1f} s ({rate:.1f} items/s)")
    tm = report.timings
    t.add_row("time split", f"model {tm.model_s:.1f} s, waiting for images {tm.wait_s:.1f} s, "
                            f"store writes {report.write_s:.1f} s")
    if report.aborted:
        t.add_row("[bold red]aborted", report.aborted)
    return t
