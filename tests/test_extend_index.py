"""An attribute added to a live index (issue 28, the index side): `fgplugin index` with a model made by
`fgplugin train --extend` adds the new attribute's field to an index built with the base model and writes
only its vectors (embedded store: a new column, nothing else rewritten; OpenSearch: a mapping field and
partial updates, the alias and index untouched); a run killed midway resumes; a model that is not an
extension of the index's is refused; a dropped attribute is refused by queries and added back by the model
it was dropped from.

Models are untrained and tiny (``resnet_tiny``, 64 px, 32-d: what matters here is which vectors go where,
not what they mean); the base lacks ``colour`` and ``pattern``, the extension adds ``colour`` (2 steps).
Measured on two busy CPU cores: 49 s for the file without the OpenSearch node, 90 s with it (its start
included).
"""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fgplugin.catalog import load_catalog, write_catalog
from fgplugin.errors import QueryError, StoreError
from fgplugin.export import ExportedEncoder, export_model
from fgplugin.indexer import index_catalog
from fgplugin.loading import load_extension_base
from fgplugin.models import build_model, load_config, save_checkpoint
from fgplugin.models.extend import sub_schema
from fgplugin.opensearch.mlcommons.apply import refuse_grown_index
from fgplugin.opensearch.mlcommons.inputs import layout_for
from fgplugin.opensearch.mlcommons.names import WiringError
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.schema import AttributeSchema
from fgplugin.search.embedded import DuckDBStore
from fgplugin.search.spec import QuerySpec
from fgplugin.search.vectors import CACHE_DIR
from fgplugin.training.extend import extend

N_ITEMS = 40
HELD = ["colour", "pattern"]
TINY = {"trunk": "resnet_tiny", "local_trunk": "resnet_tiny", "image_size": 64, "local_size": 32, "embed_dim": 32,
        "attr_embed_dim": 32, "asa_dim": 32, "local_asa_dim": 32, "agmlan_channels": 32}
MECHANICS = {"steps": 2, "batch_size": 4, "workers": 0}


def _export(root, name, schema, seed=0):
    torch.manual_seed(seed)
    save_checkpoint(root / f"ckpt-{name}", build_model(load_config("asen", TINY), schema))
    return export_model(root / f"ckpt-{name}", root / f"export-{name}")


def _extension(root, base_export, name, catalog, *, from_checkpoint=False):
    base, version = load_extension_base(base_export)
    run = extend(base, None if from_checkpoint else version, catalog, ["colour"], root / f"run-{name}",
                 overrides=MECHANICS, device="cpu")
    return export_model(run.last, root / f"export-{name}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fgplugin.synth import generate

    root = tmp_path_factory.mktemp("extend-index")
    path = generate(root / "data", N_ITEMS, seed=0, size=64, workers=1)
    full = AttributeSchema.load(path.parent / "schema.toml")
    base_schema = sub_schema(full, [n for n in full.names if n not in HELD])
    rows = [it.to_row() for it in load_catalog(path, full)]
    # the same items before and after the colour labels came: no colour/pattern column in the base's catalog
    base_cat = write_catalog(path.parent / "base.jsonl", [{k: v for k, v in r.items() if k not in HELD} for r in rows])
    ext_cat = write_catalog(path.parent / "ext.jsonl", [{k: v for k, v in r.items() if k != "pattern"} for r in rows])
    base = _export(root, "base", base_schema)
    other_base = _export(root, "other", base_schema, seed=1)
    enc = lambda p: ExportedEncoder.load(p, device="cpu")  # noqa: E731
    return {"root": root, "base_cat": base_cat, "ext_cat": ext_cat, "base": enc(base),
            "ext": enc(_extension(root, base, "ext", ext_cat)),
            "foreign": enc(_extension(root, other_base, "foreign", ext_cat)),
            "from_ckpt": enc(_extension(root, base, "ckpt", ext_cat, from_checkpoint=True)),
            "plain": enc(_export(root, "plain", sub_schema(full, [n for n in full.names if n != "pattern"])))}


def _catalog(models, which):
    enc = models["base" if which == "base" else "ext"]
    return load_catalog(models[f"{which}_cat"], enc.schema, strict=False)


def _index(models, store, which="ext", encoder=None, **kw):
    enc = encoder or models[which]
    return index_catalog(_catalog(models, "base" if which == "base" else "ext"), enc, store, batch_size=8, workers=1,
                         **kw)


def _duck_rows(store: DuckDBStore, attrs):
    cols = ", ".join(["id", "fg_row", "image", "image_key", "meta_key", *[f'"emb_{a}"' for a in attrs],
                      *[f'"m_{f}"' for f in store.layout.metadata_types]])
    return store.con.execute(f"SELECT {cols} FROM docs ORDER BY id").fetchall()


def _files(store: DuckDBStore, names):
    d = store.directory / CACHE_DIR
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in names}


