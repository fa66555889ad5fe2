"""Compact vectors (`fgplugin export --dim N`, fgplugin.models.compact): the fitted projection keeps the
ranking the full vectors give, a compact export of a trained model still learned (MAP well above chance,
close to the full size), the written encoder gives the in-memory compact model's vectors, and what
cannot work is refused with its cause.

The trained model is tiny (``resnet_tiny`` at 64 px, 32-d heads, 80 steps on 300 generated items);
measured on two busy CPU cores: about 60 s for the file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fgplugin.card import read_card
from fgplugin.catalog import load_catalog
from fgplugin.errors import ModelCardError
from fgplugin.evaluation import evaluate
from fgplugin.export import ExportedEncoder
from fgplugin.loading import load_extension_base
from fgplugin.models import build_model, load_checkpoint, load_config
from fgplugin.models.compact import CompactError, CompactModel, fit_projection
from fgplugin.schema import AttributeSchema
from fgplugin.splits import Splits
from fgplugin.training import train
from fgplugin.training.compact import compact_model
from fgplugin_cli.app import app

TINY = {"trunk": "resnet_tiny", "image_size": 64, "embed_dim": 32, "attr_embed_dim": 32, "asa_dim": 32,
        "steps": 80, "batch_size": 24, "lr": 1e-3, "mining": "batch_all", "workers": 0, "eval_every": 80}
DIM = 8


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_the_projection_keeps_the_ranking_of_vectors_that_live_in_few_dimensions():
    rng = np.random.default_rng(0)
    n, width, rank = 400, 48, 6
    # every attribute's vectors span a random 6-d subspace around an offset (plus a little noise)
    planted = [rng.normal(size=(rank, width)) for _ in range(2)]
    vecs = np.stack([_unit(rng.normal(size=(n, rank)) @ p + 3.0 * p[0] + 0.01 * rng.normal(size=(n, width)))
                     for p in planted], axis=1).astype(np.float32)
    proj = fit_projection(vecs, {"a": width, "b": width}, ["a", "b"], rank)
    assert proj.basis.shape == (2, width, rank) and proj.items == n
    assert min(proj.kept_variance.values()) > 0.99
    for i in range(2):
        y = _unit((vecs[:, i] - proj.mean[i]) @ proj.basis[i])
        x = vecs[:, i] - vecs[:, i].mean(axis=0)
        x = _unit(x)
        full, small = np.argsort(-(x[:20] @ x.T), axis=1)[:, :10], np.argsort(-(y[:20] @ y.T), axis=1)[:, :10]
        overlap = np.mean([len(set(f) & set(s)) / 10 for f, s in zip(full, small)])
        assert overlap > 0.95, overlap
    # the axes are orthonormal, so the projection of a centred vector keeps its length within the subspace
    b = proj.basis[0]
    assert np.allclose(b.T @ b, np.eye(rank), atol=1e-5)


def test_a_size_that_is_not_smaller_or_data_too_few_are_refused():
    vecs = np.zeros((10, 1, 16), np.float32)
    with pytest.raises(CompactError, match=r"--dim 16: .*below the model's narrowest attribute vector \(16 values\)"):
        fit_projection(vecs, {"a": 16}, ["a"], 16)
    with pytest.raises(CompactError, match=r"--dim 8 needs at least 16 training items .*the training split has 10"):
        fit_projection(vecs, {"a": 16}, ["a"], 8)


def test_asen_v2s_global_and_local_concatenation_is_projected_to_one_chosen_size():
    from fgplugin import synth

    schema = synth.synth_schema()
    torch.manual_seed(0)
    base = build_model(load_config("asen_v2", {**TINY, "local_trunk": "resnet_tiny", "local_size": 32,
                                               "local_asa_dim": 32}), schema).eval()
    assert set(base.dims.values()) == {64}  # 32 global + 32 local values: the concatenation doubles the width
    with torch.no_grad():
        vecs = base.embed_all(torch.randn(40, 3, 64, 64)).numpy()
    model = CompactModel(base, fit_projection(vecs, dict(base.dims), schema.names, 16)).eval()
    with torch.no_grad():
        out = model.embed_all(torch.randn(3, 3, 64, 64))
    assert model.dims == {a: 16 for a in schema.names} and out.shape == (3, len(schema), 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3, len(schema)), atol=1e-5)


def test_a_model_with_a_slack_value_is_refused(tmp_path):
    from fgplugin import synth

    schema = synth.synth_schema()
    cfg = load_config("asen", {**TINY, "cls_weight": 1.0, "classifier": "linear", "proxy_share": 0.5,
                               "posterior": "prob"})
    model = build_model(cfg, schema)
    proj = fit_projection(np.random.default_rng(0).normal(size=(40, len(schema), model.dim)).astype(np.float32),
                          dict(model.dims), schema.names, 4)
    with pytest.raises(CompactError, match="slack value"):
        CompactModel(model, proj)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fgplugin.synth import generate

    root = tmp_path_factory.mktemp("compact")
    path = generate(root / "data", 300, seed=0, size=64, workers=1)
    schema = AttributeSchema.load(path.parent / "schema.toml")
    torch.manual_seed(0)
    result = train(load_config("asen", TINY), path, path.parent / "splits.json", root / "run", device="cpu")
    return {"root": root, "catalog": path, "schema": schema, "splits": Splits.load(path.parent / "splits.json"),
            "run": result}


def test_a_compact_export_learned_and_its_encoder_gives_the_compact_vectors(trained):
    root, cat = trained["root"], load_catalog(trained["catalog"], trained["schema"])
    out = root / "export-8"
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(trained["run"].checkpoint), "--out", str(out),
                                   "--catalog", str(trained["catalog"]), "--dim", str(DIM), "--triplets", "200",
                                   "--json"])
    assert res.exit_code == 0, res.output
    card = read_card(out)
    assert set(card["dims"].values()) == {DIM} and card["embedding_dim"] == DIM
    assert card["compact"]["dim"] == DIM and set(card["compact"]["from_dims"].values()) == {32}
    assert "extends" not in card
    # the model learned, and the projection to a quarter of the width kept most of it (test part)
    full_model, _ = load_checkpoint(trained["run"].checkpoint)
    full = evaluate(full_model, cat, trained["splits"], n_triplets=0)
    small = card["metrics"]
    chance = small["chance"]["overall_weighted"]
    # (measured: full 34.9, compact 35.5, chance 27.9; the tiny model learns little in 80 steps, but above chance)
    assert small["overall_weighted"] > chance + 0.05, (small["overall_weighted"], chance)
    assert small["overall_weighted"] > full.overall_weighted - 0.03, (small["overall_weighted"], full.overall_weighted)
    # the written encoder is the compact model: 8 values per attribute, unit length
    enc = ExportedEncoder.load(out, device="cpu")
    again = compact_model(full_model, cat, trained["splits"], DIM)
    torch.manual_seed(3)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        got, want = enc.embed_all(x), again.embed_all(x)
    assert got.shape == (5, len(trained["schema"]), DIM)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(got.norm(dim=-1), torch.ones(5, len(trained["schema"])), atol=1e-5)
    # a compact export is not a base to extend (its vectors are a projection fitted for its own attributes)
    with pytest.raises(ModelCardError, match=r"a compact export \(--dim 8\) cannot be extended"):
        load_extension_base(out)
    # the index takes it like any export: 8-d int8 codes, 8 bytes per attribute
    store = root / "store"
    res = CliRunner().invoke(app, ["index", "--model", str(out), "--catalog", str(trained["catalog"]),
                                   "--store", f"embedded:{store}", "--codec", "int8", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["indexed"] == len(cat) and report["failed"] == 0
    from fgplugin.search.embedded import DuckDBStore

    with DuckDBStore(store, read_only=True) as st:
        assert st.layout.dims == {a: DIM for a in trained["schema"].names} and st.layout.codec == "int8"


def test_dim_without_a_catalog_is_refused(trained, tmp_path):
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(trained["run"].checkpoint), "--out",
                                   str(tmp_path / "e"), "--dim", "8"])
    assert res.exit_code != 0
    assert "--dim fits its projection on the training split: give --catalog too" in " ".join(res.output.split())
