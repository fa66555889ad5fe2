"""Training for real on a small generated catalog (CPU): every variant learns, ASEN's attribute spaces
are attribute-specific where the global baseline's are not, and the run mechanics (resume, budget,
refusals, CLI) hold.

Learning settings: the tiny torchvision-block ResNet (``resnet_tiny``) at 64 px, 300 steps of 24
triplets, Adam 1e-3, in-batch triplets (``mining = "batch_all"``), about 20-30 s per variant on two
CPU cores. From random initialisation that learns the generated garments' colour well and the
coarsest shape attribute (hem length) clearly; the finer shape attributes (sleeves, neckline,
collar, pocket) need far longer runs or ImageNet weights (see bench/quality.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fgplugin.catalog import load_catalog
from fgplugin.errors import FgpluginError, ModelCardError
from fgplugin.evaluation import chance_map, encode_catalog, retrieval_map
from fgplugin.models import build_model, load_checkpoint, load_config
from fgplugin.schema import AttributeSchema
from fgplugin.splits import Splits
from fgplugin.training import parse_budget, train

N_ITEMS = 1000
LEARN = {"trunk": "resnet_tiny", "local_trunk": "resnet_tiny", "image_size": 64, "local_size": 32, "embed_dim": 64,
         "attr_embed_dim": 32, "asa_dim": 32, "local_asa_dim": 32, "agmlan_channels": 64,
         "batch_size": 24, "steps": 300, "lr": 1e-3, "mining": "batch_all", "workers": 0}
# Mechanics only (no learning asserted): as small as the trunks allow.
TINY = {**LEARN, "image_size": 32, "local_size": 16, "embed_dim": 16, "batch_size": 4, "steps": 6,
        "mining": "sampled", "eval_every": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fgplugin.synth import generate

    path = generate(tmp_path_factory.mktemp("synth"), N_ITEMS, seed=0, size=96)
    catalog = load_catalog(path, AttributeSchema.load(path.parent / "schema.toml"))
    return catalog, Splits.load(path.parent / "splits.json")


@pytest.fixture(scope="module")
def small_splits(data):
    """A few items per part: for the run mechanics."""
    _, s = data
    return dataclasses.replace(s, train=s.train[:48], valid_query=s.valid_query[:8], valid_candidate=s.valid_candidate[:24])


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Each variant trained once (on demand) and shared by the tests."""
    catalog, splits = data
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(variant: str):
        if variant not in cache:
            result = train(load_config(variant, LEARN), catalog, splits, root / variant, device="cpu")
            model, _ = load_checkpoint(result.last)
            cache[variant] = (result, model, _retrieval(model, catalog, splits))
        return cache[variant]

    return get


def _retrieval(model, catalog, splits):
    """MAP of valid + test queries against valid + test candidates (the papers' protocol), chance,
    and the vectors and labels for further checks."""
    q = list(splits.valid_query) + list(splits.test_query)
    c = list(splits.valid_candidate) + list(splits.test_candidate)
    row = {it.id: r for r, it in enumerate(catalog.items)}
    labels = catalog.label_matrix()
    ql, cl = labels[[row[i] for i in q]], labels[[row[i] for i in c]]
    qv = encode_catalog(model, catalog, q)
    cv = encode_catalog(model, catalog, c)
    names = catalog.schema.names
    return {"map": retrieval_map(qv, ql, cv, cl, attribute_names=names),
            "chance": chance_map(ql, cl, attribute_names=names), "qv": qv, "cv": cv, "ql": ql, "cl": cl}


def _colour_map_of_space(ev, names, space: str) -> float:
    """How well attribute ``space``'s vectors retrieve items of the query's *colour*."""
    a, colour = names.index(space), names.index("colour")
    return retrieval_map(ev["qv"][:, [a]], ev["ql"][:, [colour]], ev["cv"][:, [a]], ev["cl"][:, [colour]])["overall_weighted"]


