"""The CLI's tables in an 80-column terminal: no line wider than the terminal, ids never cut, and a
dropped column named in the caption (about 1 s, no torch, no store)."""

from __future__ import annotations

from rich.console import Console

from fgplugin.evaluation.protocol import EvalReport
from fgplugin.indexer import IndexReport
from fgplugin.query.execute import QueryRun
from fgplugin.search.spec import Hit, QuerySpec, SearchResult, parse_filter
from fgplugin.search.store import IndexLayout
from fgplugin.synth import synth_schema
from fgplugin_cli.evaluate import report_table as eval_table
from fgplugin_cli.index import report_table as index_table
from fgplugin_cli.query import result_table

ATTRS = ["sleeve_length", "neckline", "collar", "hem_length", "pocket", "colour", "pattern"]
META = {"brand": "keyword", "category": "keyword", "price": "float", "in_stock": "boolean", "added": "date"}


def _render(renderable, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def _run(attributes: dict[str, float], filters: list[str] = (), suffix: str = "-long-variant") -> QueryRun:
    spec = QuerySpec(attributes=attributes, like_id="syn000042", k=5, filters=[parse_filter(f) for f in filters])
    hits = [Hit(f"syn{1000 + i:06d}{suffix}", 2.5 - i / 10, {a: 0.98765 - i / 100 for a in attributes},
                {"brand": "Cobalt & Co", "category": "outdoor", "price": 123.45, "in_stock": True,
                 "added": "2024-05-06"}) for i in range(5)]
    layout = IndexLayout(synth_schema(), {a: 64 for a in ATTRS}, META, "v1")
    return QueryRun(spec, spec, SearchResult(hits, "exact", total_candidates=2000), layout)


def _assert_fits(lines: list[str], width: int = 80) -> None:
    too_wide = [ln for ln in lines if len(ln) > width]
    assert not too_wide, "\n".join(too_wide)


def test_query_results_fit_80_columns_with_whole_ids_and_say_what_was_dropped():
    run = _run({a: 1.0 for a in ATTRS[:4]}, ["price<200", "in_stock=true"])
    lines = _render(result_table(run))
    _assert_fits(lines)
    text = "\n".join(lines)
    for h in run.result.hits:
        assert h.id in text, h.id  # never cut to `syn000…`
    assert "not shown at this width" in text
    # The filtered fields outlive the others: an unfiltered field goes first.
    assert "brand" in text.split("not shown at this width")[1]
    # Wide enough, nothing is dropped.
    wide = "\n".join(_render(result_table(run), width=240))
    assert "not shown" not in wide and "Cobalt" in wide and "cos collar" in wide


def test_a_single_attribute_query_drops_only_what_does_not_fit():
    lines = _render(result_table(_run({"sleeve_length": 1.0}, suffix="")))
    _assert_fits(lines)
    text = "\n".join(lines)
    # Two columns wider than 80: only the last metadata field goes, the rest stays whole.
    assert text.split("not shown at this width:")[1].split() == ["in_stock"]
    assert "Cobalt & Co" in text and "123.45" in text and "cos sleeve_length" in text and "syn001004" in text


def test_eval_and_index_reports_fit_80_columns():
    names = ATTRS + ["a_rather_long_attribute_name"]
    report = EvalReport(
        variant="asen", part="test", n_queries=80, n_candidates=320,
        per_attribute_map={a: 0.5 for a in names}, overall_weighted=0.5, overall_mean=0.5,
        chance={"per_attribute": {a: 0.25 for a in names}, "overall_weighted": 0.25, "overall_mean": 0.25},
        queries_per_attribute={a: 10 for a in names}, triplet_accuracy=0.7,
        triplet_per_attribute={a: 0.7 for a in names},
        roi={"mean_iou": 0.3, "peak_in_box": 0.4, "box_area_fraction": 0.2,
             "per_attribute": {a: {"mean_iou": 0.3, "peak_in_box": 0.4, "box_area_fraction": 0.2} for a in names}},
    )
    lines = _render(eval_table(report, "asen on /a/long/folder/of/the/catalog/catalog.jsonl (test)"))
    _assert_fits(lines)
    assert any("a_rather_long_attribute_name" in ln for ln in lines)
    assert any("MAP" in ln for ln in lines) and any("chance" in ln for ln in lines)

    path = "/a/very/long/folder/name/that/goes/on/and/on/for/quite/a/while/store/errors.jsonl"
    ix = IndexReport(catalog="c.jsonl", store="embedded:store", model_version="v1", catalog_items=120, indexed=118,
                     errors_path=path, errors_in_file=2)
    lines = _render(index_table(ix))
    _assert_fits(lines)
    assert "".join(ln.strip("│ ") for ln in lines if "errors file" in ln or "/" in ln).count("errors.jsonl") == 1
