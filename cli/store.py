"""`fgplugin store ...`: check a store; drop an attribute from it."""

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


@app.command("drop-attribute")
@friendly_errors
def drop_attribute(
    attribute: str = typer.Argument(..., help="The attribute to remove from the index."),
    store: str = typer.Option("embedded:fgplugin-store", "--store", help="embedded:DIR or opensearch:URL."),
    index_name: Optional[str] = typer.Option(None, "--index", help="OpenSearch index name (OpenSearch stores only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Remove an attribute's vectors from the index (embedded: its column; OpenSearch: from every document's
    source, the mapping field stays). Queries naming it are refused; `fgplugin index` with the model it was
    dropped from adds it back (only its vectors are written); any other model that has it is refused."""
    with open_store(store, index=index_name) as st:
        result = st.drop_attribute(attribute)
    if as_json:
        print_json(result)
    else:
        console.print(f"{result['store']}: dropped {result['dropped']} from {result['documents']} documents; the index "
                      f"holds {', '.join(result['attributes'])}", highlight=False)
