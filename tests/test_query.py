"""`fgplugin query` and the shared query execution: table, JSON, HTML, image references, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fgplugin.errors import QueryError
from fgplugin.query.execute import result_to_dict, run_query
from fgplugin.query.html import render_report
from fgplugin.search.spec import QuerySpec
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import Document, IndexLayout
from fgplugin.search.embedded import DuckDBStore
from fgplugin_cli.app import app

N = 40
SCHEMA = AttributeSchema(
    (Attribute("sleeve_length", ("short", "long")), Attribute("neckline", ("round", "v")),
     Attribute("colour", ("red", "blue"))),
    name="query-test",
)
LAYOUT = IndexLayout(SCHEMA, {"sleeve_length": 3, "neckline": 3, "colour": 3},
                     {"category": "keyword", "price": "float"}, "enc-v1")


class ColourEncoder:
    """A deterministic encoder with the ExportedEncoder interface: each attribute embeds a different
    function of the image's mean colour, so an image's vectors are known exactly."""

    version = "enc-v1"
    dims = LAYOUT.dims
    path = "<colour encoder>"

    def encode_images(self, images):
        means = np.stack([np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0) + 1 for im in images])
        feats = {"sleeve_length": means, "neckline": means[:, [2, 0, 1]] ** 2, "colour": np.sqrt(means) - 8}
        return {a: (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32) for a, f in feats.items()}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    rng = np.random.default_rng(3)
    enc = ColourEncoder()
    images = []
    for i in range(N):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        p = root / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 24), colour).save(p)
        images.append(p)
    vecs = enc.encode_images([Image.open(p) for p in images])
    s = DuckDBStore(root / "store")
    s.ensure_index(LAYOUT)
    docs = [
        Document(f"sku{i:03d}", {a: vecs[a][i] for a in LAYOUT.attributes},
                 {"category": ("dress", "skirt")[i % 2], "price": float(10 * i)}, "enc-v1", str(images[i]))
        for i in range(N)
    ]
    assert not s.upsert(docs).failed
    s.close()
    return root


@pytest.fixture()
def runner():
    return CliRunner()


def invoke(runner, store_dir, *args):
    return runner.invoke(app, ["query", "--store", f"embedded:{store_dir / 'store'}", *args])


def test_table_output(runner, store_dir):
    r = invoke(runner, store_dir, "--like", "sku004", "--attr", "sleeve_length", "--attr", "neckline=0.5", "-k", "5")
    assert r.exit_code == 0, r.output
    assert "cos sleeve_length" in r.output and "cos neckline" in r.output and "category" in r.output
    assert "like sku004" in r.output and "sku004" not in r.output.split("candidates")[1]  # self excluded
    assert sum(f"sku{i:03d}" in r.output.split("candidates")[1] for i in range(N)) == 5


def test_json_output_ranks_like_the_store(runner, store_dir):
    r = invoke(runner, store_dir, "--like", "sku004", "--attr", "colour", "--filter", "category=dress",
               "--filter", "price<200", "-k", "7", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    hits = out["hits"]
    assert len(hits) == 7 and out["mode"] == "exact" and out["total_candidates"] == 9  # dresses under 200, not sku004
    assert all(h["metadata"]["category"] == "dress" and h["metadata"]["price"] < 200 for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and "sku004" not in [h["id"] for h in hits]
    with DuckDBStore(store_dir / "store", read_only=True) as s:
        v = s.get_vectors(["sku004"] + [h["id"] for h in hits])
    for h in hits:  # the reported cosine is the cosine of the stored vectors
        assert h["cosines"]["colour"] == pytest.approx(float(v["sku004"]["colour"] @ v[h["id"]]["colour"]), abs=1e-5)
    assert out["query"]["attributes"] == {"colour": 1.0}


def test_ann_mode_notes_exact(runner, store_dir):
    r = invoke(runner, store_dir, "--like", "sku001", "--attr", "colour", "--mode", "ann", "--json")
    out = json.loads(r.stdout)
    # 24 documents: the store's rule runs exactly (below its exact_below) and says why, in the notes and the plan
    assert r.exit_code == 0 and any("ran an exact search" in n for n in out["notes"]) and out["plan"].startswith("exact")


@pytest.mark.parametrize("args, message", [
    (["--like", "sku001", "--attr", "sleeve"], "unknown attribute 'sleeve'; known attributes: sleeve_length, neckline, colour"),
    (["--like", "sku001", "--attr", "colour=-1"], "must be a number from 0 to 1e+06"),
    (["--like", "sku001", "--attr", "colour=inf"], "must be a number from 0 to 1e+06"),  # every score would be inf
    (["--like", "sku001", "--attr", "colour=nan"], "must be a number from 0 to 1e+06"),
    (["--like", "sku001", "--attr", "colour", "--filter", "price"], "cannot read filter"),
    (["--like", "sku001", "--attr", "colour", "--filter", "brand=x"], "unknown field 'brand'"),
    (["--like", "sku001", "--attr", "colour", "--filter", "price<cheap"], "not a number"),
    (["--like", "nope", "--attr", "colour"], "no document with id 'nope'"),
    (["--attr", "colour"], "give exactly one reference"),
    (["--like", "sku001"], "choose at least one attribute"),
    (["--like", "sku001", "--attr", "colour", "--mode", "fast"], "mode must be one of"),
    (["--like", "sku001", "--attr", "colour", "-k", "0"], "k must be an integer"),
    (["--image", "x.png", "--attr", "colour"], "needs the exported encoder: pass --model"),
])
def test_bad_input_is_one_line_exit_2(runner, store_dir, args, message):
    r = invoke(runner, store_dir, *args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output


def test_missing_store(runner, tmp_path):
    r = runner.invoke(app, ["query", "--store", f"embedded:{tmp_path}/none", "--like", "a", "--attr", "x"])
    assert r.exit_code == 2 and "no embedded store at" in r.output


def test_html_report(runner, store_dir, tmp_path):
    page = tmp_path / "out" / "report.html"
    r = invoke(runner, store_dir, "--like", "sku010", "--attr", "sleeve_length", "--attr", "colour=2",
               "-k", "4", "--html", str(page), "--json")
    assert r.exit_code == 0, r.output
    html = page.read_text()
    ids = [h["id"] for h in json.loads(r.stdout)["hits"]]
    for i in ids:
        assert f"data-id='{i}'" in html
    assert html.count("data:image/jpeg;base64,") == 5  # the reference and four hits, embedded
    assert "sleeve_length" in html and "colour=2" in html and "http" not in html.replace("http-equiv", "")


def test_image_query_and_explain_without_attention(store_dir, tmp_path):
    # a query image with the colour of sku007 finds sku007 first, with cosine 1 on every attribute
    with DuckDBStore(store_dir / "store", read_only=True) as s:
        src = s.image_of("sku007")
        spec = QuerySpec({"sleeve_length": 1.0, "neckline": 1.0}, image=src, k=3)
        run = run_query(s, spec, encoder=ColourEncoder())
    assert run.result.hits[0].id == "sku007"
    assert run.result.hits[0].cosines["neckline"] == pytest.approx(1.0, abs=1e-5)
    assert run.result.hits[0].score == pytest.approx(2.0, abs=1e-5)
    d = result_to_dict(run)
    assert d["query"]["reference"] == f"image {src}" and d["hits"][0]["rank"] == 1
    page = render_report(run, explain=True)
    assert "query image" in page and "no attention map" in page and "keeps only the encoder" in page


def test_image_query_refuses_a_different_schema(store_dir):
    class Other(ColourEncoder):
        def encode_images(self, images):
            return {"sleeve_length": np.ones((len(images), 5), np.float32)}

    with DuckDBStore(store_dir / "store", read_only=True) as s:
        spec = QuerySpec({"sleeve_length": 1.0}, image=s.image_of("sku001"))
        with pytest.raises(QueryError, match="has 5 numbers; the model gives 3"):
            run_query(s, spec, encoder=Other())


def test_explain_prints_the_opensearch_body_and_keeps_json_clean(runner, store_dir):
    pytest.importorskip("fgplugin.opensearch.compile")
    r = invoke(runner, store_dir, "--like", "sku002", "--attr", "colour=0.5", "--filter", "price<=100",
               "-k", "3", "--explain", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["hits"]) == 3  # the body goes to stderr with --json
    assert "script_score" in r.output and '"lte": 100.0' in r.output and "sku002" in r.output


def test_scores_equal_the_opensearch_script_semantics(store_dir, tmp_path):
    """The embedded score is what the OpenSearch exact script returns, less sum w (missing field: -w)."""
    scripts = pytest.importorskip("fgplugin.opensearch.scripts")
    with DuckDBStore(store_dir / "store", read_only=True) as s:
        vecs = s.get_vectors(["sku003"])["sku003"]
    copy = DuckDBStore(tmp_path / "copy")
    copy.ensure_index(LAYOUT)
    rng = np.random.default_rng(9)
    docs = []
    for i in range(30):
        v = {a: rng.normal(size=3).astype(np.float32) for a in LAYOUT.attributes}
        if i % 5 == 0:
            del v["neckline"]  # missing attribute vectors
        docs.append(Document(f"x{i}", {a: x / np.linalg.norm(x) for a, x in v.items()}))
    copy.upsert(docs)
    weights = {"sleeve_length": 0.8, "neckline": 1.5}
    res = copy.search(QuerySpec(weights, vectors=vecs, k=30))
    expected = []
    for d in docs:
        cos = {a: (float(vecs[a] @ d.vectors[a]) if a in d.vectors else None) for a in weights}
        expected.append((scripts.script_to_weighted_cosine(scripts.script_score(cos, weights), weights), d.id))
    expected.sort(key=lambda t: (-t[0], t[1]))
    assert [h.id for h in res.hits] == [e[1] for e in expected]
    np.testing.assert_allclose([h.score for h in res.hits], [e[0] for e in expected], atol=1e-5)
    copy.close()


def test_image_query_end_to_end_with_a_real_export(tmp_path_factory, runner):
    """index with a (tiny, untrained) export, then query by one item's image: that item comes first with
    cosine 1, and the query finds the encoder through the model path the index run recorded."""
    synth = pytest.importorskip("fgplugin.synth")
    from test_encoder import tiny_export  # built once per session, shared with the encoder tests

    from fgplugin.catalog import load_catalog

    schema = synth.synth_schema()
    export = tiny_export(tmp_path_factory.getbasetemp(), schema)
    data = tmp_path_factory.mktemp("e2e")
    catalog = synth.generate(data, 12, seed=5, size=64, workers=1)
    store = f"embedded:{data / 'store'}"
    r = runner.invoke(app, ["index", "--catalog", str(catalog), "--model", str(export), "--store", store,
                            "--workers", "1", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    cat = load_catalog(catalog, schema)
    item = cat.items[3]
    a, b = schema.names[:2]
    src = cat.image_source(item)
    r = runner.invoke(app, ["query", "--store", store, "--image", src, "--attr", a, "--attr", f"{b}=0.5",
                            "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    top = json.loads(r.stdout)["hits"][0]
    assert top["id"] == item.id
    assert top["cosines"][a] == pytest.approx(1.0, abs=1e-4) and top["score"] == pytest.approx(1.5, abs=1e-4)