def _brute_force(store, ref, attribute, k=5):
    vecs = store.get_vectors([i for i in store.versions()], [attribute])
    q = vecs[ref][attribute] / np.linalg.norm(vecs[ref][attribute])
    scored = sorted((-float(q @ (v[attribute] / np.linalg.norm(v[attribute]))), i) for i, v in vecs.items() if i != ref)
    return [i for _, i in scored[:k]]


@pytest.fixture()
def base_store(models, tmp_path):
    st = DuckDBStore(tmp_path / "store")
    rep = _index(models, st, "base")
    assert rep.ok and rep.indexed == N_ITEMS and rep.codec == "float32"
    yield st
    st.close()


def test_the_embedded_store_gains_a_column_and_nothing_else_is_rewritten(models, base_store, tmp_path):
    base_attrs = models["base"].attributes
    assert base_store.search(QuerySpec(like_id="syn000001", attributes={"sleeve_length": 1.0}, k=3)).hits
    before = _duck_rows(base_store, base_attrs)
    arrays = [f"{i}.f32" for i in range(len(base_attrs))]
    files = _files(base_store, arrays)

    rep = _index(models, base_store)
    assert rep.ok, rep.to_dict()
    assert (rep.extended, rep.indexed, rep.metadata_updated, rep.added_attributes) == (N_ITEMS, 0, 0, ["colour"])
    assert _duck_rows(base_store, base_attrs) == before  # base vectors, rows, images, keys, metadata: as they were
    assert _files(base_store, arrays) == files  # the base attributes' array files byte-identical
    assert set(base_store.versions().values()) == {models["ext"].version}
    assert base_store.layout.attributes == models["ext"].attributes

    # the new attribute's vectors are the extended model's: the same as a full index with it
    full = DuckDBStore(tmp_path / "full")
    assert _index(models, full).indexed == N_ITEMS
    ids = sorted(full.versions())
    got, want = base_store.get_vectors(ids), full.get_vectors(ids)
    assert all(np.array_equal(got[i][a], want[i][a]) for i in ids for a in models["ext"].attributes)
    for mode in ("exact", "ann+rescore"):
        base_store.exact_below = 0  # the ANN index of the new attribute, built from its new array file
        hits = base_store.search(QuerySpec(like_id="syn000003", attributes={"colour": 1.0}, k=5, mode=mode)).hits
        assert [h.id for h in hits] == _brute_force(base_store, "syn000003", "colour")
    mix = QuerySpec(like_id="syn000003", attributes={"colour": 1.0, "neckline": 0.5}, k=5)
    assert [(h.id, round(h.score, 5)) for h in base_store.search(mix).hits] == \
        [(h.id, round(h.score, 5)) for h in full.search(mix).hits]
    full.close()

    again = _index(models, base_store)  # nothing left to do
    assert (again.skipped_current, again.extended, again.indexed) == (N_ITEMS, 0, 0)


