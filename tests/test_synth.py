"""The generated benchmark: deterministic, labels and boxes that match the pixels, independent attributes."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fgplugin.catalog import load_catalog
from fgplugin.errors import FgpluginError
from fgplugin.schema import AttributeSchema
from fgplugin.splits import Splits
from fgplugin.synth import NOT_VISIBLE, _render, generate, load_boxes, render_item, synth_schema
from fgplugin_cli.app import app

N = 300
SCHEMA = synth_schema()
SHAPE = ["sleeve_length", "neckline", "collar", "hem_length", "pocket"]
GLOBAL = ["colour", "pattern"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, N, seed=3, workers=2)
    return out


@pytest.fixture(scope="module")
def catalog(dataset):
    return load_catalog(dataset / "catalog.jsonl", AttributeSchema.load(dataset / "schema.toml"), strict=True)


def _pixels(item) -> np.ndarray:
    return np.asarray(item.image, dtype=np.int16)


# -- determinism ------------------------------------------------------------------------------------
def test_same_seed_same_item_other_seed_other_item():
    a, b = render_item(7, 0), render_item(7, 0)
    assert a.image.size == (224, 224) and a.image.mode == "RGB"
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.labels, a.boxes, a.metadata) == (b.labels, b.boxes, b.metadata)
    for other in (render_item(7, 1), render_item(8, 0)):
        assert other.image.tobytes() != a.image.tobytes()
    assert render_item(7, 0, size=256).image.size == (256, 256)
    with pytest.raises(FgpluginError, match="too small"):
        render_item(0, 0, size=32)


def test_bytes_do_not_depend_on_worker_count(tmp_path):
    one = Path(generate(tmp_path / "w1", 12, seed=5, workers=1)).parent
    two = Path(generate(tmp_path / "w2", 12, seed=5, workers=2)).parent
    for name in ("catalog.jsonl", "boxes.jsonl", "splits.json", "schema.toml"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    files = sorted(p.name for p in (one / "images").iterdir())
    assert len(files) == 12
    for f in files:
        assert (one / "images" / f).read_bytes() == (two / "images" / f).read_bytes(), f


# -- labels and boxes match the pixels --------------------------------------------------------------
def _box_mask(boxes, shape) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    for b in boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        inside[y0:y1 + 1, x0:x1 + 1] = True
    return inside


def test_changing_one_attribute_changes_pixels_only_inside_its_box():
    """Render an item, then the same item with one attribute set to another value: the pixels that
    change must lie in that attribute's box (of either render), and something must change."""
    checked = Counter()
    for index in range(16):
        base, geo = _render(index, 11)
        a_px = _pixels(base)
        for attr in SCHEMA:
            if base.labels[attr.name] == NOT_VISIBLE:
                continue
            others = [v for v in attr.visible_values if v != geo.true_labels[attr.name]]
            other = others[index % len(others)]
            changed, _ = _render(index, 11, overrides={attr.name: other})
            assert changed.labels[attr.name] == other
            # Nothing else about the item moved.
            assert {k: v for k, v in changed.labels.items() if k != attr.name} == \
                   {k: v for k, v in base.labels.items() if k != attr.name}
            diff = np.abs(_pixels(changed) - a_px).max(-1) > 0
            assert diff.sum() >= 20, f"item {index}: {attr.name} {geo.true_labels[attr.name]}->{other} changed {diff.sum()} px"
            inside = _box_mask([base.boxes[attr.name], changed.boxes[attr.name]], diff.shape)
            frac = (diff & inside).sum() / diff.sum()
            assert frac > 0.9, f"item {index}: {attr.name} -> {other}: only {frac:.0%} of changed pixels in its box"
            checked[attr.name] += 1
    assert all(checked[a] >= 10 for a in SCHEMA.names), checked


def test_neck_attributes_share_a_region_but_not_their_pixels():
    """neckline and collar have the same box (channel attention must tell them apart), yet each
    changes different pixels."""
    base, geo = _render(2, 4, overrides={"neckline": "round", "collar": "pointed"})
    assert base.boxes["neckline"] == base.boxes["collar"] is not None
    n, _ = _render(2, 4, overrides={"neckline": "v_neck", "collar": "pointed"})
    c, _ = _render(2, 4, overrides={"neckline": "round", "collar": "stand"})
    dn = np.abs(_pixels(n) - _pixels(base)).max(-1) > 0
    dc = np.abs(_pixels(c) - _pixels(base)).max(-1) > 0
    assert dn.sum() > 20 and dc.sum() > 20
    assert (dn & dc).sum() < 0.5 * min(dn.sum(), dc.sum())


def test_hidden_attributes_have_no_box_and_their_region_is_really_hidden(catalog, dataset):
    boxes = load_boxes(dataset)
    labels = {it.id: it.labels for it in catalog}
    hidden = {a: [] for a in SCHEMA.names}
    for iid, lab in labels.items():
        for a, v in lab.items():
            assert (v == NOT_VISIBLE) == (boxes[iid][a] is None), (iid, a)
            if v == NOT_VISIBLE:
                hidden[a].append(int(iid[3:]))
    # Each kind of hiding happens, at a modest rate; colour, pattern and sleeves are always seen.
    for a in ("neckline", "collar", "hem_length", "pocket"):
        assert 0.02 * N <= len(hidden[a]) <= 0.2 * N, (a, len(hidden[a]))
    assert hidden["neckline"] == hidden["collar"]
    assert not hidden["sleeve_length"] and not hidden["colour"] and not hidden["pattern"]
    # Hidden means hidden: whatever the true value, not one pixel changes.
    for a in ("hem_length", "pocket", "neckline", "collar"):
        for index in hidden[a][:4]:
            base, geo = _render(index, 3)
            assert base.labels[a] == NOT_VISIBLE and base.boxes[a] is None
            if a == "hem_length":
                assert geo.hem_cropped
            else:
                assert geo.occluders
            for v in SCHEMA[a].visible_values:
                if v == geo.true_labels[a]:
                    continue
                other, _ = _render(index, 3, overrides={a: v})
                assert other.labels[a] == NOT_VISIBLE
                assert np.array_equal(_pixels(other), _pixels(base)), f"item {index}: hidden {a}={v} shows"