# -- learning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["asen_v2", "asen", "csn", "ag_mlan", "global", "mtc"])
def test_every_variant_learns_well_above_chance(runs, variant):
    result, model, ev = runs(variant)
    assert result.stopped == "done" and result.steps == LEARN["steps"]
    m, ch = ev["map"], ev["chance"]
    colour, chance_colour = m["per_attribute"]["colour"], ch["per_attribute"]["colour"]
    assert colour > chance_colour + 0.15, (variant, colour, chance_colour)
    assert m["overall_weighted"] > ch["overall_weighted"] + 0.02, (variant, m["overall_weighted"], ch["overall_weighted"])
    # (No check on the loss curve: batch_all averages over the triplets still active, which stays near
    # the margin as easy ones drop out; the MAP checks above are what says it learned.)
    assert all(np.isfinite(h["loss"]) for h in result.history) and len(result.validations) >= 2
    if variant == "asen_v2":  # both stages ran; the second trained the local branch jointly
        assert {h["stage"] for h in result.history} == {1, 2} and "align" in result.history[-1]
        assert float(model.share) == pytest.approx(0.6)


@pytest.mark.parametrize("variant", ["asen", "asen_v2"])
def test_asen_beats_the_global_baseline_on_a_shape_attribute(runs, variant):
    """Hem length is a shape attribute: the global baseline's single space is dominated by colour and
    ranks hems near chance; ASEN's hem_length space learns the hem."""
    _, _, ev = runs(variant)
    _, _, ev_global = runs("global")
    hem = ev["map"]["per_attribute"]["hem_length"]
    hem_global = ev_global["map"]["per_attribute"]["hem_length"]
    chance = ev["chance"]["per_attribute"]["hem_length"]
    assert hem > chance + 0.04, (variant, hem, chance)
    assert hem > hem_global + 0.025, (variant, hem, hem_global, chance)


@pytest.mark.parametrize("variant", ["asen", "asen_v2"])
def test_asen_shape_spaces_are_attribute_specific_unlike_the_global_baseline(runs, data, variant):
    """The global baseline has one space: for a shape attribute it ranks by colour, what dominates
    it. ASEN's sleeve_length / hem_length spaces are trained to ignore colour (same-colour items
    with another sleeve are negatives there), so they retrieve colour barely better than chance."""
    catalog, _ = data
    names = catalog.schema.names
    _, _, ev_asen = runs(variant)
    _, _, ev_global = runs("global")
    chance = ev_global["chance"]["per_attribute"]["colour"]
    for space in ("sleeve_length", "hem_length"):
        leak_global = _colour_map_of_space(ev_global, names, space)
        leak_asen = _colour_map_of_space(ev_asen, names, space)
        assert leak_global > chance + 0.15, (space, leak_global, chance)
        assert leak_asen < chance + 0.5 * (leak_global - chance), (space, leak_asen, leak_global, chance)
    # ... while its colour space is as good as the baseline's.
    assert ev_asen["map"]["per_attribute"]["colour"] > ev_global["map"]["per_attribute"]["colour"] - 0.05


def test_trained_asen_v2_exports_and_attends_inside_the_image(runs, data, tmp_path):
    from fgplugin.export import ExportedEncoder, export_model

    catalog, splits = data
    result, model, _ = runs("asen_v2")
    out = export_model(result.last, tmp_path / "export")
    enc = ExportedEncoder.load(out, schema=catalog.schema, device="cpu")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc.embed_all(x), model.embed_all(x), atol=1e-4)
        maps, boxes = model.attention(x, torch.arange(3))
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    side = boxes[:, 2] - boxes[:, 0]
    assert torch.allclose(side, boxes[:, 3] - boxes[:, 1]) and torch.all(boxes >= 0) and torch.all(boxes <= 64)


# -- mechanics ---------------------------------------------------------------------------------------
def _embeddings(ckpt, x):
    model, state = load_checkpoint(ckpt)
    with torch.no_grad():
        return model.embed_all(x), state


