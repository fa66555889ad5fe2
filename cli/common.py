"""Shared CLI plumbing: one console, user-facing errors, JSON output, secrets, and not-yet-built commands.

No message leaves a command unscrubbed: ``friendly_errors`` passes every error, expected or not,
through ``fgplugin.redact.scrub`` with the secrets the command was given (URL passwords, tokens, the
FGPLUGIN_* secret env vars, token files read) as literal strings to remove, on top of the structural
scrubbing of any URL user info.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import stat
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import typer
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from fgplugin.errors import CatalogError, FgpluginError, OutputError, SettingError
from fgplugin.redact import scrub, url_secrets

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException as _ClickException
    from typer._click.globals import get_current_context as _current_context
except ImportError:  # older typer: the click package
    from click import get_current_context as _current_context
    from click.exceptions import ClickException as _ClickException

# usage errors and exits: click reports them (click's own classes too, for commands mixing both)
_PASS_THROUGH: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort, _ClickException)
try:
    import click

    _PASS_THROUGH += (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)
except ImportError:
    pass

console = Console(stderr=False)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

SECRET_ENV = ("FGPLUGIN_OPENSEARCH_PASSWORD", "FGPLUGIN_OPENSEARCH_API_KEY", "FGPLUGIN_SERVE_TOKEN")
URL_ENV = ("FGPLUGIN_OPENSEARCH_URL",)
_SECRET_NAME = re.compile(r"(?i)token|password|passwd|secret|api_?key")
_known_secrets: list[str] = []  # read from token files during this command (not in its arguments)
PS_WARNING = "`ps` shows the command line to every user of this machine"


def remember_secret(value: str | None) -> None:
    """Scrub ``value`` from every error this process prints."""
    if value and value not in _known_secrets:
        _known_secrets.append(value)


def command_secrets(kwargs: dict[str, Any]) -> list[str]:
    """The secrets a command was given: secret-named options, passwords in URL options, env vars."""
    out = list(_known_secrets)
    for name, value in kwargs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str):
                if _SECRET_NAME.search(name):
                    out.append(v)
                out += url_secrets(v)
    out += [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    for k in URL_ENV:
        out += url_secrets(os.environ.get(k, ""))
    return out


def print_error(message: str, secrets: Iterable[str] = ()) -> None:
    err_console.print(f"[bold red]error:[/] {escape(scrub(message, secrets))}", highlight=False, soft_wrap=True)


# Libraries of the optional extras (pyproject.toml): a command that needs one names the extra to install.
EXTRA_OF = {"torch": "train", "torchvision": "train", "safetensors": "train", "starlette": "serve",
            "uvicorn": "serve", "python_multipart": "serve", "multipart": "serve", "timm": "pretrained"}


def needs_extra(extra: str) -> Callable[[F], F]:
    """Mark a command whose missing libraries all come with one extra (``serve`` needs torch too, but
    installing [train] alone would not be enough): ``@friendly_errors`` then names that extra."""

    def mark(fn: F) -> F:
        fn.fgplugin_extra = extra  # type: ignore[attr-defined]
        return fn

    return mark


def friendly_errors(fn: F) -> F:
    """Turn library errors into a one-line message and exit code 2 (no traceback for bad input); any other
    exception into a one-line message and exit code 1 (FGPLUGIN_DEBUG=1 adds the traceback). Both scrubbed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FgpluginError as e:
            secrets = command_secrets(kwargs)
            print_error(str(e), secrets)
            problems = e.problems if isinstance(e, CatalogError) else None
            if problems and len(problems) > 5:
                for p in problems[5:50]:
                    err_console.print(f"  {scrub(str(p), secrets)}", highlight=False, markup=False)
            raise typer.Exit(2) from None
        except _PASS_THROUGH:
            raise
        except ModuleNotFoundError as e:
            extra = getattr(fn, "fgplugin_extra", None) or EXTRA_OF.get((e.name or "").partition(".")[0])
            if extra is None:
                raise
            print_error(f"this command needs {e.name}, which this install lacks: pip install 'fgplugin[{extra}]'")
            raise typer.Exit(2) from None
        except Exception as e:  # noqa: BLE001 - a bug must not print a password either
            secrets = command_secrets(kwargs)
            if os.environ.get("FGPLUGIN_DEBUG"):
                err_console.print(scrub(traceback.format_exc(), secrets), highlight=False, markup=False)
            print_error(f"unexpected {e.__class__.__name__}: {e} (FGPLUGIN_DEBUG=1 shows the traceback)", secrets)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _from_command_line(param: str) -> bool:
    ctx = _current_context(silent=True)
    try:
        return getattr(ctx.get_parameter_source(param), "name", None) == "COMMANDLINE"
    except (KeyError, AttributeError):  # no context (called as a function), or no such parameter
        return False


