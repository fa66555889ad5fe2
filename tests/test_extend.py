"""`fgplugin train --extend`: a model learns a held-back attribute with its base frozen, the base
attributes' vectors stay bit-identical (in memory and through the written exports), the card records
what it extends, and every way it cannot work is refused with the item and the cause.

The base models are untrained (random trunks: what the extension learns from is then plainly its own
doing) and tiny (``resnet_tiny`` at 64 px, 32-d). The base holds back ``colour`` and ``pattern``;
``colour`` is labelled on two rows of three (partial labels). Measured on two busy CPU cores: about
140 s for the file (40 s of it the learning fixture: data, base export, 60 extension steps, export).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fgplugin.card import extension_of, read_card
from fgplugin.catalog import load_catalog, write_catalog
from fgplugin.errors import ModelCardError
from fgplugin.evaluation import chance_map, encode_catalog, retrieval_map
from fgplugin.export import ExportedEncoder, export_model
from fgplugin.loading import load_extension_base
from fgplugin.models import build_model, load_checkpoint, load_config, save_checkpoint
from fgplugin.models.config import ConfigError
from fgplugin.models.extend import ExtensionError, sub_schema
from fgplugin.models.factory import build_extension
from fgplugin.schema import AttributeSchema
from fgplugin.splits import Splits
from fgplugin.training.extend import extend

N_ITEMS = 300
HELD = ["colour", "pattern"]
TINY = {"trunk": "resnet_tiny", "local_trunk": "resnet_tiny", "image_size": 64, "local_size": 32, "embed_dim": 32,
        "attr_embed_dim": 32, "asa_dim": 32, "local_asa_dim": 32, "agmlan_channels": 32}
LEARN = {"steps": 60, "batch_size": 24, "lr": 1e-3, "mining": "batch_all", "workers": 0, "eval_every": 60}
MECHANICS = {"steps": 2, "batch_size": 4, "workers": 0}


def _base_export(root, name: str, variant: str, schema, **extra):
    torch.manual_seed(0)
    model = build_model(load_config(variant, {**TINY, **extra}), schema)
    save_checkpoint(root / f"ckpt-{name}", model)
    return export_model(root / f"ckpt-{name}", root / f"export-{name}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fgplugin.synth import generate

    path = generate(tmp_path_factory.mktemp("synth"), N_ITEMS, seed=0, size=64, workers=1)
    full = AttributeSchema.load(path.parent / "schema.toml")
    rows = []
    for i, it in enumerate(load_catalog(path, full)):
        row = it.to_row()
        if i % 3 == 2:
            row["colour"] = None  # partial labels: a third of the rows lack the new attribute
        rows.append(row)
    partial = write_catalog(path.parent / "partial.jsonl", rows)
    base_schema = sub_schema(full, [n for n in full.names if n not in HELD])
    return {"catalog": path, "partial": partial, "full": full, "base_schema": base_schema,
            "splits": Splits.load(path.parent / "splits.json"), "root": tmp_path_factory.mktemp("extend")}


@pytest.fixture(scope="module")
def extended(data):
    root = data["root"]
    base_export = _base_export(root, "asen", "asen", data["base_schema"])
    base, version = load_extension_base(base_export)
    result = extend(base, version, data["partial"], ["colour"], root / "run", overrides=LEARN, device="cpu")
    return {"base": base, "base_export": base_export, "result": result,
            "export": export_model(result.last, root / "export-extended")}


def _images(n=5, size=64):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size)


def test_the_extension_learns_the_held_back_attribute(data, extended):
    enc = ExportedEncoder.load(extended["export"], device="cpu")
    catalog, splits = load_catalog(data["catalog"], data["full"]), data["splits"]
    q, c = list(splits.valid_query) + list(splits.test_query), list(splits.valid_candidate) + list(splits.test_candidate)
    row = {it.id: r for r, it in enumerate(catalog.items)}
    labels = catalog.label_matrix()[:, [data["full"].index("colour")]]
    ql, cl = labels[[row[i] for i in q]], labels[[row[i] for i in c]]
    j = enc.attributes.index("colour")
    got = retrieval_map(encode_catalog(enc, catalog, q)[:, [j]], ql, encode_catalog(enc, catalog, c)[:, [j]], cl)
    chance = chance_map(ql, cl)
    assert got["overall_weighted"] > chance["overall_weighted"] + 0.08, (got["overall_weighted"], chance)
    result = extended["result"]
    assert result.stopped == "done" and result.steps == LEARN["steps"]
    # validation ran on the new attribute only: the base attributes' labels were left out
    per = result.validations[-1]["per_attribute"]
    assert list(per) == ["colour"] and per["colour"] > chance["overall_weighted"]


def test_base_vectors_are_bit_identical_in_memory_and_through_the_exports(data, extended):
    base = extended["base"]
    model, _ = load_checkpoint(extended["result"].last)
    names = data["base_schema"].names
    assert model.schema.names == [*names, "colour"]
    x = _images()
    with torch.no_grad():
        old, new = base.embed_all(x), model.embed_all(x)
    a0, d0 = old.shape[1:]
    assert torch.equal(old, new[:, :a0, :d0]) and not torch.equal(new[:, a0], new[:, 0])
    b = ExportedEncoder.load(extended["base_export"], device="cpu")
    e = ExportedEncoder.load(extended["export"], device="cpu")
    assert torch.equal(b.embed_all(x), e.embed_all(x)[:, :a0, :d0])
    vb, ve = b.encode_tensors(x), e.encode_tensors(x)
    assert all(np.array_equal(vb[n], ve[n]) for n in names)
    np.testing.assert_allclose(np.linalg.norm(ve["colour"], axis=1), 1.0, atol=1e-5)
    # attention maps: a base attribute's are the base's, the new one's its own part's
    idx = torch.tensor([0, a0, 1, a0, 2])
    with torch.no_grad():
        maps, boxes = model.attention(x, idx)
        old_maps, _ = base.attention(x, idx.clamp(max=a0 - 1))
    base_rows = idx < a0
    assert torch.equal(maps[base_rows], old_maps[base_rows]) and not torch.equal(maps[1], old_maps[1])


def test_the_card_records_what_it_extends(extended):
    card, base_card = read_card(extended["export"]), read_card(extended["base_export"])
    assert extension_of(base_card) is None
    version, attributes, added = extension_of(card)
    assert version == base_card["version"] and attributes == base_card["attributes"] and added == ["colour"]
    assert card["variant"] == base_card["variant"] and card["version"] != base_card["version"]
    with pytest.raises(ModelCardError, match="does not fit"):
        extension_of({**card, "extends": {**card["extends"], "added": ["pattern"]}})


def test_an_extended_export_extends_again_keeping_every_earlier_vector(data, extended):
    root = data["root"]
    first, version = load_extension_base(extended["export"])
    run = extend(first, version, data["catalog"], ["pattern"], root / "run-2", overrides=MECHANICS, device="cpu",
                 validate=False)
    out = export_model(run.last, root / "export-2")
    e1, e2 = ExportedEncoder.load(extended["export"], device="cpu"), ExportedEncoder.load(out, device="cpu")
    x = _images()
    v1, v2 = e1.embed_all(x), e2.embed_all(x)
    assert e2.attributes == [*e1.attributes, "pattern"] and torch.equal(v1, v2[:, :v1.shape[1], :v1.shape[2]])
    assert extension_of(e2.card) == (e1.version, e1.attributes, ["pattern"])


@pytest.mark.parametrize("variant", ["asen_v2", "csn", "mtc", "ag_mlan"])
def test_every_extendable_variant_keeps_the_base_vectors_bit_identical(data, variant):
    root = data["root"] / variant
    base_export = _base_export(root, variant, variant, data["base_schema"], image_size=32, local_size=16)
    base, version = load_extension_base(base_export)
    run = extend(base, version, data["partial"], ["colour"], root / "run", overrides=MECHANICS, device="cpu",
                 validate=False)
    model, _ = load_checkpoint(run.last)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("parts.0.") for n in trained)
    b = ExportedEncoder.load(base_export, device="cpu")
    e = ExportedEncoder.load(export_model(run.last, root / "export-extended"), device="cpu")
    x = _images(3, 32)
    vb, ve = b.embed_all(x), e.embed_all(x)
    assert torch.equal(vb, ve[:, :vb.shape[1], :vb.shape[2]]), variant
    with torch.no_grad():
        assert torch.equal(base.embed_all(x), model.embed_all(x)[:, :vb.shape[1], :vb.shape[2]])
        # the new part's vectors at inference are those its training sees (the same trunk pass)
        part = model.parts[-1].embed_all(x)
        assert torch.equal(model.embed_all(x)[:, vb.shape[1]:, :part.shape[2]], part)


def test_the_new_part_trains_its_own_copy_of_the_last_trunk_stage(data, extended, tmp_path):
    """train.extend_last_stage (default): the part reads the base's first trunk stage and trains a copy
    of the last one its vectors read; the base's stays as it was; the checkpoint and the export rebuild
    the same structure; with the option off, every stage is the base's."""
    base = extended["base"]
    model, _ = load_checkpoint(extended["result"].last)
    assert model.own_stages == [0]  # this base froze no stage
    root, part = model.root.global_branch.features.stages, model.parts[0].global_branch.features.stages
    assert part[0] is root[0] and part[-1] is not root[-1]
    copied = dict(part[-1].named_parameters())
    moved = [n for n, p in root[-1].named_parameters() if not torch.equal(p, copied[n])]
    assert moved, "the copy of the last stage did not learn"
    for n, p in root[-1].state_dict().items():
        assert torch.equal(p, base.global_branch.features.stages[-1].state_dict()[n]), n
    assert read_card(extended["export"])["extends"]["own_stages"] == [0]
    reloaded, _ = load_extension_base(extended["export"])
    x = _images()
    with torch.no_grad():
        assert torch.equal(reloaded.embed_all(x), model.embed_all(x))
    # a run made with shared stages refuses to be resumed with own ones, naming the setting
    version = read_card(extended["base_export"])["version"]
    shared = extend(base, version, data["partial"], ["colour"], tmp_path / "run",
                    overrides={**MECHANICS, "steps": 1, "extend_last_stage": False}, device="cpu", validate=False)
    m, _ = load_checkpoint(shared.last)
    assert m.own_stages == [None]
    assert m.parts[0].global_branch.features.stages[-1] is m.root.global_branch.features.stages[-1]
    assert not any(n.startswith("parts.0.global_branch.features") for n, _ in m.named_parameters())
    with pytest.raises(ModelCardError, match="extend_last_stage"):
        extend(base, version, data["partial"], ["colour"], tmp_path / "run", overrides=MECHANICS, device="cpu",
               validate=False, resume=True)
    # stages kept as loaded (train.freeze_stages) stay shared: here every stage of the trunk
    frozen = extend(base, version, data["partial"], ["colour"], tmp_path / "frozen",
                    overrides={**MECHANICS, "steps": 1, "freeze_stages": 2}, device="cpu", validate=False)
    assert load_checkpoint(frozen.last)[0].own_stages == [None]