def test_a_killed_extension_resumes_without_rewriting_what_it_did(models, base_store):
    def stop(batch):
        raise KeyboardInterrupt

    first = _index(models, base_store, on_batch=stop)
    assert first.aborted and first.extended == 8
    done = {i for i, v in base_store.versions().items() if v == models["ext"].version}
    assert len(done) == 8
    rest = _index(models, base_store)
    assert rest.ok and (rest.extended, rest.skipped_current, rest.indexed) == (N_ITEMS - 8, 8, 0)
    hits = base_store.search(QuerySpec(like_id="syn000005", attributes={"colour": 1.0}, k=5)).hits
    assert [h.id for h in hits] == _brute_force(base_store, "syn000005", "colour")
    # a crash while rows were being rewritten leaves state.json without an epoch: the arrays are rebuilt from DuckDB
    spec = QuerySpec(like_id="syn000005", attributes={"colour": 1.0, "collar": 0.5}, k=5)
    want = [(h.id, round(h.score, 5)) for h in base_store.search(spec).hits]
    state = base_store.directory / CACHE_DIR / "state.json"
    base_store.close()
    state.write_text(json.dumps({**json.loads(state.read_text()), "epoch": ""}))
    again = DuckDBStore(base_store.directory)
    assert [(h.id, round(h.score, 5)) for h in again.search(spec).hits] == want
    assert json.loads(state.read_text())["epoch"] == again.get_meta("cache_epoch") != ""
    again.close()


def test_models_that_do_not_extend_the_index_are_refused(models, base_store):
    with pytest.raises(StoreError, match="not an extension of the index's model"):
        _index(models, base_store, encoder=models["foreign"])
    with pytest.raises(StoreError, match="training checkpoint"):
        _index(models, base_store, encoder=models["from_ckpt"])
    with pytest.raises(StoreError, match="only in the latter: colour"):  # a model trained with colour from the start
        _index(models, base_store, encoder=models["plain"])
    assert base_store.layout.attributes == models["base"].attributes  # nothing was added
    assert set(base_store.versions().values()) == {models["base"].version}


def test_a_dropped_attribute_is_refused_then_added_back_by_its_model(models, base_store):
    assert _index(models, base_store).extended == N_ITEMS
    before = _duck_rows(base_store, models["base"].attributes)
    out = base_store.drop_attribute("colour")
    assert out["attributes"] == models["base"].attributes and base_store.layout.dropped == ("colour",)
    with pytest.raises(QueryError, match="'colour' were dropped"):
        base_store.search(QuerySpec(like_id="syn000001", attributes={"colour": 1.0}, k=3))
    assert base_store.search(QuerySpec(like_id="syn000001", attributes={"neckline": 1.0}, k=3)).hits
    with pytest.raises(StoreError, match="were dropped from"):  # another model with colour: refused
        _index(models, base_store, encoder=models["plain"])
    rep = _index(models, base_store)  # the model it was dropped from: only colour is written back
    assert rep.ok and (rep.extended, rep.indexed, rep.added_attributes) == (N_ITEMS, 0, ["colour"])
    assert [r[:5] for r in _duck_rows(base_store, models["base"].attributes)] == [r[:5] for r in before]
    hits = base_store.search(QuerySpec(like_id="syn000002", attributes={"colour": 1.0}, k=5)).hits
    assert [h.id for h in hits] == _brute_force(base_store, "syn000002", "colour")


def _cli():
    from fgplugin_cli.app import app

    return app


def test_the_cli_reports_the_extension_and_drops_an_attribute(models, tmp_path):
    runner, store = CliRunner(), f"embedded:{tmp_path / 'cli'}"
    for which in ("base", "ext"):
        schema = models[which].schema.save(tmp_path / f"{which}-schema.toml")
        args = ["index", "--catalog", str(models[f"{which}_cat"]), "--model", str(models[which].path), "--store", store,
                "--schema", str(schema), "--workers", "1"]
        result = runner.invoke(_cli(), args)
        assert result.exit_code == 0, result.output
    assert "attributes added" in result.output and "colour" in result.output, result.output
    assert "extended (added vectors only)" in result.output and "index codec" in result.output, result.output
    result = runner.invoke(_cli(), ["store", "drop-attribute", "colour", "--store", store])
    assert result.exit_code == 0 and "dropped colour" in result.output, result.output
    result = runner.invoke(_cli(), ["store", "drop-attribute", "strap", "--store", store])
    assert result.exit_code != 0 and "no attribute 'strap'" in result.output