def test_resume_continues_the_step_count_and_the_same_trajectory(data, small_splits, tmp_path):
    catalog, _ = data
    x = torch.randn(2, 3, 32, 32)
    straight = train(load_config("asen", TINY), catalog, small_splits, tmp_path / "a", device="cpu")
    first = train(load_config("asen", {**TINY, "steps": 3}), catalog, small_splits, tmp_path / "b", device="cpu")
    assert first.steps == 3 and _embeddings(first.last, x)[1]["step"] == 3
    resumed = train(load_config("asen", TINY), catalog, small_splits, tmp_path / "b", device="cpu", resume=True)
    assert resumed.steps == 6 and resumed.total_steps == 6
    assert [v["step"] for v in resumed.validations] == [3, 6]  # history carried over from the first call
    a, state_a = _embeddings(straight.last, x)
    b, state_b = _embeddings(resumed.last, x)
    assert state_b["step"] == 6
    # The optimiser state, step and per-step random draws were restored: the same weights as one run.
    assert torch.allclose(a, b, atol=1e-5)
    # A finished run resumed again has nothing left to do.
    again = train(load_config("asen", TINY), catalog, small_splits, tmp_path / "b", device="cpu", resume=True)
    assert again.stopped == "already done" and again.steps == 6


@pytest.mark.parametrize("variant", ["asen_v2", "ag_mlan", "mtc"])
def test_frozen_trunk_stages_stay_as_loaded_while_the_rest_trains(data, small_splits, tmp_path, variant):
    catalog, _ = data
    cfg = load_config(variant, {**TINY, "freeze_stages": 1, "steps": 4, "stage1_fraction": 0.5})
    torch.manual_seed(cfg.train.seed)  # as train() does before building its model
    start = build_model(cfg, catalog.schema)
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(weights))
    result = train(cfg, catalog, small_splits, tmp_path / "run", device="cpu", validate=False)
    model, _ = load_checkpoint(result.last)
    before, after = load_file(str(weights)), model.state_dict()
    stage_of = _trunk_stage_of_keys(model)
    stem = {k for k in before if stage_of[k] == 0}
    later = {k for k in before if stage_of[k] == 1 and "running" not in k and "num_batches" not in k}
    assert stem and later
    # The stride-8 stage of every trunk: weights and BatchNorm statistics exactly as loaded ...
    assert all(torch.equal(before[k], after[k]) for k in stem), [k for k in stem if not torch.equal(before[k], after[k])]
    # ... while the next stage trained.
    assert any(not torch.equal(before[k], after[k]) for k in later)
    if variant == "asen_v2":  # the local branch's own trunk too
        assert any(k.startswith("local_branch.") for k in stem)
    model.train()
    assert all(not m.training for m in model.frozen_trunk_stages()) and model.frozen_trunk_stages()
    with pytest.raises(ModelCardError, match=r"freeze_stages: 1 -> 0"):  # the optimiser state would not fit
        train(load_config(variant, {**TINY, "steps": 6, "stage1_fraction": 0.5}), catalog, small_splits,
              tmp_path / "run", device="cpu", resume=True)
    with pytest.raises(FgpluginError, match="freeze_stages must be 0, 1, 2 or 3"):
        load_config(variant, {"freeze_stages": 4})


def _trunk_stage_of_keys(model) -> dict[str, int | None]:
    """Each state-dict key's trunk stage (0, 1, 2), or None outside the trunks."""
    mods = dict(model.named_modules())

    def stage(key: str) -> int | None:
        owner = key.rsplit(".", 1)[0]
        while owner:
            if getattr(mods.get(owner), "trunk_stage", None) is not None:
                return mods[owner].trunk_stage
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        return None

    return {k: stage(k) for k in model.state_dict()}