def read_secret_file(path: Path, option: str) -> str:
    """The secret in ``path`` (surrounding whitespace, e.g. the newline `echo` adds, removed). Errors name
    the file and the cause, never its content."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingError(f"{option} {p}: no such file") from None
    except IsADirectoryError:
        raise SettingError(f"{option} {p}: is a directory, not a file") from None
    except OSError as e:
        raise SettingError(f"{option} {p}: cannot read it ({e.strerror or e.__class__.__name__})") from None
    except UnicodeDecodeError:
        raise SettingError(f"{option} {p}: not UTF-8 text") from None
    value = text.strip()
    if not value:
        raise SettingError(f"{option} {p} is empty")
    if "\n" in value or "\r" in value:
        raise SettingError(f"{option} {p} holds several lines; put the secret alone in it")
    remember_secret(value)
    if os.name == "posix" and p.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        err_console.print(f"[yellow]warning:[/] {escape(str(p))} holds a secret and is readable by other users; "
                          "chmod 600 it", highlight=False, soft_wrap=True)
    return value


def resolve_secret(value: str | None, path: Path | None, *, param: str, option: str, file_option: str,
                   env: str) -> str | None:
    """The secret of ``option`` (which typer also reads from ``env``) or of ``file_option``; warns when it
    came on the command line, where `ps` shows it to everyone."""
    if value and path is not None:
        raise SettingError(f"give {option} (or {env}) or {file_option}, not both")
    if path is not None:
        return read_secret_file(path, file_option)
    if not value:
        return None
    remember_secret(value)
    if _from_command_line(param):
        err_console.print(f"[yellow]warning:[/] {option} given on the command line, and {PS_WARNING}; use {env} "
                          f"or {file_option} instead", highlight=False, soft_wrap=True)
    return value


def warn_password_in_url(url: str, *, param: str, option: str) -> None:
    """Warn when a URL option given on the command line carries a password (`ps` shows it)."""
    if url_secrets(url) and _from_command_line(param):
        err_console.print(f"[yellow]warning:[/] {option} holds a password, and {PS_WARNING}; use "
                          "FGPLUGIN_OPENSEARCH_USER/PASSWORD (or _API_KEY) or the config file instead",
                          highlight=False, soft_wrap=True)


def check_writable(path: Path, option: str) -> None:
    """Fail now, naming ``path`` and the cause, if a file cannot be written there (before any work).
    Missing folders are fine where they can be created (the writers create them)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{option} {p}: is a directory; give a file name")
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{option} {p}: {folder} is not a directory")
    if folder != p.parent:  # the folders will be created: the nearest existing one must be writable
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {p}: cannot create folders in {folder} (permission denied)")
        return
    existed = p.exists()
    try:
        with open(p, "ab"):  # opens for writing without truncating what is there
            pass
    except OSError as e:
        raise OutputError(f"{option} {p}: cannot write it ({e.strerror or e.__class__.__name__})") from None
    if not existed:
        p.unlink(missing_ok=True)


def print_json(obj: Any) -> None:
    # allow_nan=False: "Infinity"/"NaN" are not JSON; a non-finite number reaching here is a bug to see.
    sys.stdout.write(json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


class FitWidth:
    """A table that fits the console it is printed on without cutting a word: when the table's minimum
    width (every cell wrapped at its spaces) exceeds the width, it drops its least useful columns, in the
    order given, and names them in its caption; then it gives each column at least its longest word
    (rich alone shrinks the widest columns, cutting ids to `syn000…`)."""

    def __init__(self, table: Table, drop_order: Iterable[str] = ()):
        self.table = table
        self.drop_order = list(drop_order)

    def fitted(self, console: Console, width: int) -> Table:
        t = copy.copy(self.table)
        t.columns = list(self.table.columns)
        dropped = []
        for header in self.drop_order:
            if _min_width(console, t) <= width:
                break
            keep = [c for c in t.columns if c.header != header]
            if len(keep) < len(t.columns):
                t.columns = keep
                dropped.append(header)
        if dropped:
            note = f"not shown at this width: {', '.join(map(str, dropped))}"
            t.caption = f"{t.caption}; {note}" if t.caption else note
        return _with_widths(console, t, width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.fitted(console, options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.fitted(console, options.max_width))


class SideBySide:
    """Two tables side by side where the console is wide enough for both, else one above the other."""

    def __init__(self, left: Table, right: Table, gap: int = 2):
        self.left, self.right, self.gap = left, right, gap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = console.options.update_width(10_000)
        need = [Measurement.get(console, wide, t).maximum for t in (self.left, self.right)]
        if sum(need) + self.gap <= options.max_width:
            grid = Table.grid()
            grid.add_column(width=need[0])
            grid.add_column(width=self.gap)
            grid.add_column(width=need[1])
            grid.add_row(self.left, "", self.right)
            yield grid
        else:
            yield self.left
            yield self.right


def _min_width(console: Console, table: Table) -> int:
    """The narrowest ``table`` renders without cutting a word (measured as if the console were wide)."""
    return Measurement.get(console, console.options.update_width(10_000), table).minimum


def _with_widths(console: Console, table: Table, width: int) -> Table:
    """``table`` with explicit column widths when it must shrink: each column its longest word, the
    rest of the width shared in proportion to what each column would still take."""
    wide = console.options.update_width(10_000)
    if Measurement.get(console, wide, table).maximum <= width:
        return table
    spans = []
    for c in table.columns:
        ms = [Measurement.get(console, wide, x) for x in ([c.header] if table.show_header else []) + list(c.cells)]
        spans.append((max((m.minimum for m in ms), default=1), max((m.maximum for m in ms), default=1)))
    overhead = _min_width(console, table) - sum(lo for lo, _ in spans)
    spare = max(0, width - overhead - sum(lo for lo, _ in spans))
    want = [hi - lo for lo, hi in spans]
    total = sum(want) or 1
    grant = [min(w, spare * w // total) for w in want]
    cols = []
    for c, (lo, _), g in zip(table.columns, spans, grant):
        c = copy.copy(c)
        c.width = lo + g
        cols.append(c)
    table.columns = cols
    return table


def not_built(command: str, issue: str) -> None:
    err_console.print(
        f"[bold yellow]fgplugin {command}[/] is not built yet ({issue}).", highlight=False
    )
    raise typer.Exit(3)
