"""Foundation: schema files, catalog validation (every problem named by row and cause), splits and
triplets, and `fgplugin data check`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fgplugin.catalog import coerce, find_schema, load_catalog, write_catalog
from fgplugin.errors import CatalogError, FgpluginError, SchemaError, UnknownAttributeError
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.splits import Splits, make_splits, sample_triplets
from fgplugin_cli.app import app


def _schema(**metadata) -> AttributeSchema:
    return AttributeSchema(
        attributes=(
            Attribute("sleeve", ("short", "long", "hidden"), "sleeve length", not_visible="hidden", region="arms"),
            Attribute("colour", ("red", "blue")),
        ),
        name="t",
        metadata=dict(metadata),
    )


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return tmp_path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- schema ----------------------------------------------------------------------------------------
def test_schema_round_trips_through_toml_and_json(tmp_path):
    s = _schema(price="float", **{"launch date": "date", "in-stock": "boolean"})
    for name in ("s.toml", "s.json"):
        back = AttributeSchema.load(s.save(tmp_path / name))
        assert back == s and back.fingerprint() == s.fingerprint()
    assert s["sleeve"].visible_values == ("short", "long") and s["sleeve"].num_classes == 2
    assert s["sleeve"].class_index("long") == 1 and s["sleeve"].class_index("hidden") == -1
    assert s["sleeve"].class_index(None) == -1
    with pytest.raises(SchemaError, match="no value 'medium'"):
        s["sleeve"].class_index("medium")


def test_schema_rejects_bad_definitions(tmp_path):
    with pytest.raises(SchemaError, match="lower-case"):
        AttributeSchema((Attribute("Sleeve", ("a", "b")),))
    with pytest.raises(SchemaError, match="not_visible value 'gone' is not among its values"):
        AttributeSchema((Attribute("sleeve", ("a", "b"), not_visible="gone"),))
    with pytest.raises(SchemaError, match="at least two visible values"):
        AttributeSchema((Attribute("sleeve", ("a", "x"), not_visible="x"),))
    with pytest.raises(SchemaError, match="lists a value twice"):
        AttributeSchema((Attribute("sleeve", ("a", "a", "b")),))
    with pytest.raises(SchemaError, match="declared twice"):
        AttributeSchema((Attribute("a", ("x", "y")), Attribute("a", ("x", "y"))))
    with pytest.raises(SchemaError, match="metadata field 'price' has type 'money'"):
        AttributeSchema((Attribute("a", ("x", "y")),), metadata={"price": "money"})
    with pytest.raises(SchemaError, match="both an attribute and a metadata field"):
        AttributeSchema((Attribute("a", ("x", "y")),), metadata={"a": "keyword"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[attributes.sleeve]\nvalues = ['a', 'b']\ncolour = 'red'\n")
    with pytest.raises(SchemaError, match=r"bad.toml: attribute 'sleeve' has unknown keys \['colour'\]"):
        AttributeSchema.load(bad)
    bad.write_text("[attributes\n")
    with pytest.raises(SchemaError, match="cannot parse"):
        AttributeSchema.load(bad)
    with pytest.raises(SchemaError, match="schema file not found"):
        AttributeSchema.load(tmp_path / "none.toml")
    # The short form (name = [values]) is accepted.
    short = tmp_path / "short.toml"
    short.write_text("name = 'x'\n[attributes]\ncolour = ['red', 'blue']\n")
    assert AttributeSchema.load(short)["colour"].values == ("red", "blue")


def test_unknown_attribute_lists_the_known_names():
    s = _schema()
    with pytest.raises(UnknownAttributeError) as e:
        s["hem"]
    assert str(e.value) == "unknown attribute 'hem'; known attributes: sleeve, colour"
    assert e.value.known == ["sleeve", "colour"] and isinstance(e.value, KeyError)
    with pytest.raises(UnknownAttributeError, match="known attributes: sleeve, colour"):
        s.check_names(["colour", "hem"])
    assert s.check_names(["colour"]) == ["colour"] and "colour" in s and "hem" not in s


# -- catalog ---------------------------------------------------------------------------------------
def test_catalog_reports_every_problem_with_row_and_cause(folder):
    rows = [
        {"id": "a", "image": "img/0.jpg", "sleeve": "long", "colour": "red"},
        {"id": "b", "image": "img/1.jpg", "sleeve": "elbow", "colour": "red"},  # unknown value
        {"id": "a", "image": "img/2.jpg", "sleeve": "short"},  # duplicate id
        {"id": "c", "image": "img/3.jpg", "labels": {"hem": "mini"}},  # unknown attribute
        {"id": "d", "image": "ftp://example.com/x.jpg"},  # unsupported scheme
        {"id": "e"},  # no image
        {"id": "f", "image": "img/3.jpg", "sleeve": "hidden", "colour": None},
    ]
    path = _jsonl(folder / "cat.jsonl", rows)
    with pytest.raises(CatalogError) as e:
        load_catalog(path, _schema())
    msgs = [str(p) for p in e.value.problems]
    assert "row 2 (id 'b'): attribute 'sleeve' has unknown value 'elbow' (allowed: short, long, hidden)" in msgs
    assert "row 3 (id 'a'): duplicate id (first seen in row 1)" in msgs
    assert "row 4 (id 'c'): unknown attribute 'hem' (schema has: sleeve, colour)" in msgs
    assert "row 5 (id 'd'): unsupported URL scheme 'ftp' (only http and https)" in msgs
    assert "row 6 (id 'e'): missing image" in msgs
    assert len(msgs) == 5 and "5 catalog problem(s)" in str(e.value)
    # strict=False keeps the good rows and returns the problems.
    cat = load_catalog(path, _schema(), strict=False)
    assert cat.ids == ["a", "f"] and len(cat.problems) == 5
    assert cat.by_id()["f"].labels == {"sleeve": "hidden", "colour": None}
    assert cat.label_matrix().tolist() == [[1, 0], [-1, -1]]
    assert cat.problems[2].kind == "invalid" and cat.problems[1].kind == "duplicate"


def test_labels_that_are_not_an_object_are_that_rows_problem_not_a_crash(folder):
    rows = [{"id": "a", "image": "img/0.jpg", "labels": "red"}, {"id": "b", "image": "img/1.jpg", "labels": ["long"]},
            {"id": "c", "image": "img/2.jpg", "sleeve": "elbow", "colour": "green"}]
    cat = load_catalog(_jsonl(folder / "cat.jsonl", rows), _schema(), strict=False)
    assert [str(p) for p in cat.problems] == [
        "row 1 (id 'a'): 'labels' must be an object", "row 2 (id 'b'): 'labels' must be an object",
        # in schema order, whatever the hash seed of the run
        "row 3 (id 'c'): attribute 'sleeve' has unknown value 'elbow' (allowed: short, long, hidden)",
        "row 3 (id 'c'): attribute 'colour' has unknown value 'green' (allowed: red, blue)",
    ]


def test_a_csv_header_without_id_or_image_is_refused_whole(tmp_path):
    # Found by tests/test_catalog_fuzz.py: a cut line break merged the header with the first row, which left
    # a "catalog" of zero rows that --prune would have read as "every item is gone".
    path = tmp_path / "cat.csv"
    path.write_bytes(b"id,imag<sku0000>,img/0.jpg,red,n/a,\r\n")
    with pytest.raises(CatalogError, match="the header has no 'image' column"):
        load_catalog(path, _schema(), strict=False)
    path.write_text("sku,image\na,img/0.jpg\n")
    with pytest.raises(CatalogError, match="the header has no 'id' column"):
        load_catalog(path, _schema(), strict=False)


def test_catalog_checks_image_files_when_asked(folder):
    rows = [
        {"id": "ok", "image": "img/0.jpg", "sleeve": "long"},
        {"id": "gone", "image": "img/missing.jpg", "sleeve": "long"},
        {"id": "bad", "image": "img/broken.jpg", "sleeve": "long"},
        {"id": "abs", "image": str(folder / "img" / "1.jpg"), "sleeve": "short"},
    ]
    path = _jsonl(folder / "cat.jsonl", rows)
    assert len(load_catalog(path, _schema())) == 4  # images are not opened by default
    cat = load_catalog(path, _schema(), strict=False, check_images=True)
    assert cat.ids == ["ok", "abs"]
    by_id = {p.item_id: p for p in cat.problems}
    assert by_id["gone"].kind == "missing" and "file not found" in by_id["gone"].cause
    assert by_id["bad"].kind == "corrupt" and "corrupt or unreadable image" in by_id["bad"].cause
    assert by_id["gone"].row == 2 and by_id["bad"].row == 3
    assert cat.image_source(cat.items[0]) == str(folder / "img" / "0.jpg")


def test_metadata_types_are_inferred_from_csv_strings(folder):
    (folder / "cat.csv").write_text(
        "id,image,sleeve,colour,flag,count,price,day,brand,mixed\n"
        "a,img/0.jpg,long,red,true,1,1.5,2024-01-02,Acme,1\n"
        "b,img/1.jpg,short,,false,2,2,2024-02-03T10:00:00Z,Bolt,2.5\n"
        "c,img/2.jpg,,blue,,,,,,\n"
    )
    cat = load_catalog(folder / "cat.csv", _schema())
    assert cat.metadata_types == {"flag": "boolean", "count": "integer", "price": "float", "day": "date",
                                  "brand": "keyword", "mixed": "float"}
    a, b, c = cat.items
    assert a.metadata == {"flag": True, "count": 1, "price": 1.5, "day": "2024-01-02", "brand": "Acme", "mixed": 1.0}
    assert b.metadata["flag"] is False and b.metadata["price"] == 2.0 and b.labels["colour"] is None
    assert c.metadata["count"] is None and c.labels["sleeve"] is None  # empty cells: missing


def test_declared_metadata_types_win_and_bad_values_are_named(folder):
    (folder / "cat.csv").write_text(
        "id,image,sleeve,count,price,stock\n"
        "a,img/0.jpg,long,007,1.5,yes\n"
        "b,img/1.jpg,long,8,cheap,no\n"
        "c,img/2.jpg,long,9,nan,maybe\n"
    )
    schema = _schema(count="keyword", price="float", stock="boolean")
    with pytest.raises(CatalogError) as e:
        load_catalog(folder / "cat.csv", schema)
    msgs = [str(p) for p in e.value.problems]
    assert "row 2 (id 'b'): metadata 'price': 'cheap' is not a number (declared/inferred type float)" in msgs
    assert any(m.startswith("row 3 (id 'c'): metadata 'price'") and "finite" in m for m in msgs)
    assert "row 3 (id 'c'): metadata 'stock': 'maybe' is not a boolean (declared/inferred type boolean)" in msgs
    cat = load_catalog(folder / "cat.csv", schema, strict=False)
    assert cat.ids == ["a"] and cat.items[0].metadata == {"count": "007", "price": 1.5, "stock": True}


def test_coerce_rules():
    assert coerce("1", "integer") == 1 and coerce(2.0, "integer") == 2
    for bad, t in (("1.5", "integer"), (True, "integer"), (True, "float"), ("x", "float"), ("inf", "float"),
                   ("2024-13-45", "date"), ("soon", "date"), ({"a": 1}, "keyword"), ("y", "boolean")):
        with pytest.raises(ValueError):
            coerce(bad, t)
    assert coerce("TRUE", "boolean") is True and coerce("0", "boolean") is False
    assert coerce(None, "float") is None and coerce(3, "keyword") == "3"


def test_catalog_file_level_errors(tmp_path):
    with pytest.raises(CatalogError, match="catalog file not found"):
        load_catalog(tmp_path / "none.jsonl", _schema())
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(CatalogError, match="unsupported catalog format '.txt'"):
        load_catalog(tmp_path / "c.txt", _schema())
    (tmp_path / "c.jsonl").write_text('{"id": "a", "image": "x.jpg"}\nnot json\n[1]\n')
    cat = load_catalog(tmp_path / "c.jsonl", _schema(), strict=False)
    assert [str(p) for p in cat.problems][0].startswith("row 2: not valid JSON")
    assert str(cat.problems[1]) == "row 3: a JSONL row must be an object, not list"
    with pytest.raises(FgpluginError, match="no schema.toml or schema.json next to"):
        find_schema(tmp_path / "c.jsonl")
    _schema().save(tmp_path / "schema.toml")
    assert find_schema(tmp_path / "c.jsonl") == tmp_path / "schema.toml"


def test_write_catalog_round_trips(folder):
    cat = load_catalog(_jsonl(folder / "a.jsonl", [
        {"id": "a", "image": "img/0.jpg", "sleeve": "long", "colour": "blue", "price": 2.5, "tags": "x"}]), _schema())
    back = load_catalog(write_catalog(folder / "b.jsonl", cat.items), _schema())
    assert back.items[0].labels == cat.items[0].labels and back.items[0].metadata == cat.items[0].metadata


# -- splits and triplets ----------------------------------------------------------------------------
def test_splits_are_deterministic_disjoint_and_one_to_four(tmp_path):
    ids = [f"i{k}" for k in range(500)]
    a, b, c = make_splits(ids, seed=1), make_splits(ids, seed=1), make_splits(ids, seed=2)
    assert a == b and a.train != c.train
    parts = [a.train, a.valid_query, a.valid_candidate, a.test_query, a.test_candidate]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == sorted(ids) and len(set(flat)) == len(ids)
    assert (len(a.train), len(a.valid_query) + len(a.valid_candidate)) == (350, 50)
    assert (len(a.valid_query), len(a.valid_candidate)) == (10, 40)
    assert (len(a.test_query), len(a.test_candidate)) == (20, 80)
    assert a.part("test") == (a.test_query, a.test_candidate)
    assert Splits.load(a.save(tmp_path / "s.json")) == a
    with pytest.raises(FgpluginError, match="unknown split part"):
        a.part("train")
    with pytest.raises(FgpluginError, match="must be unique"):
        make_splits(["a", "a"])
    with pytest.raises(FgpluginError, match="sum to 1"):
        make_splits(ids, fractions=(0.5, 0.1, 0.1))
    with pytest.raises(FgpluginError, match="splits file not found"):
        Splits.load(tmp_path / "none.json")


def test_sample_triplets_rules():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, size=(60, 3))
    labels[:, 2] = -1
    labels[:3, 2] = [0, 0, 1]  # attribute 2: two items of value 0, one of value 1
    trip = sample_triplets(labels, 3000, seed=4)
    assert trip.shape == (3000, 4)
    a, anc, pos, neg = trip.T
    assert set(np.unique(a)) == {0, 1, 2}
    assert np.all(anc != pos)
    assert np.all(labels[anc, a] == labels[pos, a]) and np.all(labels[anc, a] != labels[neg, a])
    assert np.all(labels[anc, a] >= 0) and np.all(labels[neg, a] >= 0)
    assert np.array_equal(trip, sample_triplets(labels, 3000, seed=4))
    only = sample_triplets(labels, 50, seed=1, attributes=[2])
    assert set(only[:, 0]) == {2} and set(labels[only[:, 1], 2]) == {0} and set(labels[only[:, 3], 2]) == {1}
    with pytest.raises(FgpluginError, match="no attribute has two visible values"):
        sample_triplets(np.array([[0], [0], [-1]]), 5)


# -- `fgplugin data check` -------------------------------------------------------------------------
def test_cli_data_check(folder):
    _schema().save(folder / "schema.toml")
    good = _jsonl(folder / "good.jsonl", [{"id": "a", "image": "img/0.jpg", "sleeve": "long", "price": 1.0}])
    bad = _jsonl(folder / "bad.jsonl", [
        {"id": "a", "image": "img/0.jpg", "sleeve": "long"},
        {"id": "b", "image": "img/broken.jpg", "sleeve": "long"},
        {"id": "c", "image": "img/1.jpg", "sleeve": "medium"},
    ])
    ok = CliRunner().invoke(app, ["data", "check", str(good)])
    assert ok.exit_code == 0, ok.output
    result = CliRunner().invoke(app, ["data", "check", str(bad)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "1 valid rows, 2 problem(s)" in text and "medium" in text and "corrupt" in text
    js = CliRunner().invoke(app, ["data", "check", str(bad), "--json"])
    assert js.exit_code == 1
    summary = json.loads(js.output)
    assert summary["rows"] == 1 and summary["attributes"]["sleeve"]["long"] == 1
    assert summary["attributes"]["colour"]["(missing)"] == 1
    assert any(p.startswith("row 2 (id 'b'): image 'img/broken.jpg': corrupt") for p in summary["problems"])
    no_img = CliRunner().invoke(app, ["data", "check", str(bad), "--no-images", "--json"])
    assert json.loads(no_img.output)["rows"] == 2
    missing = CliRunner().invoke(app, ["data", "check", str(folder / "none.jsonl")])
    assert missing.exit_code == 2 and "catalog file not found" in missing.output


def test_cli_data_split(folder):
    _schema().save(folder / "schema.toml")
    cat = _jsonl(folder / "c.jsonl", [{"id": f"i{k}", "image": f"img/{k % 4}.jpg"} for k in range(50)])
    result = CliRunner().invoke(app, ["data", "split", str(cat), "--seed", "3"])
    assert result.exit_code == 0, result.output
    s = Splits.load(folder / "splits.json")
    assert s == make_splits([f"i{k}" for k in range(50)], seed=3)
    assert "train 35, valid 1+4, test 2+8" in " ".join(result.output.split())
