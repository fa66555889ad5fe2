"""Re-score trained bench/quality.py runs under other test-time settings, on validation and test.

Some settings change only how a trained model turns an image into its vectors, not what it learns:
``proxy_share`` (the classifier posterior's share in each attribute's vector), ``posterior``
(softmax / |softmax|, sqrt(softmax), or prob: ranked by p_q . p_x, fgplugin.similarity) and ``global_share`` (ASEN_v2's global / local mix). Choosing
them belongs on the validation part; this script evaluates every finished run of a quality.py
``--work`` folder as trained and under each ``--try`` setting, on both parts, without training:

    .venv/bin/python bench/rescore.py --work /tmp/fgplugin-bench-quality --data clothing --seeds 0,1,2 \
        --variants 'asen[cls_weight=1;classifier=linear;proxy_share=0.5],mtc' \
        --try proxy_share=0.25 --try proxy_share=0.75 --try posterior=sqrt

One table per variant: a row per setting, validation and test MAP (query-weighted, mean +- sd over
the seeds) and the test MAP per seed. ``--n`` must be the one the runs were made with (fpi: 4000).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the sibling benchmark: same data, splits and run folders)

from fgplugin.models import ConfigError  # noqa: E402
from fgplugin.splits import Splits  # noqa: E402

TEST_TIME = {"proxy_share": float, "posterior": str, "global_share": float}  # change encoding, not weights


def parse_try(text: str) -> dict[str, Any]:
    """'proxy_share=0.25;posterior=sqrt' -> {'proxy_share': 0.25, 'posterior': 'sqrt'} (test-time keys only)."""
    pairs = quality.parse_settings(text)
    unknown = sorted(set(pairs) - set(TEST_TIME))
    if unknown:
        raise SystemExit(f"--try {text!r}: {', '.join(unknown)} change what a model learns, not how it "
                         f"encodes; re-scoring takes only {', '.join(TEST_TIME)}")
    return {k: TEST_TIME[k](v) for k, v in pairs.items()}


def load_data(work: Path, data: str, n: int | None, synth_size: int | None) -> Any:
    """The catalog quality.py prepared in ``work``; never generates or imports anew."""
    if data == "synth":  # the folder is named after the generator's n and size: find the one there
        pattern = f"synth-n{n or '*'}-s{synth_size or '*'}"
        found = sorted(p.parent.name for p in (work / "data").glob(f"{pattern}/catalog.jsonl"))
        if len(found) != 1:
            raise SystemExit(f"{work / 'data'} holds {len(found) or 'no'} generated catalogs matching {pattern}"
                             + (f" ({', '.join(found)}): give --n and --synth-size" if found else ""))
        m = re.fullmatch(r"synth-n(\d+|None)-s(\d+)", found[0])
        n, synth_size = (None if m.group(1) == "None" else int(m.group(1))), int(m.group(2))
    elif not (work / "data" / data / "catalog.jsonl").is_file():
        raise SystemExit(f"{work / 'data' / data} holds no imported catalog: run bench/quality.py first")
    return quality.prepare_data(data, work, n=n, size=synth_size or 0)[0]


def rescore_run(run_dir: Path, cat: Any, splits: Any, settings: list[dict[str, Any]],
                device: str) -> list[dict[str, float]]:
    """{valid, test} overall MAP (and per attribute, with query counts) for each setting ({} = as
    trained) of the run's best checkpoint."""
    from fgplugin.evaluation import evaluate
    from fgplugin.models import ModelConfig, build_model, load_checkpoint

    if not (run_dir / "bench_result.json").is_file():
        raise SystemExit(f"{run_dir} holds no finished run: run bench/quality.py with the same --work first")
    trained, _ = load_checkpoint(run_dir / "best", map_location="cpu")
    out = []
    for setting in settings:
        # the trained weights under a config with the setting applied (posterior = prob changes the
        # vectors' length, so the model is rebuilt from the config rather than patched)
        d = {**trained.config.to_dict(), **setting, "trunk_weights": None, "local_trunk_weights": None}
        try:
            model = build_model(ModelConfig.from_dict(d), trained.schema)
        except ConfigError as e:  # e.g. proxy_share on a run trained without a classifier
            raise SystemExit(f"{run_dir.name}: {setting} does not apply: {e}") from None
        model.load_state_dict(trained.state_dict())
        scores: dict[str, Any] = {}
        for part in ("valid", "test"):
            r = evaluate(model, cat, splits, part=part, n_triplets=0, device=device)
            scores[part] = r.overall_weighted
            scores[f"{part}_per_attribute"] = r.per_attribute_map  # with the query counts, for offline picks
            scores[f"{part}_queries"] = r.queries_per_attribute
        out.append(scores)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the --work folder of the quality.py runs")
    p.add_argument("--data", required=True, help="synth, fpi or clothing")
    p.add_argument("--variants", required=True, help="comma list of variant specs, as given to quality.py")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n", type=int, default=None, help="the --n the runs used (fpi: 4000)")
    p.add_argument("--synth-size", type=int, default=None, help="synth: the generator size the runs used")
    p.add_argument("--try", dest="tries", action="append", default=[],
                   help="a test-time setting to score, e.g. proxy_share=0.25 or 'proxy_share=0.75;posterior=sqrt'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write every score as JSON here")
    a = p.parse_args(argv)

    settings = [{}] + [parse_try(t) for t in a.tries]
    labels = ["as trained"] + a.tries
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    n_sub = None if a.data == "synth" else a.n
    cat = load_data(a.work, a.data, a.n, a.synth_size)
    results: dict[str, Any] = {}
    for v in quality.split_variants(a.variants):
        quality.parse_variant_spec(v)  # a clear error for a misspelt spec
        per_seed = []
        for seed in seeds:
            splits = Splits.load(quality.seeded_splits(cat, a.work, a.data, seed, n_sub))
            run_dir = quality.run_folder(a.work, a.data, v, seed)
            quality.console.print(f"re-scoring {escape(v)} seed {seed} under {len(settings)} settings")
            per_seed.append(rescore_run(run_dir, cat, splits, settings, a.device))
        results[v] = {label: [s[i] for s in per_seed] for i, label in enumerate(labels)}

        t = Table(title=f"{a.data} / {escape(v)}: MAP % (weighted), seeds {a.seeds}")
        for col in ("test-time setting", "valid", "test", "test per seed"):
            t.add_column(col, justify="left" if col == "test-time setting" else "right")
        for label in labels:
            rows = results[v][label]
            cells = []
            for part in ("valid", "test"):
                vals = [100 * r[part] for r in rows]
                sd = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
                cells.append(f"{statistics.fmean(vals):.1f}{sd}")
            t.add_row(escape(label), *cells, ", ".join(f"{100 * r['test']:.1f}" for r in rows))
        quality.console.print(t)
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(x) for k, x in vars(a).items()}, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
