"""`fgplugin demo` end to end at a toy size: generate, train, evaluate, export, index, query."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from fgplugin.stores import open_store
from fgplugin_cli.app import app


def test_demo_runs_the_whole_job_and_leaves_a_queryable_store(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n", "120", "--budget", "2m", "--image-size", "32",
            "--set", "steps=6", "--set", "batch_size=4", "--set", "eval_every=3"]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for step in ("1/5 generate", "2/5 train asen_v2", "3/5 evaluate and export", "4/5 index", "5/5 query"):
        assert step in r.output, step
    assert "overall (query-weighted)" in r.output and "demo finished" in r.output
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert card["variant"] == "asen_v2"
    store = open_store(f"embedded:{out / 'store'}", read_only=True)
    try:
        assert store.count() == 120
    finally:
        store.close()
    # A second run resumes: the data and the finished run are reused, the index is already current.
    r2 = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r2.exit_code == 0, r2.output
    assert "rendering" not in r2.output
    assert re.search(r"already current\s*│\s*120\b", r2.output), r2.output