def test_boxes_lie_in_the_image(dataset):
    boxes = load_boxes(dataset / "catalog.jsonl")
    assert len(boxes) == N
    for iid, per in boxes.items():
        for a, b in per.items():
            if b is None:
                continue
            x0, y0, x1, y1 = b
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224, (iid, a, b)
            assert (x1 - x0) * (y1 - y0) < 224 * 224 * 0.8, (iid, a, b)  # a region, not the whole image


# -- independence ----------------------------------------------------------------------------------
def _chi2_p(x: list[str], y: list[str]) -> float:
    """p-value of Pearson's chi-square test of independence (Wilson-Hilferty approximation)."""
    xs, ys = sorted(set(x)), sorted(set(y))
    table = np.zeros((len(xs), len(ys)))
    for a, b in zip(x, y):
        table[xs.index(a), ys.index(b)] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    k = (len(xs) - 1) * (len(ys) - 1)
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_colour_and_pattern_do_not_predict_shape(catalog):
    col = {a: [it.labels[a] for it in catalog] for a in SCHEMA.names}
    for g in GLOBAL:
        for s in SHAPE:
            p = _chi2_p(col[g], col[s])
            assert p > 1e-3, f"{g} and {s} look dependent (chi-square p = {p:.2g})"
    # The shape attributes do not predict each other either (apart from hiding: see below).
    for i, a in enumerate(SHAPE):
        for b in SHAPE[i + 1:]:
            if {a, b} != {"neckline", "collar"}:
                va = [v for v, w in zip(col[a], col[b]) if NOT_VISIBLE not in (v, w)]
                vb = [w for v, w in zip(col[a], col[b]) if NOT_VISIBLE not in (v, w)]
                assert _chi2_p(va, vb) > 1e-3, (a, b)
    # The test can fail: a truly dependent pair (one object hides neckline and collar together).
    vis_n = [v == NOT_VISIBLE for v in col["neckline"]]
    assert _chi2_p([str(v) for v in vis_n], [str(v == NOT_VISIBLE) for v in col["collar"]]) < 1e-9
    # Labels are spread over all values (uniform draws, not a degenerate generator).
    for a in SCHEMA:
        counts = Counter(col[a.name])
        assert all(counts[v] >= N / len(a.visible_values) / 2 for v in a.visible_values), (a.name, counts)


# -- files ----------------------------------------------------------------------------------------
def test_schema_catalog_and_splits_are_written(dataset, catalog):
    schema = AttributeSchema.load(dataset / "schema.toml")
    assert schema.fingerprint() == SCHEMA.fingerprint()
    assert len(schema) >= 6 and {a.region for a in schema} >= {"arms", "neck", "bottom", "torso", "global"}
    assert len(catalog) == N and not catalog.problems
    assert catalog.metadata_types == {"brand": "keyword", "category": "keyword", "price": "float",
                                      "in_stock": "boolean", "added": "date"}
    first = catalog.items[0]
    assert isinstance(first.metadata["price"], float) and isinstance(first.metadata["in_stock"], bool)
    assert first.image == f"images/{first.id}.jpg"
    # Images are real JPEGs that decode: check a handful strictly.
    sub = dataset / "sub.jsonl"
    sub.write_text("".join(l for l in (dataset / "catalog.jsonl").read_text().splitlines(True)[:20]))
    assert len(load_catalog(sub, schema, check_images=True)) == 20
    assert (dataset / "images" / f"{first.id}.jpg").read_bytes()[:2] == b"\xff\xd8"

    splits = Splits.load(dataset / "splits.json")
    parts = [splits.train, splits.valid_query, splits.valid_candidate, splits.test_query, splits.test_candidate]
    allids = [i for p in parts for i in p]
    assert sorted(allids) == sorted(catalog.ids) and len(set(allids)) == N
    assert len(splits.train) == 210 and len(splits.valid_query) + len(splits.valid_candidate) == 30
    assert len(splits.test_query) * 4 == len(splits.test_candidate)
    gen = json.loads((dataset / "generator.json").read_text())
    assert gen["seed"] == 3 and gen["n"] == N


def test_load_boxes_reports_a_bad_file(tmp_path):
    with pytest.raises(FgpluginError, match="no boxes file"):
        load_boxes(tmp_path)
    (tmp_path / "boxes.jsonl").write_text('{"id": "a", "boxes": {"x": [0, 0, 1, 1]}}\n{"id": "b"}\n')
    with pytest.raises(FgpluginError, match="row 2"):
        load_boxes(tmp_path)


def test_cli_synth_writes_a_data_set_and_reports_speed(tmp_path):
    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "d"), "-n", "10", "--workers", "1",
                                      "--no-progress", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output and "not visible" in result.output
    lines = (tmp_path / "d" / "catalog.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["id"] == "syn000000"
    bad = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "e"), "-n", "0"])
    assert bad.exit_code == 2 and "n must be at least 1" in bad.output
