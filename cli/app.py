"""`fgplugin` entry point: registers each command group from its own module."""

from __future__ import annotations

import typer

from . import data, demo, evaluate, export, index, opensearch, query, serve, store, train

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
app.add_typer(opensearch.app, name="opensearch", help="Generate and register the OpenSearch wiring.")
app.add_typer(store.app, name="store", help="Check a store (every value readable).")
app.command("demo")(demo.demo)


def _print_version(value: bool) -> None:
    if value:
        from fgplugin import __version__

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
