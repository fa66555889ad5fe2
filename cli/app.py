"""`fgplugin` entry point: registers each command group from its own module.

Each command parses its options, makes one library call and renders the data it gets back (tables and
progress bars live here, never in ``fgplugin``). Command modules import the library parts that need
torch (training, evaluation, export, encoding, the server) inside the command, so `fgplugin --help` and
the client commands (query, store, opensearch setup, data) start and run on the core install; a command
that needs an extra says which (``common.friendly_errors``). tests/test_extras.py checks both."""

from __future__ import annotations

import typer

from fgplugin import __version__

from . import data, demo, evaluate, explore, export, index, opensearch, query, serve, store, train

app = typer.Typer(
    name="fgplugin",
    help="Fine-grained, attribute-specific image similarity for fashion catalogs, served through OpenSearch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data", help="Generate, import, split and check catalogs.")
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("export")(export.export)
app.command("index")(index.index)
app.command("query")(query.query)
app.command("serve")(serve.serve)
app.command("explore")(explore.explore)
app.add_typer(opensearch.app, name="opensearch", help="Generate and register the OpenSearch wiring.")
app.add_typer(store.app, name="store", help="Check a store (every value readable).")
app.command("demo")(demo.demo)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """Fine-grained, attribute-specific image similarity for fashion catalogs."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
