"""`fgplugin store ...`: check a store."""

from __future__ import annotations

from typing import Optional

import typer

from fgplugin.stores import open_store

from .common import console, friendly_errors, print_json

app = typer.Typer(no_args_is_help=True)


@app.command("verify")
@friendly_errors
def verify(
    store: str = typer.Option("embedded:fgplugin-store", "--store", help="embedded:DIR or opensearch:URL."),
    index_name: Optional[str] = typer.Option(None, "--index", help="OpenSearch index name (OpenSearch stores only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Read every document of a store whole: a damaged file (checksum failure, truncation) is reported
    (exit 2) instead of failing later in a query. `fgplugin index` runs the same check first."""
    with open_store(store, index=index_name, read_only=True, interactive=True) as st:
        result = st.verify()
    if as_json:
        print_json(result)
    else:
        codec = f", codec {result['codec']}" if result.get("codec") else ""
        console.print(f"{result['store']}: {result['documents']} documents{codec}, every value readable", highlight=False)
