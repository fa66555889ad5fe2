"""Exports: identical vectors to the in-memory model, a complete model card, refusals, no training code.

Round-trip tolerance: max abs difference <= 1e-5 between the export and the in-memory model on the
same float32 input (measured: exactly 0 on CPU for torch.export programs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fgplugin.catalog import load_catalog
from fgplugin.errors import ModelCardError
from fgplugin.card import CARD_FILE, WEIGHTS_FILE, compute_integrity, compute_version
from fgplugin.export import ExportedEncoder, export_model
from fgplugin.images import load_image
from fgplugin.models import build_model, load_config, save_checkpoint
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.splits import Splits
from fgplugin.synth import generate, synth_schema
from fgplugin_cli.app import app

ATOL = 1e-5
SMALL = {"trunk": "resnet_tiny", "local_trunk": "resnet_tiny", "image_size": 64, "local_size": 32,
         "embed_dim": 32, "attr_embed_dim": 16, "asa_dim": 16, "local_asa_dim": 16, "agmlan_channels": 16}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth"), 60, seed=3, size=80)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, synth):
    """{variant: (in-memory model, export dir, loaded export)}: asen_v2 through the CLI with --catalog,
    csn through the API, with the proxy posterior in its vectors (dims differ per attribute)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for variant in ("asen_v2", "csn"):
        torch.manual_seed(0)
        over = {**SMALL, "cls_weight": 1.0, "proxy_share": 0.3} if variant == "csn" else SMALL
        model = build_model(load_config(variant, over), synth_schema()).eval()
        run = root / f"run-{variant}"
        save_checkpoint(run / "best", model)
        dest = root / f"export-{variant}"
        if variant == "asen_v2":
            res = CliRunner().invoke(app, ["export", "--checkpoint", str(run), "--out", str(dest),
                                           "--catalog", str(synth), "--triplets", "200"])
            assert res.exit_code == 0, res.output
            assert "exported asen_v2" in res.output
        else:
            export_model(run / "best", dest)
        out[variant] = (model, dest, ExportedEncoder.load(dest, schema=synth_schema(), device="cpu"))
    return out


def _images(synth: Path, n: int):
    cat = load_catalog(synth, synth_schema())
    return [load_image(it.image, base_dir=cat.base_dir) for it in cat.items[:n]]


@pytest.mark.parametrize("variant", ["asen_v2", "csn"])
def test_export_reproduces_the_in_memory_model(exports, synth, variant):
    model, path, enc = exports[variant]
    assert enc.attributes == model.schema.names and enc.dims == model.dims
    if variant == "csn":  # embedding + posterior over the attribute's visible values
        assert enc.dims == {a.name: 32 + a.num_classes for a in synth_schema()}
    assert enc.preprocess == model.preprocess
    images = _images(synth, 5)
    batch = enc.preprocess.batch(images)
    with torch.no_grad():
        expected = model.embed_all(batch).numpy()
    for x, ref in ((batch, expected), (batch[:1], expected[:1])):  # batch sizes the trace never saw
        got = enc.encode_tensors(x)
        for i, name in enumerate(enc.attributes):
            assert got[name].dtype == np.float32 and got[name].shape == (len(x), enc.dims[name])
            assert np.abs(got[name] - ref[:, i, : enc.dims[name]]).max() <= ATOL
            assert np.allclose(np.linalg.norm(got[name], axis=1), 1.0, atol=1e-5)
    from_pil = enc.encode_images(images, batch_size=2)
    for i, name in enumerate(enc.attributes):
        assert np.abs(from_pil[name] - expected[:, i, : enc.dims[name]]).max() <= ATOL


