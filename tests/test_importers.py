"""`fgplugin data import`: real data sets through their presets, and the generic table import."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fgplugin.catalog import load_catalog
from fgplugin.errors import CatalogError, FgpluginError
from fgplugin.importers import import_preset, import_table, snake_case
from fgplugin.schema import AttributeSchema
from fgplugin.splits import Splits
from fgplugin_cli.app import app


def _load(report):
    return load_catalog(report.catalog, AttributeSchema.load(report.schema), strict=True)


@pytest.fixture(scope="module")
def fpi(shared_dir, tmp_path_factory):
    src = shared_dir / "fashion-product-images"
    out = tmp_path_factory.mktemp("fpi")
    report = import_preset("fpi", src, out, rare="merge", min_count=20, seed=0)
    return src, out, report, _load(report)


@pytest.fixture(scope="module")
def clothing(shared_dir, tmp_path_factory):
    src = shared_dir / "clothing-attributes"
    out = tmp_path_factory.mktemp("clothing")
    report = import_preset("clothing", src, out, seed=1)
    return src, out, report, _load(report)


def test_snake_case_names():
    assert snake_case("subCategory") == "sub_category"
    assert snake_case("baseColour") == "base_colour"
    assert snake_case("productDisplayName") == "product_display_name"
    assert snake_case("Article Type") == "article_type"
    assert snake_case("2nd col") == "f_2nd_col"


# -- fashion-product-images --------------------------------------------------------------------------
def test_fpi_import_counts_names_and_rare_values(fpi):
    src, out, report, cat = fpi
    with (src / "styles.csv").open(encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    assert report.rows_in == len(raw) == 9261 and report.rows_written == 9261 == len(cat)
    assert cat.schema.names == ["gender", "sub_category", "article_type", "base_colour", "season", "usage"]
    assert cat.metadata_types == {"master_category": "keyword", "product_display_name": "text", "colorgroup": "keyword"}
    # Rare usage values are merged into "other", and the report says so with counts.
    usage = report.attribute("usage")
    assert usage.merged == {"Smart Casual": 10, "Travel": 2}
    assert usage.kept["other"] == 12 and usage.kept["Casual"] == 7166
    assert usage.empty == 1
    assert cat.schema["usage"].values[-1] == "other"
    # Every rare value of every attribute is accounted for: kept + merged rows + empty = all rows.
    for a in report.attributes:
        raw_counts = Counter(r[{"sub_category": "subCategory", "article_type": "articleType",
                                "base_colour": "baseColour"}.get(a.name, a.name)] for r in raw)
        assert sum(a.kept.values()) + a.empty == 9261
        assert all(raw_counts[v] < 20 for v in a.merged) and all(n >= 20 or v == "other" for v, n in a.kept.items())
        assert sum(a.merged.values()) + sum(k for v, k in a.kept.items() if v != "other") + a.empty == 9261
    # The empty cells are missing labels in the catalog.
    empty_usage = [r["id"] for r in raw if r["usage"] == ""]
    by_id = cat.by_id()
    assert [by_id[i].labels["usage"] for i in empty_usage] == [None]
    assert sum(1 for it in cat if it.labels["base_colour"] is None) == 3
    travel = [r["id"] for r in raw if r["usage"] == "Travel"]
    assert {by_id[i].labels["usage"] for i in travel} == {"other"}


def test_fpi_catalog_points_at_the_source_images_without_copying(fpi):
    src, out, report, cat = fpi
    assert not (out / "images").exists()
    first = cat.items[0]
    assert not Path(first.image).is_absolute()
    assert Path(cat.image_source(first)).resolve() == (src / "images" / f"{first.id}.jpg").resolve()
    assert Image.open(cat.image_source(first)).size == (224, 224)
    assert first.metadata["product_display_name"]
    splits = Splits.load(out / "splits.json")
    ids = splits.train + splits.valid_query + splits.valid_candidate + splits.test_query + splits.test_candidate
    assert sorted(ids) == sorted(cat.ids)


def test_fpi_drop_and_keep_rare_values(shared_dir, tmp_path):
    table = shared_dir / "fashion-product-images" / "styles.csv"
    common = dict(id_column="id", image_template="images/{id}.jpg", attributes=["usage", "season"], metadata=[])
    drop = import_table(table, tmp_path / "drop", rare="drop", min_count=20, **common)
    assert drop.attribute("usage").dropped == {"Smart Casual": 10, "Travel": 2}
    assert drop.rows_dropped_rare == 12 and drop.rows_written == 9261 - 12
    cat = _load(drop)
    assert "Travel" not in cat.schema["usage"].values and "other" not in cat.schema["usage"].values
    assert sum(1 for it in cat if it.labels["usage"] is None) == 1  # empty is not rare: kept, missing
    keep = import_table(table, tmp_path / "keep", rare="keep", min_count=20, absolute_paths=True, **common)
    assert keep.rows_written == 9261 and keep.attribute("usage").rare_kept == {"Smart Casual": 10, "Travel": 2}
    cat = _load(keep)
    assert "Travel" in cat.schema["usage"].values and Path(cat.items[0].image).is_absolute()


# -- clothing-attributes -----------------------------------------------------------------------------
def _fold(row: dict, prefix: str) -> str | None:
    yes = [k[len(prefix):] for k, v in row.items() if k.startswith(prefix) and v == "yes"]
    return yes[0] if len(yes) == 1 else None


def test_clothing_flags_fold_into_pattern_and_colour(clothing):
    src, out, report, cat = clothing
    with (src / "labels.csv").open(encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    assert report.rows_written == len(raw) == 1856 == len(cat)
    assert set(cat.schema.names) >= {"sleeve_length", "neckline", "collar", "placket", "category", "gender",
                                     "pattern", "colour"}
    assert "many_colors" in cat.schema["colour"].values
    by_id = cat.by_id()
    # Row by row against labels.csv (flags folded by hand here), for a spread of rows.
    for r in raw[::37]:
        item = by_id[r["id"]]
        assert item.labels["pattern"] == _fold(r, "pattern_"), r["id"]
        expected_colour = _fold(r, "colour_")
        if expected_colour in report.attribute("colour").merged:
            expected_colour = "other"
        assert item.labels["colour"] == expected_colour, r["id"]
        for a in ("sleeve_length", "neckline", "collar", "category"):
            assert item.labels[a] == (r[a] or None), (r["id"], a)
    # The known first rows: 000001 is black only, no single pattern flag (pattern_solid is empty).
    assert by_id["000001"].labels["colour"] == "black" and by_id["000001"].labels["pattern"] is None
    assert by_id["000002"].labels["collar"] is None  # empty cell -> missing
    # The report counts the ambiguous rows, and the counts add up.
    for name, prefix in (("pattern", "pattern_"), ("colour", "colour_")):
        fr = report.fold(name)
        several = sum(1 for r in raw if sum(v == "yes" for k, v in r.items() if k.startswith(prefix)) > 1)
        assert fr.ambiguous == several > 0
        assert fr.folded + fr.ambiguous + fr.none_yes == 1856
        assert report.attribute(name).empty == fr.ambiguous + fr.none_yes
    assert report.fold("colour").ambiguous > 500  # many photos have two colours: say so, do not guess
    assert cat.metadata_types["necktie"] == "boolean" and by_id["000001"].metadata["necktie"] is True


def test_cli_import_preset_prints_the_report(shared_dir, tmp_path):
    result = CliRunner().invoke(app, [
        "data", "import", "--preset", "clothing", "--source", str(shared_dir / "clothing-attributes"),
        "--out", str(tmp_path / "c"), "--rare", "merge", "--min-count", "30", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rows_written"] == 1856
    colour = next(a for a in report["attributes"] if a["name"] == "colour")
    assert set(colour["merged"]) == {"red", "yellow", "purple", "cyan"}  # each < 30 rows
    table = CliRunner().invoke(app, [
        "data", "import", "--preset", "clothing", "--source", str(shared_dir / "clothing-attributes"),
        "--out", str(tmp_path / "d")])
    text = " ".join(table.output.split())  # rich wraps at the terminal width
    assert table.exit_code == 0 and "ambiguous (several yes)" in text and "merged into" in text and "red 18" in text
    missing = CliRunner().invoke(app, ["data", "import", "--preset", "clothing", "--out", str(tmp_path / "e")])
    assert missing.exit_code == 2 and "--source" in missing.output


# -- the generic import on a hand-written table -----------------------------------------------------
@pytest.fixture
def small_table(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    for i in ("a1", "a2", "a3", "a4", "a5", "a6"):
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "images" / f"{i}.jpg")
    (tmp_path / "table.csv").write_text(
        "sku,Sleeve Length,neckLine,price,launch,note\n"
        "a1,long,round,9.5,2024-01-02,x\n"
        "a2,short,vee,12,2024-02-03,y\n"
        "a3,long,,3.25,2024-03-04,z\n"
        "a4,short,round,1,2024-04-05,w\n"
        "a1,long,round,2,2024-05-06,dup\n"  # duplicate id
        "a9,long,round,2,2024-05-06,no image\n"  # image file missing
        ",long,round,2,2024-05-06,no id\n"  # empty id
        "a5,long,round,2,2024-05-06,v,extra\n"  # too many cells
        "a6,short,round,cheap,2024-05-06,bad price\n"  # not a float
    )
    return tmp_path / "table.csv"


def test_generic_import_reports_every_bad_row(small_table, tmp_path):
    kw = dict(id_column="sku", image_template="images/{sku}.jpg", attributes=["Sleeve Length", "neckLine"],
              metadata=["price:float", "launch", "note"], rare="keep", min_count=1)
    with pytest.raises(CatalogError) as e:
        import_table(small_table, tmp_path / "out", **kw)
    causes = {(p.row, p.item_id): p.cause for p in e.value.problems}
    assert "duplicate id (first seen in row 1)" in causes[(5, "a1")]
    assert "image file not found" in causes[(6, "a9")] and "a9.jpg" in causes[(6, "a9")]
    assert "empty id" in causes[(7, None)]
    assert "more cell(s) than header columns" in causes[(8, "a5")]
    assert any(p.row == 9 and "'cheap' is not a number (type float)" in p.cause for p in e.value.problems)
    assert not (tmp_path / "out" / "catalog.jsonl").exists()  # strict: nothing written
    # --skip-bad (strict=False): the good rows are written, the bad ones listed.
    report = import_table(small_table, tmp_path / "out", strict=False, **kw)
    assert {p.row for p in report.problems} == {5, 6, 7, 8, 9}
    assert any(p.item_id == "a6" and "'cheap' is not a number" in p.cause for p in report.problems)
    cat = _load(report)
    assert cat.ids == ["a1", "a2", "a3", "a4"]
    assert cat.schema.names == ["sleeve_length", "neck_line"]
    assert cat.by_id()["a3"].labels["neck_line"] is None  # empty cell -> missing
    assert cat.metadata_types == {"price": "float", "launch": "date", "note": "keyword"}
    assert cat.by_id()["a2"].metadata["price"] == 12.0


def test_generic_import_refuses_bad_plans(small_table, tmp_path):
    base = dict(id_column="sku", image_template="images/{sku}.jpg", strict=False)
    with pytest.raises(FgpluginError, match="attribute column 'colour' is not in the table; columns: sku"):
        import_table(small_table, tmp_path / "o", attributes=["colour"], **base)
    with pytest.raises(FgpluginError, match="image template .*'image'"):
        import_table(small_table, tmp_path / "o", attributes=["neckLine"], id_column="sku",
                     image_template="{image}")
    with pytest.raises(FgpluginError, match="unknown type 'money'"):
        import_table(small_table, tmp_path / "o", attributes=["neckLine"], metadata=["price:money"], **base)
    with pytest.raises(FgpluginError, match="--rare 'squash'"):
        import_table(small_table, tmp_path / "o", attributes=["neckLine"], rare="squash", **base)
    # Merging rare values can leave one value: a clear error, not a broken schema.
    with pytest.raises(FgpluginError, match="'neck_line' .* 1 value"):
        import_table(small_table, tmp_path / "o", attributes=["neckLine"], rare="drop", min_count=2, **base)
    with pytest.raises(FgpluginError, match="both be named 'note'"):
        import_table(small_table, tmp_path / "o", attributes=["neckLine"], metadata=["note"],
                     rename={"neckLine": "note"}, **base)


def test_generic_import_merges_rare_values_and_cli_form(small_table, tmp_path):
    result = CliRunner().invoke(app, [
        "data", "import", str(small_table), "--out", str(tmp_path / "o"), "--id-column", "sku",
        "--image-template", "images/{sku}.jpg", "--attribute", "neckLine", "--attribute", "Sleeve Length",
        "--metadata", "price:float", "--rare", "merge", "--min-count", "2", "--skip-bad", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    neck = report["attributes"][0]
    assert neck["name"] == "neck_line" and neck["merged"] == {"vee": 1} and neck["kept"] == {"round": 2, "other": 1}
    assert len(report["problems"]) == 5
    cat = load_catalog(tmp_path / "o" / "catalog.jsonl", AttributeSchema.load(tmp_path / "o" / "schema.toml"))
    assert cat.by_id()["a2"].labels["neck_line"] == "other"
    strict = CliRunner().invoke(app, [
        "data", "import", str(small_table), "--out", str(tmp_path / "p"), "--id-column", "sku",
        "--image-template", "images/{sku}.jpg", "--attribute", "neckLine"])
    assert strict.exit_code == 2 and "duplicate id" in strict.output