@pytest.mark.parametrize("variant", ["asen", "csn"])
def test_the_own_stage_starts_from_the_base_or_from_the_trunk_weights(data, variant, tmp_path):
    """train.extend_stage_start: "base" copies the base's fine-tuned last stage, "weights" the trunk's
    own (its weights file), which still holds what the base's fine-tuning changed."""
    from fgplugin.models.trunks import TinyResNet, build_trunk

    torch.manual_seed(5)
    path = tmp_path / "tiny.pth"
    torch.save(TinyResNet().state_dict(), path)
    base = build_model(load_config(variant, {**TINY, "trunk_weights": str(path)}), data["base_schema"])
    last = (base.global_branch.features if variant == "asen" else base.features).stages
    with torch.no_grad():  # as the base's training would: its last stage is no longer the file's
        for p in last[-1].parameters():
            p.add_(0.5)
    loaded = build_trunk("resnet_tiny", str(path)).stages[len(last) - 1].state_dict()
    full = sub_schema(data["full"], [*data["base_schema"].names, "colour"])
    extends = {"version": None, "attributes": data["base_schema"].names, "added": ["colour"]}
    for start, want in (("base", last[-1].state_dict()), ("weights", loaded)):
        part = build_extension(base, full, extends, own_stages=0, stages_from=start).parts[0]
        own = (part.global_branch.features if variant == "asen" else part.features).stages
        assert own[0] is last[0] and own[-1] is not last[-1]
        got = own[-1].state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()), start
    with pytest.raises(ConfigError, match="extend_stage_start must be base or weights"):
        load_config(variant, {**TINY, "extend_stage_start": "imagenet"})