def test_budget_stops_early_and_the_run_resumes(data, small_splits, tmp_path):
    catalog, _ = data
    cfg = load_config("asen_v2", {**TINY, "steps": 8, "cache": "off"})  # images decoded per step
    stopped = train(cfg, catalog, small_splits, tmp_path / "run", device="cpu", budget_s=1e-3)
    assert stopped.stopped == "budget" and stopped.steps == 1
    assert (stopped.last / "weights.safetensors").is_file() and (stopped.last / "optimizer.pt").is_file()
    done = train(cfg, catalog, small_splits, tmp_path / "run", device="cpu", resume=True)
    assert done.stopped == "done" and done.steps == 8
    assert {h["stage"] for h in done.history} == {1, 2}


def test_runs_are_never_overwritten_or_resumed_with_another_model(data, small_splits, tmp_path):
    catalog, _ = data
    train(load_config("global", {**TINY, "steps": 2}), catalog, small_splits, tmp_path / "run", device="cpu",
          validate=False)
    with pytest.raises(FgpluginError, match="already holds a training run"):
        train(load_config("global", {**TINY, "steps": 2}), catalog, small_splits, tmp_path / "run", device="cpu")
    with pytest.raises(ModelCardError, match=r"another model config \(embed_dim: 16 -> 32"):
        train(load_config("global", {**TINY, "steps": 4, "embed_dim": 32}), catalog, small_splits, tmp_path / "run",
              device="cpu", resume=True)
    # The saved optimiser state carries the rates it was made with: a changed one is refused by name,
    # not silently overridden by the restored state (or failing later on the parameter-group count).
    with pytest.raises(ModelCardError, match=r"optimisation settings \(lr: .* -> 0\.05\)"):
        train(load_config("global", {**TINY, "steps": 4, "lr": 0.05}), catalog, small_splits, tmp_path / "run",
              device="cpu", resume=True)
    with pytest.raises(ModelCardError, match=r"trunk_lr_scale: 1\.0 -> 0\.1"):
        train(load_config("global", {**TINY, "steps": 4, "trunk_lr_scale": 0.1}), catalog, small_splits,
              tmp_path / "run", device="cpu", resume=True)
    more = train(load_config("global", {**TINY, "steps": 4}), catalog, small_splits, tmp_path / "run", device="cpu",
                 validate=False, resume=True)
    assert more.steps == 4  # the run's own settings with more steps still resume
    bad = dataclasses.replace(small_splits, train=["nope", *small_splits.train])
    with pytest.raises(FgpluginError, match="not in"):
        train(load_config("global", TINY), catalog, bad, tmp_path / "other", device="cpu")


def test_parse_budget():
    assert parse_budget("90s") == 90 and parse_budget("10m") == 600 and parse_budget("1h30m") == 5400
    assert parse_budget("45") == 45 and parse_budget(None) is None and parse_budget("") is None
    with pytest.raises(FgpluginError, match="time budget"):
        parse_budget("ten minutes")


def test_cli_train_runs_refuses_and_resumes(data, small_splits, tmp_path):
    from fgplugin_cli.app import app

    catalog, _ = data
    splits_path = small_splits.save(tmp_path / "splits.json")
    out = tmp_path / "run"
    base = ["train", "--catalog", str(catalog.path), "--splits", str(splits_path), "--out", str(out),
            "--variant", "asen_v2", "--trunk", "resnet_tiny", "--image-size", "32", "--batch-size", "4",
            "--lr", "1e-3", "--seed", "1", "--device", "cpu", "--set", "local_trunk=resnet_tiny",
            "--set", "local_size=16", "--set", "embed_dim=16", "--set", "workers=0"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["steps"] == 3 and summary["stopped"] == "done"
    model, _ = load_checkpoint(summary["last"])
    assert model.config.trunk == "resnet_tiny" and model.config.train.seed == 1 and model.config.image_size == 32
    res = runner.invoke(app, [*base, "--steps", "3"])
    assert res.exit_code == 2 and "already holds a training run" in res.output
    res = runner.invoke(app, [*base, "--steps", "5", "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "step 5/5" in res.output
    res = runner.invoke(app, [*base, "--steps", "5", "--set", "lrr=1"])
    assert res.exit_code == 2 and "unknown config key 'lrr'" in res.output
    assert np.isfinite(summary["seconds"])
