"""Retrieval quality of every model variant on the same data with the same budget.

For each data set (generated garments, Fashion Product Images, Clothing Attributes) and each seed
(a seeded re-split of the same items, and the training seed), every variant is trained with
``fgplugin.training.train`` under the same step count and/or time budget, then evaluated on the test
part with ``fgplugin.evaluation.evaluate`` (the papers' protocol). One table per data set: per-attribute
MAP, overall MAP (weighted by queries), triplet accuracy, ROI IoU and peak-in-box (generated data,
attention variants), training time and encode time per image; mean +- standard deviation over seeds.

Runs live under ``--work`` (default $TMPDIR/fgplugin-bench-quality, outside the repo): data, splits,
checkpoints and a result file per (data set, variant, seed). Re-running resumes: a finished run is
not trained again, an interrupted one continues from its last checkpoint.

A variant may carry its own overrides, so a change is measured beside the paper configuration in
the same table: ``--variants 'asen,asen[feature_stage=3],asen[cls_weight=1;cls_scale=8]'``.

    # smoke size (what fits a shared CPU):
    .venv/bin/python bench/quality.py --data synth --n 240 --image-size 64 --trunk resnet_tiny \
        --local-trunk resnet_tiny --steps 60 --small --seeds 0 --out results.json
    # real size (GPU): paper configs, same budget for everyone
    .venv/bin/python bench/quality.py --data synth,fpi,clothing --n 20000 --budget 20m --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fgplugin.catalog import Catalog, find_schema, load_catalog
from fgplugin.schema import AttributeSchema
from fgplugin.splits import Splits, make_splits
from fgplugin_cli.progress import ProgressDisplay

console = Console(width=None if sys.stdout.isatty() else 160)  # logs get the whole table
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VARIANTS = ("asen_v2", "asen", "csn", "ag_mlan", "global", "mtc")
DATA_SOURCES = {"fpi": "fashion-product-images", "clothing": "clothing-attributes"}
# --small: narrow heads so a CPU smoke run finishes. It narrows only the attribute-specific heads (mtc
# has none), so it handicaps them against mtc: with the pretrained trunk on clothing it cost
# asen[LIN] 1.5 MAP (bench/RESULTS.md); compare against mtc at the papers' widths.
SMALL = {"embed_dim": 64, "attr_embed_dim": 32, "asa_dim": 32, "local_asa_dim": 32, "agmlan_channels": 32}


# -- data ---------------------------------------------------------------------------------------------
def prepare_data(name: str, work: Path, *, n: int | None, size: int) -> tuple[Catalog, dict | None]:
    """(catalog, ground-truth boxes or None). Generates or imports into ``work`` once, then reuses it."""
    if name == "synth":
        from fgplugin.synth import generate, load_boxes

        out = work / "data" / f"synth-n{n}-s{size}"
        path = out / "catalog.jsonl"
        if not path.is_file():
            console.print(f"generating {n} garments at {size}px into {out}")
            with ProgressDisplay() as show:
                generate(out, int(n or 2000), seed=0, size=size, on_progress=show)
        cat = load_catalog(path, AttributeSchema.load(find_schema(path)))
        return cat, load_boxes(out)
    if name in DATA_SOURCES:
        from fgplugin.importers import import_preset

        src = SHARED / DATA_SOURCES[name]
        out = work / "data" / name
        path = out / "catalog.jsonl"
        if not path.is_file():  # imported once; a --work folder carried elsewhere needs no ../shared
            if not src.is_dir():
                raise SystemExit(f"{src} is absent: the {name} data set lives in ../shared/ beside the repo")
            console.print(f"importing {src} into {out}")
            import_preset(name, src, out, absolute_paths=True)
        return load_catalog(path, AttributeSchema.load(find_schema(path)), strict=False), None
    raise SystemExit(f"unknown data set {name!r}; use synth, fpi or clothing")


def seeded_splits(cat: Catalog, work: Path, data_name: str, seed: int, n: int | None) -> Path:
    """A seeded split of the catalog (of a seeded subsample of ``n`` items for the real sets)."""
    path = work / "data" / f"{data_name}-splits-n{n}-seed{seed}.json"
    if not path.is_file():
        ids = cat.ids
        if n is not None and n < len(ids):
            rng = np.random.default_rng(seed)
            ids = [ids[i] for i in sorted(rng.choice(len(ids), n, replace=False))]
        make_splits(ids, seed=seed).save(path)
    return path


def split_variants(text: str) -> list[str]:
    """'asen,csn[a=1;b=2]' -> ['asen', 'csn[a=1;b=2]'] (commas inside brackets stay)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [v for v in out if v]


