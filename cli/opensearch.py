"""`fgplugin opensearch ...`."""

from __future__ import annotations

import typer

from .common import not_built

app = typer.Typer(no_args_is_help=True)


@app.command("setup")
def setup() -> None:
    """Not built yet: generate and register the scoring script, ML connector and pipelines."""
    not_built("opensearch setup", "issue: serve and ML Commons wiring")