# -- OpenSearch: the real node -----------------------------------------------------------------------------
@pytest.fixture()
def os_store(models, opensearch_url):
    st = OpenSearchStore.from_url(opensearch_url, index=f"fgext-{uuid.uuid4().hex[:8]}", refresh="wait_for",
                                  engine="lucene")
    rep = _index(models, st, "base")
    assert rep.ok and rep.indexed == N_ITEMS
    yield st
    for name in list(st.client.indices.get(index=f"{st.index}-*")):
        st.client.indices.delete(index=name)
    st.close()


def _sources(st: OpenSearchStore):
    index = st.layout and st._read_index
    got = st.client.search(index=index, body={"size": 1000, "version": True, "query": {"match_all": {}}})
    return index, {h["_id"]: (h["_version"], h["_source"]) for h in got["hits"]["hits"]}


def test_opensearch_gains_a_field_in_the_live_index_and_documents_only_their_new_vector(models, os_store, tmp_path):
    index, before = _sources(os_store)
    rep = _index(models, os_store)
    assert rep.ok and (rep.extended, rep.indexed, rep.added_attributes) == (N_ITEMS, 0, ["colour"]), rep.to_dict()
    assert rep.promoted is None and rep.not_promoted is None  # no new index: the alias serves the same one
    same_index, after = _sources(os_store)
    assert same_index == index and set(after) == set(before)
    for i, (seq, src) in after.items():
        old_seq, old_src = before[i]
        assert seq == old_seq + 1  # one write per document (its _version): the update
        rest = lambda d: {k: v for k, v in d.items() if k not in ("emb_colour", "model_version")}  # noqa: E731
        assert rest(src) == rest(old_src) and "emb_colour" not in old_src  # base vectors, emb_all, metadata, keys
        assert src["model_version"] == models["ext"].version and len(src["emb_colour"]) == 32
    layout = os_store.layout
    assert layout.attributes == models["ext"].attributes and [a for a, _ in layout.combined] == models["base"].attributes
    emb = DuckDBStore(tmp_path / "emb")
    assert _index(models, emb).indexed == N_ITEMS
    for attrs in ({"colour": 1.0}, {"colour": 1.0, "neckline": 0.5}):
        for mode in ("exact", "ann", "ann+rescore"):
            spec = QuerySpec(like_id="syn000003", attributes=attrs, k=5, mode=mode)
            got = os_store.search(spec)
            want = emb.search(QuerySpec(like_id="syn000003", attributes=attrs, k=5))
            assert [h.id for h in got.hits] == [h.id for h in want.hits], (mode, attrs, got.plan)
            np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], atol=1e-4)
            if len(attrs) > 1 and mode != "exact":
                assert got.plan.startswith("plan: attributes: knn on emb_neckline, emb_colour ("), got.plan  # not emb_all
    emb.close()
    assert _index(models, os_store).skipped_current == N_ITEMS  # resumed / repeated: nothing to do
    # ML Commons' ingest pipeline writes emb_all over every attribute of the card: refused on this index, clearly
    with pytest.raises(WiringError, match="emb_all covers sleeve_length, .*pocket only"):
        refuse_grown_index(os_store.layout, layout_for(models["ext"].card), os_store.index)

    os_store.drop_attribute("colour")
    _, dropped = _sources(os_store)
    assert all("emb_colour" not in src for _, src in dropped.values())
    with pytest.raises(QueryError, match="'colour' were dropped"):
        os_store.search(QuerySpec(like_id="syn000001", attributes={"colour": 1.0}, k=3))
    back = _index(models, os_store)
    assert back.ok and (back.extended, back.indexed) == (N_ITEMS, 0)
    hits = os_store.search(QuerySpec(like_id="syn000003", attributes={"colour": 1.0}, k=5)).hits
    assert [h.id for h in hits] == _brute_force(os_store, "syn000003", "colour")


def test_opensearch_refuses_a_model_that_does_not_extend_its_index(models, os_store):
    with pytest.raises(StoreError, match="not an extension of the index's model"):
        _index(models, os_store, encoder=models["foreign"])
    assert os_store.layout.attributes == models["base"].attributes
