"""Packaging and CLI shape: the install layout the product's design fixes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from fgplugin_cli.app import app

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "fgplugin").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    assert "fgplugin_cli" in listed


def test_cli_folder_installs_under_a_distinct_name(tmp_path):
    # Run outside the repo so the working directory is not on sys.path: only what is installed counts.
    probe = (
        "import importlib.util, json; f = importlib.util.find_spec;"
        "a = f('fgplugin_cli'); b = f('cli');"
        "print(json.dumps([a.origin if a else None, (b.origin or str(list(b.submodule_search_locations))) if b else None]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cli_origin, generic = __import__("json").loads(out.stdout)
    assert cli_origin == str(REPO / "cli" / "__init__.py")
    assert generic is None or str(REPO) not in generic, f"a generic 'cli' module is installed: {generic}"


def test_help_lists_the_command_groups():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("data", "train", "eval", "export", "index", "query", "serve", "explore", "demo", "opensearch"):
        assert cmd in result.output
    data_help = CliRunner().invoke(app, ["data", "--help"])
    for cmd in ("synth", "check", "import", "split"):
        assert cmd in data_help.output


def test_console_script_runs():
    exe = Path(sys.executable).parent / "fgplugin"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == __import__("fgplugin").__version__
