"""bench/quality.py: variant specs with their own overrides, a tiny end-to-end run, the settings guard.

The script is measured by hand (bench/RESULTS.md); this checks its mechanics so a broken bench is
found by CI, not at measuring time. No learning is asserted here (tests/test_training.py does that).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("fgplugin_bench_quality", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variant_specs_keep_commas_inside_brackets_and_parse_overrides(quality):
    assert quality.split_variants("asen, csn[cls_weight=1;margin=0.3],mtc") == \
        ["asen", "csn[cls_weight=1;margin=0.3]", "mtc"]
    assert quality.split_variants("asen[a=1,b=2],global") == ["asen[a=1,b=2]", "global"]
    base, own = quality.parse_variant_spec("asen[cls_weight=1;sampling=natural]")
    assert base == "asen" and own == {"cls_weight": "1", "sampling": "natural"}  # parsed as TOML by load_config
    assert quality.parse_variant_spec("mtc") == ("mtc", {})
    with pytest.raises(SystemExit, match="unknown variant 'resnet'"):
        quality.parse_variant_spec("resnet")
    with pytest.raises(SystemExit, match="unknown variant"):
        quality.parse_variant_spec("asen[cls_weight=1")


def test_tiny_run_reports_each_spec_beside_its_base_and_refuses_a_reused_run_dir(quality, tmp_path, capsys):
    work = tmp_path / "work"
    args = ["--data", "synth", "--n", "48", "--synth-size", "64", "--image-size", "32", "--trunk", "resnet_tiny",
            "--small", "--steps", "2", "--batch-size", "4", "--seeds", "0", "--triplets", "50",
            "--set", "workers=0", "--set", "mining=batch_all", "--variants", "global,global[cls_weight=1]",
            "--work", str(work), "--out", str(tmp_path / "out.json")]
    out = quality.main(args)
    variants = out["datasets"]["synth"]["variants"]
    assert list(variants) == ["global", "global[cls_weight=1]"]
    for spec, res in variants.items():
        (run,) = res["runs"]
        assert run["variant"] == spec and run["steps"] == 2
        assert 0.0 < run["report"]["overall_weighted"] <= 1.0
    # Each spec trains in its own run folder with its own settings recorded.
    dirs = sorted(p.name for p in (work / "runs" / "synth").iterdir())
    assert dirs == ["global-seed0", "global_cls_weight=1_-seed0"]
    recorded = json.loads((work / "runs" / "synth" / "global_cls_weight=1_-seed0" / "bench_settings.json").read_text())
    assert recorded["overrides"]["cls_weight"] == "1"
    assert json.loads((tmp_path / "out.json").read_text())["datasets"]["synth"]["variants"].keys() == variants.keys()
    printed = capsys.readouterr().out
    assert "global[cls_weight=1]" in printed  # rich markup did not eat the brackets

    # Re-running resumes from the cached results (no training) ...
    again = quality.main(args)
    assert again["datasets"]["synth"]["variants"]["global"]["runs"][0]["report"] == \
        variants["global"]["runs"][0]["report"]
    # ... but the same folder with other settings is refused rather than silently mixed.
    with pytest.raises(SystemExit, match="other settings"):
        quality.main([*args[:args.index("--steps") + 1], "3", *args[args.index("--steps") + 2:]])

    # bench/rescore.py re-evaluates the same runs: "as trained" reproduces the test MAP, a test-time
    # setting changes it, and settings that would need training are refused by name.
    spec = importlib.util.spec_from_file_location("fgplugin_bench_rescore", BENCH.parent / "rescore.py")
    rescore = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rescore)
    base = ["--work", str(work), "--data", "synth", "--seeds", "0"]
    got = rescore.main([*base, "--variants", "global[cls_weight=1]", "--try", "proxy_share=0.5",
                        "--try", "proxy_share=0.5;posterior=sqrt", "--try", "proxy_share=0.5;posterior=prob",
                        "--out", str(tmp_path / "rescore.json")])
    rows = got["global[cls_weight=1]"]
    trained_map = variants["global[cls_weight=1]"]["runs"][0]["report"]["overall_weighted"]
    assert rows["as trained"][0]["test"] == pytest.approx(trained_map, abs=1e-9)
    assert rows["proxy_share=0.5"][0]["test"] != rows["as trained"][0]["test"]
    assert rows["proxy_share=0.5;posterior=sqrt"][0]["test"] != rows["proxy_share=0.5"][0]["test"]
    assert rows["proxy_share=0.5;posterior=prob"][0]["test"] != rows["proxy_share=0.5"][0]["test"]  # one value longer
    assert all(0.0 < r[0][part] <= 1.0 for r in rows.values() for part in ("valid", "test"))
    assert "proxy_share=0.5" in json.loads((tmp_path / "rescore.json").read_text())["results"]["global[cls_weight=1]"]
    with pytest.raises(SystemExit, match="does not apply"):  # no classifier was trained to give a posterior
        rescore.main([*base, "--variants", "global", "--try", "proxy_share=0.5"])
    with pytest.raises(SystemExit, match="cls_weight change what a model learns"):
        rescore.main([*base, "--variants", "global", "--try", "cls_weight=2"])
    with pytest.raises(SystemExit, match="no finished run"):
        rescore.main([*base, "--variants", "csn"])
