"""Shared CLI plumbing: one console, user-facing errors, JSON output, and not-yet-built commands."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from fgplugin.errors import FgpluginError

console = Console(stderr=False)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn library errors into a one-line message and exit code 2 (no traceback for bad input)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FgpluginError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            problems = getattr(e, "problems", None)
            if problems and len(problems) > 5:
                for p in problems[5:50]:
                    err_console.print(f"  {p}", highlight=False, markup=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def not_built(command: str, issue: str) -> None:
    err_console.print(
        f"[bold yellow]fgplugin {command}[/] is not built yet ({issue}).", highlight=False
    )
    raise typer.Exit(3)