def test_model_card_records_what_serving_needs(exports, synth):
    model, path, _ = exports["asen_v2"]
    card = json.loads((path / CARD_FILE).read_text())
    assert card["format"] == "fgplugin-encoder" and card["format_version"] == 1
    assert card["variant"] == "asen_v2" and card["config"]["trunk"] == "resnet_tiny"
    assert card["schema_fingerprint"] == synth_schema().fingerprint()
    assert card["attributes"] == synth_schema().names
    assert card["preprocess"] == model.preprocess.to_dict()
    assert card["encoder"]["kind"] == "torch.export"
    assert card["version"] == compute_version(path, card)
    # Training data summary and the metrics of the evaluation run by `export --catalog`.
    cat = load_catalog(synth, synth_schema())
    train_ids = set(Splits.load(synth.parent / "splits.json").train)
    assert card["training"]["n_items"] == len(cat) and card["training"]["n_train"] == len(train_ids)
    colours = card["training"]["label_counts"]["colour"]
    assert sum(colours.values()) == len(train_ids)
    assert colours["red"] == sum(1 for it in cat if it.id in train_ids and it.labels["colour"] == "red")
    metrics = card["metrics"]
    assert set(metrics["per_attribute_map"]) == set(synth_schema().names)
    assert 0.0 < metrics["overall_weighted"] <= 1.0 and metrics["n_triplets"] == 200
    assert metrics["roi"]["per_attribute"]  # generated data has boxes and asen_v2 has attention
    scales = card["storage"]["int8"]["scale"]
    assert all(127.0 <= s < 127.0 / 0.05 for s in scales.values())  # 127 / max |component| seen
    # The safetensors weights are the model's: a fresh model loaded from them gives the same vectors.
    from safetensors.torch import load_model

    fresh = build_model(load_config("asen_v2", SMALL), synth_schema()).eval()
    load_model(fresh, str(path / WEIGHTS_FILE), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.embed_all(x), model.embed_all(x))