def test_an_extension_resumes_and_refuses_another_one_in_its_folder(data, extended, tmp_path):
    base, version = extended["base"], read_card(extended["base_export"])["version"]
    one = extend(base, version, data["partial"], ["colour"], tmp_path / "run", overrides={**MECHANICS, "steps": 1},
                 device="cpu", validate=False)
    assert one.steps == 1
    two = extend(base, version, data["partial"], ["colour"], tmp_path / "run", overrides=MECHANICS, device="cpu",
                 validate=False, resume=True)
    assert two.steps == 2 and two.stopped == "done"
    with pytest.raises(ModelCardError, match="use a new --out folder"):
        extend(base, version, data["catalog"], ["pattern"], tmp_path / "run", overrides=MECHANICS, device="cpu",
               validate=False, resume=True)


# -- refusals ----------------------------------------------------------------------------------------
def test_refusals_name_the_item_and_the_cause(data, extended, tmp_path):
    base, version = extended["base"], read_card(extended["base_export"])["version"]
    go = lambda attrs, catalog=data["partial"], **kw: extend(base, version, catalog, attrs, tmp_path / "run",  # noqa: E731
                                                            device="cpu", **kw)
    with pytest.raises(ExtensionError, match="'neckline' is already in the base model"):
        go(["neckline"])
    with pytest.raises(ExtensionError, match="'strap' is not declared"):
        go(["strap"])
    # the catalog's schema changes a base attribute's values
    d = data["full"].to_dict()
    d["attributes"]["neckline"]["values"] = list(reversed(d["attributes"]["neckline"]["values"]))
    other = tmp_path / "other"
    other.mkdir()
    AttributeSchema.from_dict(d).save(other / "schema.toml")
    shutil.copy(data["partial"], other / "partial.jsonl")
    with pytest.raises(ExtensionError, match="'neckline' differs between the base model"):
        go(["colour"], other / "partial.jsonl")
    with pytest.raises(ConfigError, match="drop --set embed_dim"):
        go(["colour"], overrides={"embed_dim": 8})
    # too few labelled rows for the new attribute
    rows = [it.to_row() for it in load_catalog(data["catalog"], data["full"])]
    for r in rows[1:]:
        r["pattern"] = None
    few = write_catalog(data["catalog"].parent / "few.jsonl", rows)
    with pytest.raises(ExtensionError, match="'pattern' has [01] labelled training items"):
        go(["pattern"], few)
    assert not (tmp_path / "run").exists()  # nothing was trained