def parse_variant_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'asen[cls_weight=1;sampling=natural]' -> ('asen', {'cls_weight': '1', 'sampling': 'natural'})."""
    m = re.fullmatch(r"([a-z0-9_]+)(?:\[(.*)\])?", spec)
    if not m or m.group(1) not in VARIANTS:
        raise SystemExit(f"unknown variant {spec!r}; choose from {', '.join(VARIANTS)}, optionally "
                         "followed by [key=value;key=value]")
    return m.group(1), parse_settings(m.group(2) or "")


def parse_settings(text: str) -> dict[str, str]:
    """'a=1;b=2' (or 'a=1,b=2') -> {'a': '1', 'b': '2'}, values as text (parsed as TOML by load_config)."""
    from fgplugin.models import parse_overrides

    return parse_overrides([x for x in re.split(r"[;,]", text) if x.strip()])


def run_folder(work: Path, data_name: str, spec: str, seed: int) -> Path:
    """Where one (data set, variant spec, seed) run lives under ``--work``."""
    return work / "runs" / data_name / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec)}-seed{seed}"


# -- one run -------------------------------------------------------------------------------------------
def run_one(variant: str, cat: Catalog, splits_path: Path, boxes: dict | None, run_dir: Path, *,
            overrides: dict[str, Any], budget_s: float | None, device: str, n_triplets: int) -> dict[str, Any]:
    """Train (or resume) and evaluate one variant; the result is cached in ``run_dir/bench_result.json``."""
    from fgplugin.evaluation import evaluate
    from fgplugin.models import load_checkpoint, load_config
    from fgplugin.training import train

    cached = run_dir / "bench_result.json"
    settings = run_dir / "bench_settings.json"
    wanted = {"variant": variant, "overrides": {k: str(v) for k, v in sorted(overrides.items())},
              "budget_s": budget_s}
    if settings.is_file() and json.loads(settings.read_text()) != wanted:
        raise SystemExit(f"{run_dir} holds a run with other settings ({settings}); use another --work folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(wanted, indent=2))
    if cached.is_file():
        return json.loads(cached.read_text())
    config = load_config(variant, overrides)
    spent_before = 0.0
    partial = run_dir / "bench_train_seconds.json"
    if partial.is_file():
        spent_before = json.loads(partial.read_text())["seconds"]
    budget_left = None if budget_s is None else max(1.0, budget_s - spent_before)
    with ProgressDisplay() as show:
        result = train(config, cat, splits_path, run_dir, budget_s=budget_left, device=device, resume=True,
                       on_progress=show)
    train_seconds = spent_before + result.seconds
    partial.write_text(json.dumps({"seconds": train_seconds}))
    model, state = load_checkpoint(result.checkpoint, map_location="cpu")
    with ProgressDisplay(transient=True) as show:
        report = evaluate(model, cat, Splits.load(splits_path), part="test", n_triplets=n_triplets, boxes=boxes,
                          device=device, on_progress=show)
    out = {
        "variant": variant,
        "steps": result.steps,
        "total_steps": result.total_steps,
        "stopped": result.stopped,
        "train_seconds": train_seconds,
        "best_valid_map": result.best_map,
        # The evaluated checkpoint is the best on validation (papers' model selection); its step shows
        # e.g. whether ASEN_v2's best came before its stage 2 (then it equals ASEN's stage-1 model).
        "checkpoint_step": state.get("step"),
        "report": report.to_dict(),
    }
    cached.write_text(json.dumps(out, indent=2))
    return out


# -- aggregation and tables ------------------------------------------------------------------------------
def _metrics(run: dict[str, Any]) -> dict[str, float | None]:
    r = run["report"]
    roi = r.get("roi") or {}
    m: dict[str, float | None] = {f"map:{k}": v for k, v in r["per_attribute_map"].items()}
    m.update({
        "map": r["overall_weighted"], "map_mean": r["overall_mean"], "chance": r["chance"]["overall_weighted"],
        "triplet": r["triplet_accuracy"], "roi_iou": roi.get("mean_iou"), "peak_in_box": roi.get("peak_in_box"),
        "box_area": roi.get("box_area_fraction"), "train_s": run["train_seconds"],
        "checkpoint_step": run.get("checkpoint_step"),
        "encode_ms": r["encode_ms_per_image"], "forward_ms": r["forward_ms_per_image"],
    })
    m.update({f"chance:{k}": v for k, v in r["chance"]["per_attribute"].items()})
    return m


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    per = [_metrics(r) for r in runs]
    keys = sorted({k for p in per for k in p})
    mean, std = {}, {}
    for k in keys:
        vals = [p[k] for p in per if p.get(k) is not None]
        mean[k] = statistics.fmean(vals) if vals else None
        std[k] = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n_seeds": len(runs)}


def _cell(agg: dict, key: str, scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    m, s = agg["mean"].get(key), agg["std"].get(key)
    if m is None:
        return "-"
    text = fmt.format(m * scale)
    return text + (f"±{fmt.format(s * scale)}" if s is not None else "")


def table(data_name: str, attributes: list[str], results: dict[str, dict], title_extra: str) -> Table:
    """One column per variant (mean±std over seeds), one row per metric; chance in the last column."""
    t = Table(title=f"{data_name}: test retrieval, {title_extra}")
    t.add_column("metric")
    for v in results:
        t.add_column(escape(v), justify="right")  # a spec's [settings] is not rich markup
    t.add_column("chance", justify="right", style="dim")
    ref = next(iter(results.values()), None)
    best = max((agg["mean"].get("map") or 0.0 for agg in results.values()), default=0.0)

    def row(label: str, key: str, chance: str = "", scale: float = 100.0, fmt: str = "{:.1f}", bold_best=False):
        cells = [_cell(agg, key, scale, fmt) for agg in results.values()]
        if bold_best:
            cells = [f"[bold]{c}[/]" if agg["mean"].get("map") == best else c for c, agg in zip(cells, results.values())]
        t.add_row(label, *cells, chance)

    for a in attributes:
        row(f"MAP % {a}", f"map:{a}", _cell(ref, f"chance:{a}") if ref else "")
    t.add_section()
    row("MAP % (weighted)", "map", _cell(ref, "chance") if ref else "", bold_best=True)
    row("MAP % (mean)", "map_mean")
    row("triplet acc %", "triplet", "50.0")
    row("ROI IoU %", "roi_iou", _cell(ref, "box_area") if ref else "")
    row("peak in box %", "peak_in_box", _cell(ref, "box_area") if ref else "")
    t.add_section()
    row("best-valid step", "checkpoint_step", "", 1.0, "{:.0f}")
    row("train s", "train_s", "", 1.0, "{:.0f}")
    row("encode ms/img", "encode_ms", "", 1.0, "{:.2f}")  # decode + preprocess + forward
    row("model ms/img", "forward_ms", "", 1.0, "{:.2f}")
    return t


# -- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synth", help="comma list of synth, fpi, clothing")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list (default: all six); a variant with its own settings is written "
                        "VARIANT[key=value;key=value], e.g. 'asen,asen[cls_weight=1]'")
    p.add_argument("--trunk", default=None, help="trunk for every variant (default: each variant's paper trunk)")
    p.add_argument("--local-trunk", default=None, help="ASEN_v2 local-branch trunk (default: its paper trunk)")
    p.add_argument("--trunk-weights", default=None, help="pretrained trunk weights file for every variant")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the variant's)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per variant, same for all; sets the schedule (ASEN_v2 stage 2 starts at 71%%)")
    p.add_argument("--budget", default=None,
                   help="training time cap per variant, e.g. 90s, 10m (a capped run may stop before a late stage)")
    p.add_argument("--batch-size", type=int, default=None, help="triplets per step (default: the variant's)")
    p.add_argument("--small", action="store_true",
                   help="narrow the attribute-specific heads for CPU smoke runs (mtc is unchanged: no fair comparison with mtc)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every variant")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=None, help="items: synthetic size (default 2000) or real-data subsample")
    p.add_argument("--synth-size", type=int, default=None, help="generated image size (default: --image-size or 224)")
    p.add_argument("--seeds", default="0", help="comma list: one seeded split + training seed each")
    p.add_argument("--triplets", type=int, default=2000, help="test triplets for triplet accuracy")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fgplugin-bench-quality",
                   help="data, runs and cached results (re-running resumes from here)")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    a = p.parse_args(argv)

    from fgplugin.models import parse_overrides
    from fgplugin.training import parse_budget

    specs = {v: parse_variant_spec(v) for v in split_variants(a.variants)}
    variants = list(specs)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    budget_s = parse_budget(a.budget)
    if a.steps is None and budget_s is None:
        console.print("[yellow]no --steps or --budget: each variant trains for its paper epochs[/]")
    common: dict[str, Any] = dict(SMALL) if a.small else {}
    for key, value in (("trunk", a.trunk), ("local_trunk", a.local_trunk), ("trunk_weights", a.trunk_weights),
                       ("image_size", a.image_size), ("steps", a.steps), ("batch_size", a.batch_size)):
        if value is not None:
            common[key] = value
    common.update(parse_overrides(a.set))
    synth_size = a.synth_size or max(64, a.image_size or 224)  # the generator draws at 64 px or more
    a.work.mkdir(parents=True, exist_ok=True)
    budget_text = ", ".join(x for x in (f"{a.steps} steps" if a.steps else "", f"budget {a.budget}" if a.budget else "") if x)
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "overrides": common, "datasets": {}}

    for data_name in [d.strip() for d in a.data.split(",") if d.strip()]:
        cat, boxes = prepare_data(data_name, a.work, n=a.n, size=synth_size)
        n_sub = None if data_name == "synth" else a.n
        per_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for seed in seeds:
            splits_path = seeded_splits(cat, a.work, data_name, seed, n_sub)
            for v in variants:
                base, own = specs[v]
                run_dir = run_folder(a.work, data_name, v, seed)
                console.rule(escape(f"{data_name} / {v} / seed {seed}"))
                t = time.monotonic()
                res = run_one(base, cat, splits_path, boxes, run_dir, overrides={**common, **own, "seed": seed},
                              budget_s=budget_s, device=a.device, n_triplets=a.triplets)
                res["variant"] = v
                res["seed"] = seed
                per_variant[v].append(res)
                console.print(f"  MAP {100 * (res['report']['overall_weighted'] or 0):.1f} "
                              f"(chance {100 * res['report']['chance']['overall_weighted']:.1f}) "
                              f"in {time.monotonic() - t:.0f}s", highlight=False)
        results = {v: aggregate(runs) for v, runs in per_variant.items()}
        sp0 = Splits.load(seeded_splits(cat, a.work, data_name, seeds[0], n_sub))
        n_used = len(sp0.train) + sum(len(x) for x in sp0.part("valid") + sp0.part("test"))
        settings = f"{n_used} items ({len(sp0.test_query)} test queries), seeds {a.seeds}, {budget_text or 'paper epochs'}"
        console.print(table(data_name, cat.schema.names, results, settings))
        out["datasets"][data_name] = {
            "catalog": str(cat.path), "items": len(cat), "attributes": cat.schema.names,
            "variants": {v: {"runs": per_variant[v], **results[v]} for v in variants},
        }
    if a.out:
        a.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
        console.print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
