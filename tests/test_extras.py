"""The core install is a query client: with torch (and the server stack) unimportable, `fgplugin query` by id
ranks an existing store exactly as the store does in a full install, and the commands that need the
[train] or [serve] extras say which one to install instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.embedded import DuckDBStore
from fgplugin.search.spec import QuerySpec, parse_filter
from fgplugin.search.store import Document, IndexLayout

REPO = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("torch", "torchvision", "safetensors", "timm", "starlette", "uvicorn", "multipart", "python_multipart")
DIMS = {"sleeve": 8, "colour": 6}

# Runs the CLI in a fresh interpreter where importing any extra's library fails as if it were not installed.
RUNNER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {EXTRAS_ONLY!r}

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    from fgplugin_cli.app import main
    sys.argv = ["fgplugin", *sys.argv[1:]]
    try:
        main()
    finally:
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
""")


def run_without_extras(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("client-store")
    schema = AttributeSchema(tuple(Attribute(n, ("a", "b")) for n in DIMS), name="client")
    rng = np.random.default_rng(7)
    with DuckDBStore(d) as st:
        st.ensure_index(IndexLayout(schema, DIMS, {"price": "float", "cat": "keyword"}, "v-client"))
        docs = [Document(f"item-{i:03d}", {a: rng.normal(size=n).astype(np.float32) for a, n in DIMS.items()},
                         {"price": float(i % 40) * 2.5, "cat": "ab"[i % 2]}, "v-client") for i in range(300)]
        assert not st.upsert(docs).failed
    return d


def test_query_by_id_runs_without_torch_and_ranks_as_the_store_does(store_dir):
    p = run_without_extras("query", "--store", f"embedded:{store_dir}", "--like", "item-007", "--attr", "sleeve=2",
                           "--attr", "colour", "--filter", "price<50", "--k", "15", "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    with DuckDBStore(store_dir, read_only=True) as st:
        want = st.search(QuerySpec({"sleeve": 2.0, "colour": 1.0}, like_id="item-007", filters=[parse_filter("price<50")],
                                   k=15))
    assert [h["id"] for h in got["hits"]] == [h.id for h in want.hits] and len(want.hits) == 15
    np.testing.assert_allclose([h["score"] for h in got["hits"]], [h.score for h in want.hits], rtol=1e-6)
    # ... and exactly the brute-force ranking (weighted sum of cosines over the filtered items)
    with DuckDBStore(store_dir, read_only=True) as st:
        vecs = st.get_vectors([f"item-{i:03d}" for i in range(300)])
    unit = {i: {a: v / np.linalg.norm(v) for a, v in d.items()} for i, d in vecs.items()}
    ref = unit["item-007"]
    scores = {i: 2 * float(u["sleeve"] @ ref["sleeve"]) + float(u["colour"] @ ref["colour"])
              for i, u in unit.items() if int(i[-3:]) % 40 * 2.5 < 50 and i != "item-007"}
    assert [h["id"] for h in got["hits"]] == sorted(scores, key=lambda i: (-scores[i], i))[:15]


def test_store_verify_and_help_run_without_torch(store_dir):
    p = run_without_extras("store", "verify", "--store", f"embedded:{store_dir}", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["documents"] == 300
    p = run_without_extras("--help")
    assert p.returncode == 0 and "query" in p.stdout and "train" in p.stdout


@pytest.mark.parametrize("args, extra", [
    (["index", "--catalog", "c.jsonl", "--model", "m"], "train"),
    (["serve", "--model", "m"], "serve"),
    (["explore", "--store", "embedded:{store}"], "serve"),
    (["query", "--store", "embedded:{store}", "--image", "x.jpg", "--model", "m", "--attr", "sleeve"], "train"),
])
def test_commands_that_need_an_extra_name_it(store_dir, args, extra):
    p = run_without_extras(*[a.format(store=store_dir) for a in args])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"pip install 'fgplugin[{extra}]'" in p.stderr and "Traceback" not in p.stderr
