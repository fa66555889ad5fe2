"""Vector codecs (fgplugin.codecs) through the paths the stores use: codes score within each codec's stated
bound, rankings on codes overlap float32 rankings above the README's floors on a clustered set, and a store
refuses vectors or writes of another codec. No OpenSearch node (tests/test_store_contract.py runs the codecs
there). About 15 s on 2 cores."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from fgplugin.codecs import (CODECS, bit_cosines, bit_tables, bits, bytes_per_vector, card_codec, cosine_error_bound,
                             decode, encode, int8_scales, query_codes, scoring_query)
from fgplugin.errors import StoreError
from fgplugin.opensearch.compile import to_opensearch
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.ann import load_faiss
from fgplugin.search.embedded import DuckDBStore
from fgplugin.search.spec import QuerySpec
from fgplugin.search.store import Document, IndexLayout
from fgplugin.search.vectors import VectorArrays

BENCH_QUERY = Path(__file__).resolve().parents[1] / "bench" / "query.py"
# overlap@20 of exact rankings on codes with float32 rankings (clustered set below; README "Compact vectors")
OVERLAP_FLOOR = {"float16": 0.99, "int8": 0.9, "binary": 0.9}


def generate(n: int, attrs: list[str], d: int, seed: int) -> dict[str, np.ndarray]:
    """bench/query.py's clustered unit vectors (the set its tables measure)."""
    spec = importlib.util.spec_from_file_location("fgplugin_bench_query", BENCH_QUERY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.generate(n, attrs, d, seed)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def arrays_with(tmp_path: Path, codec: str, x: np.ndarray, scale: float) -> VectorArrays:
    """One attribute's codes in the store's row-aligned arrays, written as the embedded store writes them."""
    arrays = VectorArrays.create(tmp_path / codec, "e", ["a"], {"a": x.shape[1]}, len(x), codec)
    arrays.reserve(len(x))
    arrays.write(np.arange(len(x)), 0, encode(x, codec, scale), np.ones(len(x), bool))
    return arrays


@pytest.mark.parametrize("d", [8, 64, 100])
@pytest.mark.parametrize("codec", CODECS)
def test_scores_on_codes_stay_within_the_stated_bound(tmp_path, codec, d):
    rng = np.random.default_rng(d)
    x, qs = unit(rng, 2000, d), unit(rng, 5, d)
    scale = 127.0 if codec in ("float32", "float16") else 127.0 / float(np.abs(x).max())  # the card's own rule
    arrays = arrays_with(tmp_path, codec, x, scale)
    bound = cosine_error_bound(codec, d, scale)
    worst = 0.0
    for q in qs:
        truth = x @ q
        p = scoring_query(q, codec)
        scored = arrays.values("a", None).astype(np.float64) @ p  # what exact queries and rescoring score
        worst = max(worst, float(np.abs(scored - truth).max()))
        if codec != "binary":  # the scan scores the same as the rescoring
            assert np.abs(arrays.cosines("a", None, p.astype(np.float32)) - scored).max() < 1e-5
    print(f"{codec} d={d}: worst |score - q.x| {worst:.2e}, bound {bound:.2e}")
    assert worst <= bound, (codec, d, worst, bound)
    # what the bound amounts to: float16 within 1e-3; int8 within 2 sqrt(d) / 127 (0.126 at d=64)
    assert bound <= {"float32": 1e-5, "float16": 1e-3}.get(codec, 2 * d ** 0.5 / 127 + 1e-5)


def test_binary_scans_the_sign_bits_and_rescores_on_its_int8_codes(tmp_path):
    rng = np.random.default_rng(1)
    d = 100  # not a multiple of 8: the last byte is padded
    x, q = unit(rng, 500, d), unit(rng, 1, d)[0]
    arrays = arrays_with(tmp_path, "binary", x, 127.0)
    signs = np.where(encode(x, "int8") >= 0, 1.0, -1.0) / np.sqrt(d)  # the decoded sign vector
    assert np.allclose(arrays.cosines("a", None, q), signs @ q, atol=1e-5)
    assert np.allclose(bit_cosines(bits(encode(x, "int8")), bit_tables(q)), signs @ q, atol=1e-5)
    assert np.array_equal(arrays.rows_of("a", None), encode(x, "int8"))  # the rescoring copy
    assert bytes_per_vector("binary", d) == d + 13 and bytes_per_vector("int8", d) == d


def test_query_codes_use_the_full_int8_range_and_keep_the_direction():
    rng = np.random.default_rng(2)
    q = unit(rng, 1, 64)[0]
    c = query_codes(q)
    assert c.dtype == np.int8 and int(np.abs(c).max()) == 127
    assert float(scoring_query(q, "int8") @ q) > 0.999
    assert np.array_equal(query_codes(scoring_query(q, "int8")), c)  # what OpenSearch is sent round-trips
    assert np.array_equal(scoring_query(q, "float16"), q)


def test_int8_scales_come_from_the_card_and_the_codec_defaults_to_float32():
    card = {"attributes": ["a", "b"], "storage": {"int8": {"scale": {"a": 254.0}}}}
    assert int8_scales(card) == {"a": 254.0, "b": 127.0}
    assert card_codec(card) == "float32"
    assert card_codec({"storage": {"codec": "int8"}}) == "int8"
    with pytest.raises(ValueError, match="codec must be one of float32, float16, int8, binary; got 'int4'"):
        card_codec({"storage": {"codec": "int4"}})
    x = np.array([[0.5, -0.25, 0.0, 1.0]], np.float32)
    assert encode(x, "int8", 254.0).tolist() == [[127, -64, 0, 127]]  # clipped at 127
    assert np.allclose(decode(encode(x, "int8", 127.0), "int8", 127.0), x, atol=0.5 / 127)


SCHEMA = AttributeSchema(tuple(Attribute(a, ("x", "y")) for a in ("a0", "a1", "a2", "a3")), name="codecs")
DIM = 32


def layout(codec: str, scale: float = 127.0) -> IndexLayout:
    scales = {a: scale for a in SCHEMA.names} if codec in ("int8", "binary") else {}
    return IndexLayout(SCHEMA, {a: DIM for a in SCHEMA.names}, {"cat": "keyword"}, "v1", codec=codec, scales=scales)


@pytest.fixture(scope="module")
def clustered():
    return generate(4000, SCHEMA.names, DIM, seed=3)


def built(path: Path, codec: str, vecs: dict[str, np.ndarray]) -> DuckDBStore:
    st = DuckDBStore(path)
    st.ensure_index(layout(codec))
    n = len(next(iter(vecs.values())))
    res = st.upsert([Document(f"i{j:05d}", {a: v[j] for a, v in vecs.items()}, {"cat": "c"}) for j in range(n)])
    assert not res.failed
    return st


def test_rankings_on_codes_overlap_float32_rankings_above_the_stated_floor(tmp_path, clustered):
    rng = np.random.default_rng(4)
    specs = []
    for _ in range(12):
        ref = int(rng.integers(0, 4000))
        q = {a: clustered[a][ref] + 0.1 * rng.normal(size=DIM).astype(np.float32) for a in ("a0", "a1")}
        specs += [QuerySpec({"a0": 1.0}, vectors={"a0": q["a0"]}, k=20),
                  QuerySpec({"a0": 1.0, "a1": 0.5}, vectors=q, k=20)]
    ref_store = built(tmp_path / "float32", "float32", clustered)
    want = [[h.id for h in ref_store.search(s).hits] for s in specs]
    sizes = {"float32": ref_store.stats()}
    ref_store.close()
    for codec, floor in OVERLAP_FLOOR.items():
        st = built(tmp_path / codec, codec, clustered)
        got = [st.search(s) for s in specs]
        overlap = np.mean([len({h.id for h in g.hits} & set(w)) / 20 for g, w in zip(got, want)])
        print(f"{codec}: overlap@20 with float32 {overlap:.3f}")
        assert overlap >= floor, (codec, overlap)
        assert st.stats()["codec"] == codec and st.verify()["codec"] == codec
        sizes[codec] = st.stats()
        # per-attribute cosines and scores agree with the codes' own scores within the bound
        h = got[1].hits[0]
        assert abs(h.score - sum(w * h.cosines[a] for a, w in specs[1].attributes.items())) < 1e-9
        st.close()
    # fewer bytes per item where it counts: the arrays a query scans (allocated on disk)
    assert sizes["float16"]["cache_bytes"] < sizes["float32"]["cache_bytes"]
    assert sizes["int8"]["cache_bytes"] < sizes["float16"]["cache_bytes"]


def test_a_store_written_with_one_codec_refuses_another(tmp_path, clustered):
    st = built(tmp_path / "s", "int8", {a: v[:50] for a, v in clustered.items()})
    with pytest.raises(StoreError, match=r"holds codec int8 vectors; this run writes codec float32.*"
                                         r"--codec float32 --store embedded:NEW_DIR\), or keep --codec int8 here"):
        st.ensure_index(layout("float32"))
    with pytest.raises(StoreError, match="int8 codes with int8 scales .* this run's scales are"):
        st.ensure_index(layout("int8", scale=200.0))
    # int8 codes of this codec are taken (decoded with the layout's scale); other integer codes are refused
    codes = encode(clustered["a0"][60], "int8")
    res = st.upsert([Document("codes", {"a0": codes}, {}), Document("u8", {"a0": codes.astype(np.uint8)}, {})])
    assert res.ok == ["codes"] and [f.id for f in res.failed] == ["u8"]
    assert "holds uint8 codes; the index stores codec int8" in res.failed[0].reason
    assert np.array_equal(encode(st.get_vectors(["codes"])["codes"]["a0"], "int8"), codes)
    st.close()
    f32 = built(tmp_path / "f", "float32", {a: v[:5] for a, v in clustered.items()})
    res = f32.upsert([Document("codes", {"a0": codes}, {})])
    assert "holds int8 codes; the index stores codec float32, which takes float vectors" in res.failed[0].reason
    f32.close()
    again = DuckDBStore(tmp_path / "s", read_only=True)  # the codec and scales are read back from the file
    assert again.layout.codec == "int8" and again.layout.scales == {a: 127.0 for a in SCHEMA.names}
    again.close()


def test_a_layout_names_a_known_codec_and_int8_scales():
    with pytest.raises(StoreError, match="codec must be one of"):
        IndexLayout(SCHEMA, {a: DIM for a in SCHEMA.names}, {}, "v1", codec="int4")
    with pytest.raises(StoreError, match="codec int8 needs an int8 scale per attribute; none for a0, a1, a2, a3"):
        IndexLayout(SCHEMA, {a: DIM for a in SCHEMA.names}, {}, "v1", codec="int8")


def test_an_int8_index_is_queried_with_int8_codes_and_always_rescored():
    lay = layout("int8")
    rng = np.random.default_rng(5)
    q = {a: unit(rng, 1, DIM)[0] for a in ("a0", "a1")}
    for spec in (QuerySpec({"a0": 1.0, "a1": 0.5}, vectors=q, k=10),
                 QuerySpec({"a0": 1.0, "a1": 0.9}, vectors=q, k=10, mode="ann")):
        body = to_opensearch(spec, lay)
        script = body["query"]["script_score"]["script"] if spec.mode == "exact" else \
            body["rescore"]["query"]["rescore_query"]["script_score"]["script"]
        for v in script["params"]["vectors"]:
            assert all(float(x).is_integer() and -127 <= x <= 127 for x in v) and max(map(abs, v)) == 127
        if spec.mode == "ann":  # knn scores on bytes are no weighted cosines: the candidates are rescored
            knn = body["query"]["knn"]["emb_all"]
            assert all(float(x).is_integer() and -127 <= x <= 127 for x in knn["vector"])
            assert body["rescore"]["window_size"] >= 10


def test_fgplugin_index_codec_writes_int8_and_refuses_a_later_float32_run(tmp_path_factory):
    import json

    from typer.testing import CliRunner

    from fgplugin import synth
    from fgplugin_cli.app import app
    from test_encoder import tiny_export

    export = tiny_export(tmp_path_factory.getbasetemp(), synth.synth_schema())
    catalog = synth.generate(tmp_path_factory.mktemp("codec-data"), 8, seed=5, size=64, workers=1)
    store = tmp_path_factory.mktemp("codec-store") / "st"

    def index(*extra: str):
        return CliRunner().invoke(app, ["index", "--catalog", str(catalog), "--model", str(export),
                                        "--store", f"embedded:{store}", "--json", *extra])

    r = index("--codec", "int8")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["indexed"] == 8
    with DuckDBStore(store, read_only=True) as st:
        lay = st.layout
        assert lay.codec == "int8" and set(lay.scales) == set(lay.attributes)  # the card's scales, recorded
        assert st.search(QuerySpec({lay.attributes[0]: 1.0}, like_id=st.browse(limit=1)[0].id, k=3)).hits
    r = index("--codec", "float32")
    assert r.exit_code != 0 and "holds codec int8 vectors; this run writes codec float32" in r.output
    r = index("--codec", "int4")
    flat = re.sub(r"[│╭╮╰╯─\s]+", " ", r.output)  # the usage error's box, unwrapped
    assert r.exit_code == 2 and "'int4' is not a codec; use one of float32, float16, int8, binary" in flat


def test_ann_on_a_compact_store_keeps_compact_lists_and_rescored_recall(tmp_path, clustered):
    if load_faiss() is None:
        pytest.skip("faiss-cpu is not installed")
    rng = np.random.default_rng(6)
    sizes = {}
    for codec in ("float32", "int8"):
        st = built(tmp_path / codec, codec, clustered)
        st.exact_below = 0  # a small store uses its index too
        st.prepare_ann(["a0", "a1"])
        recalls = []
        for j in range(10):
            ref = int(rng.integers(0, 4000))
            weights = {"a0": 1.0} if j % 2 else {"a0": 1.0, "a1": 0.5}  # one attribute, and a mix
            q = {a: clustered[a][ref] for a in weights}
            exact = [h.id for h in st.search(QuerySpec(weights, vectors=q, k=20)).hits]
            got = st.search(QuerySpec(weights, vectors=q, k=20, mode="ann+rescore"))
            assert got.mode == "ann+rescore"
            recalls.append(len({h.id for h in got.hits} & set(exact)) / 20)
        assert np.mean(recalls) >= 0.9, (codec, recalls)
        sizes[codec] = sum(f.stat().st_size for f in (tmp_path / codec).rglob("ann_a0.faiss"))
        st.close()
    assert sizes["int8"] < 0.5 * sizes["float32"]  # 8-bit lists: a byte per dimension instead of four
