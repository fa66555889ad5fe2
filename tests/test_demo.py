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
    for step in ("1/5 generate", "2/5 train asen", "3/5 evaluate and export", "4/5 index", "5/5 query"):
        assert step in r.output, step
    assert "overall (query-weighted)" in r.output and "demo finished" in r.output
    # The queries: one attribute beside the whole-image embedding, then two attributes with a filter,
    # each hit with its catalog labels; every line fits the 80-column terminal the runner emulates.
    query_part = r.output.split("5/5 query")[1]
    assert "by sleeve_length" in query_part and "whole image" in query_part, query_part
    assert re.search(r"\d/5 same sleeve_length", query_part), query_part
    assert "(label)" in query_part and "in_stock" in query_part and "price<100" in query_part
    assert max(len(line) for line in r.output.splitlines()) <= 80
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert card["variant"] == "asen"
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
