"""`fgplugin query`: rank the catalog by a weighted sum of per-attribute cosines, with metadata filters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Sequence

import typer
from rich.table import Table

from fgplugin.errors import OutputError, QueryError
from fgplugin.query.execute import QueryRun, key_fields, opensearch_body, reference_label, result_to_dict, run_query
from fgplugin.search.spec import QuerySpec, filter_fields, parse_attributes, parse_filter
from fgplugin.stores import open_store

from .common import FitWidth, check_writable, console, err_console, friendly_errors, print_json, warn_password_in_url

STORE_HELP = ("embedded:DIR or opensearch:URL. OpenSearch credentials: FGPLUGIN_OPENSEARCH_USER/PASSWORD or "
              "_API_KEY, or a config file (FGPLUGIN_OPENSEARCH_CONFIG); a password in the URL is visible to "
              "every user in `ps`.")


@friendly_errors
def query(
    like: Optional[str] = typer.Option(None, "--like", help="Catalog id of the reference item (already indexed)."),
    image: Optional[str] = typer.Option(None, "--image", help="Reference image: a path or an http(s) URL (needs the encoder)."),
    attr: List[str] = typer.Option(
        [], "--attr", help="Attribute to compare on, NAME or NAME=WEIGHT (repeat for several; weights default to 1)."
    ),
    filter_: List[str] = typer.Option(
        [], "--filter",
        help="Metadata filter (repeat; all must hold): f=v, f=a,b, f!=v, f<n, f<=n, f>n, f>=n, has:f, !has:f.",
    ),
    k: int = typer.Option(20, "-k", "--k", help="Number of results."),
    mode: str = typer.Option("exact", "--mode", help="exact, ann or ann+rescore (the embedded store is always exact)."),
    store: str = typer.Option("embedded:fgplugin-store", "--store", help=STORE_HELP),
    index: Optional[str] = typer.Option(None, "--index", help="OpenSearch index name (OpenSearch stores only)."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Export folder for --image (default: the one the store was indexed with)."
    ),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Training checkpoint for --explain heat maps (an export has no attention maps)."
    ),
    include_self: bool = typer.Option(False, "--include-self", help="Keep the --like item in its own results."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    html_out: Optional[Path] = typer.Option(
        None, "--html", help="Also write a self-contained HTML page here (checked before the query runs)."),
    explain: bool = typer.Option(
        False, "--explain", help="Print the compiled OpenSearch request; with --html, add attention heat maps."
    ),
) -> None:
    """Find the items most similar to a reference on the chosen attributes (weighted sum of cosines)."""
    if (like is None) == (image is None):
        raise QueryError("give exactly one reference: --like ID or --image PATH_OR_URL")
    if not attr:
        raise QueryError("choose at least one attribute with --attr NAME[=WEIGHT]")
    spec = QuerySpec(
        attributes=parse_attributes(attr),
        like_id=like,
        image=image,
        filters=[parse_filter(f) for f in filter_],
        k=k,
        mode=mode,
        exclude_self=not include_self,
    )
    if html_out is not None:
        check_writable(html_out, "--html")  # an unwritable path fails now, not after the query
    warn_password_in_url(store, param="store", option="--store")
    st = open_store(store, index=index, read_only=True, interactive=True)
    html_error = None
    try:
        run = run_query(st, spec, model=str(model) if model else None)
        if explain:
            _print_explain(run, as_json)
        if html_out is not None:
            from fgplugin.query.html import write_report  # imported when a page is asked for

            if explain and checkpoint is not None and run.query_image is not None:
                from fgplugin.loading import load_encoder  # torch: only for attention maps

                run.explainer = load_encoder(checkpoint, device="cpu")
            try:
                path = write_report(run, html_out, explain=explain)
            except OSError as e:  # passed the early check, failed anyway (disk full, a race): results still print
                html_error = OutputError(f"--html {html_out}: cannot write it ({e.strerror or e.__class__.__name__})")
            else:
                if not as_json:
                    err_console.print(f"wrote {path}", highlight=False)
    finally:
        st.close()
    if as_json:
        print_json(result_to_dict(run))
    else:
        console.print(result_table(run))
        for n in run.notes:
            console.print(f"[yellow]note:[/] {n}", highlight=False)
    if html_error is not None:
        raise html_error


def _print_explain(run, as_json: bool) -> None:
    """The OpenSearch request this query compiles to (printed to stderr with --json, so stdout stays JSON)."""
    out = err_console if as_json else console
    if run.result.plan:
        out.print(f"[bold]plan:[/] {run.result.plan}", highlight=False)
    body = opensearch_body(run)
    out.print(f"[bold]OpenSearch request body[/] ({run.spec.mode} mode; long vectors shortened):", highlight=False)
    out.print_json(json.dumps(_shorten_vectors(body)))


def _shorten_vectors(obj, keep: int = 4):
    """Replace long number lists by their first values and a count, so the body stays readable."""
    if isinstance(obj, dict):
        return {k: _shorten_vectors(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > keep * 2 and all(isinstance(x, (int, float)) for x in obj):
            return [round(float(x), 4) for x in obj[:keep]] + [f"... {len(obj) - keep} more"]
        return [_shorten_vectors(x, keep) for x in obj]
    return obj


def result_table(run: QueryRun, fields: Sequence[str] | None = None) -> FitWidth:
    """The hits as the CLI shows them: score, each attribute's cosine and a few metadata columns. Ids are
    never cut; on a narrow console the metadata columns not filtered on go first, then the filtered ones,
    then the cosines of all but the first attribute (``--json`` has everything)."""
    spec, r = run.spec, run.result
    attrs = list(spec.attributes)
    fields = key_fields(spec, run.layout.metadata_types) if fields is None else list(fields)
    weights = ", ".join(f"{a}={w:g}" for a, w in spec.attributes.items())
    total = "" if r.total_candidates is None else f", {r.total_candidates} candidates"
    table = Table(title=f"{reference_label(spec)} by {weights} ({r.mode}{total})", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("id", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    for a in attrs:
        table.add_column(f"cos {a}", justify="right")
    for f in fields:
        table.add_column(f)
    for i, h in enumerate(r.hits, start=1):
        cos = [f"{h.cosines[a]:.4f}" if a in h.cosines else "—" for a in attrs]
        meta = [_short(h.metadata.get(f)) for f in fields]
        table.add_row(str(i), h.id, f"{h.score:.4f}", *cos, *meta)
    filtered = filter_fields(spec.filters)
    drop = [f for f in reversed(fields) if f not in filtered] + [f for f in reversed(fields) if f in filtered]
    return FitWidth(table, drop + [f"cos {a}" for a in reversed(attrs[1:])])


def _short(v: Any, n: int = 24) -> str:
    if v is None:
        return ""
    s = f"{v:g}" if isinstance(v, float) else str(v)
    return s if len(s) <= n else s[: n - 1] + "…"
