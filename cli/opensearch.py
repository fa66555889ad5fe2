"""`fgplugin opensearch setup`: generate (and with --apply register) the OpenSearch side of the encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from fgplugin.card import read_card
from fgplugin.catalog import load_catalog
from fgplugin.opensearch.client import split_url
from fgplugin.opensearch.mlcommons.apply import SetupResult
from fgplugin.opensearch.mlcommons.apply import apply as apply_wiring
from fgplugin.opensearch.mlcommons.bodies import image_query
from fgplugin.opensearch.mlcommons.inputs import WiringOptions, check_serve_url
from fgplugin.opensearch.mlcommons.plan import Step, plan, write_plan
from fgplugin.opensearch.mlcommons.settings import cluster_settings_warnings
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.schema import AttributeSchema
from fgplugin.search.spec import parse_attributes
from fgplugin.stores import parse_store_url

from .common import PS_WARNING, console, err_console, friendly_errors, resolve_secret, warn_password_in_url

app = typer.Typer(no_args_is_help=True)


def _cluster_url(store: str, *, check: bool) -> str:
    """The --store URL of the cluster; with ``check`` (--apply) a malformed one fails here, in one line
    naming the problem, before the model is read."""
    warn_password_in_url(store, param="store", option="--store")
    scheme, cluster = parse_store_url(store)
    if scheme != "opensearch":
        raise typer.BadParameter("--store must be opensearch:URL", param_hint="--store")
    cluster_url = cluster if "://" in cluster else f"http://{cluster}"
    if check:
        split_url(cluster_url)
    return cluster_url


def _catalog_metadata_types(card: dict[str, Any], catalog: Optional[Path]) -> dict[str, str]:
    if catalog is None:
        return {}
    return dict(load_catalog(catalog, AttributeSchema.from_dict(card["schema"]), strict=False).metadata_types)


def _with_index_metadata(os_store: OpenSearchStore, card: dict[str, Any], types: dict[str, str]) -> dict[str, str]:
    """The index's metadata fields, when it was built by this model, under the catalog's."""
    existing = os_store.layout
    if existing is not None and existing.model_version == card["version"]:
        return {**existing.metadata_types, **types}
    return types


def _print_plan(steps: list[Step], *, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps([{"method": s.method, "path": s.path, "body": s.body, "note": s.note}
                                       for s in steps]))
    err_console.print("[dim]not applied (add --apply --store opensearch:URL); cluster settings are printed in "
                      "the first request, applied only with --cluster-settings[/]", highlight=False)


def _print_result(result: SetupResult, cluster_url: str) -> None:
    names = result.names
    table = Table(title=f"OpenSearch wiring for model {names.version} on {cluster_url}")
    for col in ("object", "name", "id", "action"):
        table.add_column(col)
    for r in result.rows:
        table.add_row(r.key, r.name, r.id, r.action)
    console.print(table)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"index documents with their image URL into [bold]{result.index}[/] through "
                  f"[bold]?pipeline={names.ingest_pipeline}[/]; query by image with "
                  f"[bold]?search_pipeline={names.search_pipeline}[/] and "
                  f"{json.dumps(image_query('https://...'))}", highlight=False)


@app.command("setup")
@friendly_errors
def setup(
    model: Path = typer.Option(..., "--model", "-m", help="Export folder (from `fgplugin export`)."),
    serve_url: str = typer.Option(..., "--serve-url", help="How OpenSearch reaches `fgplugin serve`, e.g. "
                                  "http://fgplugin-serve:8080 inside docker compose."),
    index: Optional[str] = typer.Option(None, "--index", help="Index alias (default: the store URL's, else fgplugin)."),
    apply: bool = typer.Option(False, "--apply", help="Register everything on the cluster (idempotent)."),
    store: str = typer.Option("opensearch:http://localhost:9200", "--store",
                              help="opensearch:URL of the cluster for --apply. Credentials: FGPLUGIN_OPENSEARCH_USER/"
                                   "PASSWORD or _API_KEY, or a config file (FGPLUGIN_OPENSEARCH_CONFIG); a password "
                                   "in the URL is visible to every user in `ps`."),
    engine: Optional[str] = typer.Option(
        None, "--engine", envvar="FGPLUGIN_OPENSEARCH_ENGINE", show_default=False,
        help="k-NN engine of a new OpenSearch index: faiss (default) or lucene (pure Java: clusters without the "
             "k-NN native libraries, such as docker/opensearch-node.sh's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write one JSON file per request here."),
    attribute: Optional[List[str]] = typer.Option(
        None, "--attribute", "-a", help="NAME or NAME=WEIGHT for the search pipeline's query (repeat; default: all, 1.0)."),
    filter_: Optional[List[str]] = typer.Option(None, "--filter", "-f", help="Filter of the search pipeline's query."),
    k: int = typer.Option(20, "--k", help="Hits the search pipeline's query returns."),
    mode: str = typer.Option("exact", "--mode", help="exact | ann | ann+rescore (the ann modes need every attribute at weight 1)."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="Catalog whose metadata fields the query returns "
                                           "(with --apply they are read from the index)."),
    serve_token: Optional[str] = typer.Option(
        None, "--serve-token", envvar="FGPLUGIN_SERVE_TOKEN", show_default=False,
        help=f"Bearer token of `fgplugin serve --token` (kept out of --out files). Prefer the env var or "
             f"--serve-token-file: {PS_WARNING}."),
    serve_token_file: Optional[Path] = typer.Option(
        None, "--serve-token-file", envvar="FGPLUGIN_SERVE_TOKEN_FILE", show_default=False,
        help="Read the --serve-token from this file (one line; chmod 600 it)."),
    cluster_settings: bool = typer.Option(False, "--cluster-settings",
                                          help="With --apply: also PUT the ML Commons cluster settings it needs."),
) -> None:
    """Connector, model, ingest/search pipelines, scoring script and search template for an export."""
    # Everything the command line decides is checked before any work (reading the model, the cluster).
    serve_token = resolve_secret(serve_token, serve_token_file, param="serve_token", option="--serve-token",
                                 file_option="--serve-token-file", env="FGPLUGIN_SERVE_TOKEN")
    check_serve_url(serve_url)
    cluster_url = _cluster_url(store, check=apply)
    card = read_card(model)
    metadata_types = _catalog_metadata_types(card, catalog)
    os_store = None
    if apply:
        os_store = OpenSearchStore.from_url(cluster_url, index=index, interactive=True, engine=engine)
        metadata_types = _with_index_metadata(os_store, card, metadata_types)
    options = WiringOptions(
        serve_url=serve_url, index=index or (os_store.alias if os_store else "fgplugin"), token=serve_token,
        attributes=parse_attributes(attribute) if attribute else None, filters=list(filter_ or []), k=k, mode=mode,
        metadata_types=metadata_types,
    )
    steps = plan(card, options)  # checks every generated body; ids are placeholders here
    if out is not None:
        files = write_plan(steps, out)
        err_console.print(f"wrote {len(files)} files to {out}", highlight=False)
    for w in cluster_settings_warnings(options):
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if os_store is None:
        _print_plan(steps, as_json=out is None)
        return
    with os_store:
        result = apply_wiring(card, options, os_store, cluster_settings=cluster_settings)
    _print_result(result, os_store.config.url)