@pytest.mark.parametrize("variant,extra,cause", [
    ("global", {}, "a global model cannot be extended: its one embedding is shared"),
    ("csn", {"csn_mask": "fixed"}, "fixed masks"),
])
def test_variants_that_cannot_be_extended_say_why(data, variant, extra, cause):
    base = build_model(load_config(variant, {**TINY, **extra}), data["base_schema"])
    full = sub_schema(data["full"], [*data["base_schema"].names, "colour"])
    with pytest.raises(ExtensionError, match=cause):
        build_extension(base, full, {"version": None, "attributes": data["base_schema"].names, "added": ["colour"]})


def test_a_damaged_export_is_refused(extended, tmp_path):
    bad = shutil.copytree(extended["base_export"], tmp_path / "bad")
    weights = bad / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelCardError, match="do not match the card's version"):
        load_extension_base(bad)


def test_cli_extends_and_refuses(data, extended, tmp_path):
    from fgplugin_cli.app import app

    runner = CliRunner()
    base = ["train", "--catalog", str(data["partial"]), "--out", str(tmp_path / "run")]
    res = runner.invoke(app, [*base, "--extend", str(extended["base_export"]), "--attribute", "colour",
                              "--steps", "2", "--batch-size", "4", "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["steps"] == 2 and (tmp_path / "run" / "schema.toml").is_file()
    # the extended schema (base attributes, then the new one) is what eval needs for this catalog
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--catalog", str(data["partial"]),
                              "--schema", str(tmp_path / "run" / "schema.toml"), "--json"])
    assert res.exit_code == 0, res.output
    assert "colour" in json.loads(res.stdout)["per_attribute_map"]
    res = runner.invoke(app, [*base, "--attribute", "colour"])
    assert res.exit_code == 2 and "--extend" in res.output
    res = runner.invoke(app, [*base, "--extend", str(extended["base_export"]), "--attribute", "colour",
                              "--variant", "mtc"])
    assert res.exit_code == 2 and "asen model" in res.output