def test_eval_of_an_export_matches_the_recorded_metrics(exports, synth):
    _, path, _ = exports["asen_v2"]
    res = CliRunner().invoke(app, ["eval", "--model", str(path), "--catalog", str(synth), "--json",
                                   "--triplets", "200", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    card = json.loads((path / CARD_FILE).read_text())
    assert report["overall_weighted"] == pytest.approx(card["metrics"]["overall_weighted"], abs=1e-6)
    assert report["per_attribute_map"] == pytest.approx(card["metrics"]["per_attribute_map"], abs=1e-6)
    assert report["roi"] is None  # an export keeps only the encoder


def _copy(path: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(path, dest)
    return dest


def test_loading_refuses_another_schema(exports):
    _, path, _ = exports["csn"]
    s = synth_schema()
    other = AttributeSchema(s.attributes[:-1] + (Attribute("pattern", ("solid", "dots")),), name=s.name)
    with pytest.raises(ModelCardError, match=r"values differ for: pattern"):
        ExportedEncoder.load(path, schema=other)
    fewer = AttributeSchema(s.attributes[:3], name=s.name)
    with pytest.raises(ModelCardError, match=r"only in the former: .*pocket"):
        ExportedEncoder.load(path, schema=fewer)


def test_loading_refuses_unknown_formats_and_tampering(exports, tmp_path):
    _, path, _ = exports["csn"]
    d = _copy(path, tmp_path)
    card_file = d / CARD_FILE
    card = json.loads(card_file.read_text())

    def write(c):
        card_file.write_text(json.dumps(c))

    write({**card, "format_version": 99})
    with pytest.raises(ModelCardError, match="format_version 99 is not supported"):
        ExportedEncoder.load(d)
    write({**card, "format": "something-else"})
    with pytest.raises(ModelCardError, match="expected 'fgplugin-encoder'"):
        ExportedEncoder.load(d)
    write({**card, "dims": {**card["dims"], "colour": 8}})  # edited without re-hashing
    with pytest.raises(ModelCardError, match="modified after it was written"):
        ExportedEncoder.load(d)
    write(card)
    raw = bytearray((d / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (d / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelCardError, match="modified after it was written"):
        ExportedEncoder.load(d)
    (d / CARD_FILE).unlink()
    with pytest.raises(ModelCardError, match="not an fgplugin export"):
        ExportedEncoder.load(d)


def test_re_exporting_the_same_checkpoint_keeps_the_version_and_edits_are_caught(exports, tmp_path):
    """version = the vectors' identity (weights + vector-defining card fields): the same checkpoint
    exported again keeps it, so an index built with it stays current; integrity covers every byte."""
    _, path, enc = exports["csn"]
    again = export_model(path.parent / "run-csn" / "best", tmp_path / "again")
    card, card2 = (json.loads((p / CARD_FILE).read_text()) for p in (path, again))
    assert card2["version"] == card["version"] == enc.version
    assert card2["version"] == compute_version(again, card2) and card2["integrity"] == compute_integrity(again, card2)
    # A card edit that does not touch the vectors still fails the integrity check.
    write = lambda c: (again / CARD_FILE).write_text(json.dumps(c))  # noqa: E731
    write({**card2, "metrics": {"overall_weighted": 0.99}})
    with pytest.raises(ModelCardError, match="integrity .* modified after it was written"):
        ExportedEncoder.load(again)
    write(card2)
    enc_file = again / card2["encoder"]["file"]
    raw = bytearray(enc_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    enc_file.write_bytes(bytes(raw))
    with pytest.raises(ModelCardError, match="integrity .* modified after it was written"):
        ExportedEncoder.load(again)
    # Another model (different weights) is another version.
    torch.manual_seed(1)
    other = build_model(load_config("csn", SMALL), synth_schema()).eval()
    save_checkpoint(tmp_path / "run-other" / "best", other)
    assert ExportedEncoder.load(export_model(tmp_path / "run-other" / "best", tmp_path / "other")).version != enc.version


def test_export_refuses_to_overwrite_a_folder_that_is_not_an_export(exports, tmp_path):
    _, path, _ = exports["csn"]
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ModelCardError, match="not an fgplugin export"):
        export_model(path.parent / "run-csn" / "best", tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_an_export_loads_in_a_fresh_process_without_training_code(exports, synth, tmp_path):
    model, path, _ = exports["asen_v2"]
    batch = model.preprocess.batch(_images(synth, 3))
    torch.save(batch, tmp_path / "batch.pt")
    probe = f"""
import json, sys, numpy as np, torch
from fgplugin.export import ExportedEncoder
enc = ExportedEncoder.load({str(path)!r}, device="cpu")
out = enc.encode_tensors(torch.load({str(tmp_path / 'batch.pt')!r}))
np.savez({str(tmp_path / 'out.npz')!r}, **out)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("fgplugin"))))
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith(("fgplugin.models", "fgplugin.training"))], loaded
    got = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        expected = model.embed_all(batch).numpy()
    for i, name in enumerate(model.schema.names):
        assert np.abs(got[name] - expected[:, i, : model.dims[name]]).max() <= ATOL


def test_posterior_prob_export_indexes_with_the_slack_flag_and_queries_by_probability(synth, tmp_path):
    """mtc with posterior = prob, end to end: the card and the loaded export say the vectors carry the
    slack value, the index records it, and a like-id query scores each item p_q . p_x / |p_q| (the
    encoder's posteriors), i.e. it ranks by the probability of holding the query's value."""
    from fgplugin.indexer import index_catalog
    from fgplugin.search.spec import QuerySpec
    from fgplugin.search.embedded import DuckDBStore

    torch.manual_seed(0)
    model = build_model(load_config("mtc", {**SMALL, "posterior": "prob"}), synth_schema()).eval()
    save_checkpoint(tmp_path / "run" / "best", model)
    dest = export_model(tmp_path / "run" / "best", tmp_path / "export")
    enc = ExportedEncoder.load(dest, schema=synth_schema(), device="cpu")
    assert enc.query_slack and json.loads((Path(dest) / CARD_FILE).read_text())["query_slack"] is True
    cat = load_catalog(synth, synth_schema())
    store = DuckDBStore(tmp_path / "store")
    report = index_catalog(cat, enc, store, workers=1)
    assert report.indexed == len(cat) == store.count() and not report.failures
    assert store.layout.query_slack
    attr = synth_schema().names[0]
    ids = [it.id for it in cat.items]
    vecs = store.get_vectors(ids, [attr])
    post = {i: vecs[i][attr][:-1] for i in ids}  # [p, slack]: the posterior is all but the last value
    assert all(abs(float(p.sum()) - 1.0) < 1e-4 for p in post.values())
    hits = store.search(QuerySpec(attributes={attr: 1.0}, like_id=ids[0], k=10)).hits
    want = {i: float(post[ids[0]] @ post[i] / np.linalg.norm(post[ids[0]])) for i in ids[1:]}
    assert [h.score for h in hits] == pytest.approx(sorted(want.values(), reverse=True)[:10], abs=1e-5)
    assert all(h.score == pytest.approx(want[h.id], abs=1e-5) for h in hits)
    store.close()
