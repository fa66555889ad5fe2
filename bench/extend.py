"""A new attribute by `train --extend` vs a model trained with every attribute from the start.

On generated garments (``fgplugin data synth``): a base model is trained on every attribute but the
held-back one(s) and extended with it (``fgplugin.training.extend``); a full model is trained on every
attribute from the start with the base's settings, same split and seed. The table gives the held-back
attribute's test MAP (the papers' protocol, valid + test queries against valid + test candidates)
for both, chance, and each training time; the base attributes' vectors of the extension are checked
bit-identical to the base's (``torch.equal``) on the test images.

    nice -n 19 .venv/bin/python bench/extend.py --n 1000 --held colour --steps 300 --extend-steps 100

Real data (``--data clothing`` or ``fpi``): the full model is a finished bench/quality.py run in ``--work``
(``--variant``, ``--seed``: its split, settings and training time); the base is trained with the same
settings and split on every attribute but the held-back one(s), then extended:

    .venv/bin/python bench/extend.py --data clothing --work /tmp/compact/work --seed 0 --held neckline \
        --variant 'asen[lr=3e-4;cls_weight=1;classifier=linear;proxy_share=0.5]' --extend-steps 25
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fgplugin.catalog import load_catalog
from fgplugin.evaluation import chance_map, encode_catalog, retrieval_map
from fgplugin.models import load_checkpoint, load_config
from fgplugin.models.extend import sub_schema
from fgplugin.schema import AttributeSchema
from fgplugin.splits import Splits
from fgplugin.synth import generate
from fgplugin.training import train
from fgplugin.training.extend import extend

console = Console(width=None if sys.stdout.isatty() else 160)


def _map(model, catalog, splits, held: list[str]) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    q = list(splits.valid_query) + list(splits.test_query)
    c = list(splits.valid_candidate) + list(splits.test_candidate)
    row = {it.id: r for r, it in enumerate(catalog.items)}
    cols = [catalog.schema.index(n) for n in held]
    labels = catalog.label_matrix()[:, cols]
    ql, cl = labels[[row[i] for i in q]], labels[[row[i] for i in c]]
    j = [model.schema.index(n) for n in held]
    qv, cv = encode_catalog(model, catalog, q), encode_catalog(model, catalog, c)
    got = retrieval_map(qv[:, j], ql, cv[:, j], cl, attribute_names=held)["per_attribute"]
    return got, chance_map(ql, cl, attribute_names=held)["per_attribute"], cv


def compare(title: str, held: list[str], extended, full_model, base, catalog, base_catalog, splits) -> tuple[int, bool]:
    """Print the held-back attributes' MAP of the extension and the full model; returns (test images
    compared, whether the extension's base vectors are bit-identical to the base's on them)."""
    ext_map, chance, _ = _map(extended, catalog, splits, held)
    full_map, _, _ = _map(full_model, catalog, splits, held)
    ids = list(splits.test_candidate)
    vb, ve = encode_catalog(base, base_catalog, ids), encode_catalog(extended, catalog, ids)
    table = Table(title=title)
    for col in ("attribute", "chance", "extend MAP", "full MAP", "extend - full"):
        table.add_column(col, justify="right" if col != "attribute" else "left")
    for n in held:
        table.add_row(n, f"{100 * chance[n]:.1f}", f"{100 * ext_map[n]:.1f}", f"{100 * full_map[n]:.1f}",
                      f"{100 * (ext_map[n] - full_map[n]):+.1f}")
    console.print(table)
    return len(ids), torch.equal(vb, ve[:, :vb.shape[1], :vb.shape[2]])


def _stages(a: argparse.Namespace) -> str:
    return "trunk stages shared" if a.share_stages else "own copy of the last trunk stages"


def _extension_tag(a: argparse.Namespace) -> str:
    """Folder suffix for the extension's own settings: another setting is another run, never a resume of this one."""
    return ("" if a.share_stages else "-own") + "".join(f"-{k}={v}" for k, v in sorted(a.extend_set.items()))


def _extension_overrides(a: argparse.Namespace) -> dict:
    """The extension's settings beyond the base's (--extend-set last, so it may override the others)."""
    return {"steps": a.extend_steps, "extend_last_stage": not a.share_stages, **a.extend_set}


def real_data(a: argparse.Namespace, held: list[str]) -> None:  # long: train base, extend, compare, one table
    """The held-back attribute(s) on a real set: base + extension against the quality.py run with every attribute."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality  # the sibling benchmark: its data, splits, settings and finished runs

    cat = quality.prepare_data(a.data, a.work, n=a.n, size=0)[0]
    splits_path = quality.seeded_splits(cat, a.work, a.data, a.seed, a.n)
    splits = Splits.load(splits_path)
    full_dir = quality.run_folder(a.work, a.data, a.variant, a.seed)
    # The settings are written when the quality.py run starts: the base can train beside it, in the same conditions.
    if not (full_dir / "bench_settings.json").is_file():
        raise SystemExit(f"{full_dir}: no bench/quality.py run with every attribute; start bench/quality.py first")
    settings = json.loads((full_dir / "bench_settings.json").read_text())
    overrides = quality.parse_settings(";".join(f"{k}={v}" for k, v in settings["overrides"].items()))
    base_schema = sub_schema(cat.schema, [n for n in cat.schema.names if n not in held])
    tag = f"{'+'.join(held)}-{a.extend_steps}{_extension_tag(a)}"
    base_dir = full_dir.with_name(full_dir.name + f"-without-{'+'.join(held)}")
    t = time.perf_counter()
    base_run = train(load_config(settings["variant"], overrides), load_catalog(cat.path, base_schema), splits_path,
                     base_dir, device="cpu", resume=True)
    base_s = time.perf_counter() - t
    base, _ = load_checkpoint(base_run.checkpoint)
    t = time.perf_counter()
    ext_run = extend(base, None, cat.path, held, base_dir.with_name(base_dir.name + f"-ext{tag}"), splits=splits,
                     device="cpu", resume=True, overrides={"eval_every": a.extend_steps, **_extension_overrides(a)})
    ext_s = time.perf_counter() - t
    extended, _ = load_checkpoint(ext_run.checkpoint)
    if not (full_dir / "bench_result.json").is_file():
        raise SystemExit(f"base {base_s:.0f} s ({base_run.stopped}), extension {ext_s:.0f} s ({ext_run.stopped}); "
                         f"{full_dir} is not finished yet: re-run when bench/quality.py is, for the comparison")
    full_s = json.loads((full_dir / "bench_result.json").read_text())["train_seconds"]
    full_model, _ = load_checkpoint(full_dir / "best")
    n, same = compare(f"{a.data}, seed {a.seed}: held-back {', '.join(held)} (base + extension of {a.extend_steps} "
                      f"steps, {_stages(a)}, vs the model trained with every attribute)", held, extended, full_model, base, cat,
                      load_catalog(cat.path, base_schema), splits)
    console.print(f"training time: full {full_s:.0f} s (bench/quality.py), base {base_s:.0f} s ({base_run.stopped}), "
                  f"extension {ext_s:.0f} s ({ext_run.stopped}): full / extension = {full_s / max(ext_s, 1e-9):.1f}x; "
                  f"base vectors of the extension bit-identical on {n} test images: {same}", highlight=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synth", help="synth, or a real set with a finished quality.py run: clothing, fpi")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--held", default="colour", help="comma-separated attributes held back from the base")
    p.add_argument("--variant", default="asen", help="variant (real data: the quality.py variant spec of the full run)")
    p.add_argument("--steps", type=int, default=300, help="steps of the base and of the full model")
    p.add_argument("--extend-steps", type=int, default=100)
    p.add_argument("--share-stages", action="store_true",
                   help="the new part shares every trunk stage with the base (train.extend_last_stage=false)")
    p.add_argument("--extend-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the extension only, e.g. lr=1e-3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fgplugin-bench-extend")
    a = p.parse_args()
    held = a.held.split(",")
    from fgplugin.models import parse_overrides

    a.extend_set = parse_overrides(a.extend_set)
    if a.data != "synth":
        a.n = a.n if a.data == "fpi" else None
        return real_data(a, held)
    torch.set_num_threads(2)
    data = a.work / f"synth-{a.n}"
    if not (data / "catalog.jsonl").is_file():
        generate(data, a.n, seed=a.seed, size=96, workers=2)
    full = AttributeSchema.load(data / "schema.toml")
    splits = Splits.load(data / "splits.json")
    catalog = load_catalog(data / "catalog.jsonl", full)
    cfg = {"trunk": "resnet_tiny", "local_trunk": "resnet_tiny", "image_size": 64, "local_size": 32, "embed_dim": 64,
           "attr_embed_dim": 32, "asa_dim": 32, "local_asa_dim": 32, "agmlan_channels": 64, "batch_size": 24,
           "steps": a.steps, "lr": 1e-3, "mining": "batch_all", "workers": 0, "seed": a.seed}
    tag = f"{a.variant}-{'+'.join(held)}-{a.steps}-{a.extend_steps}-s{a.seed}"
    base_schema = sub_schema(full, [n for n in full.names if n not in held])
    t = time.perf_counter()
    base_run = train(load_config(a.variant, cfg), load_catalog(data / "catalog.jsonl", base_schema), splits,
                     a.work / f"base-{tag}", device="cpu", resume=True)
    base_s = time.perf_counter() - t
    base, _ = load_checkpoint(base_run.last)
    t = time.perf_counter()
    ext_run = extend(base, None, data / "catalog.jsonl", held,
                     a.work / f"ext-{tag}{_extension_tag(a)}", device="cpu", resume=True,
                     overrides=_extension_overrides(a))
    ext_s = time.perf_counter() - t
    extended, _ = load_checkpoint(ext_run.last)
    t = time.perf_counter()
    full_run = train(load_config(a.variant, cfg), catalog, splits, a.work / f"full-{tag}", device="cpu", resume=True)
    full_s = time.perf_counter() - t
    full_model, _ = load_checkpoint(full_run.last)

    n, same = compare(f"{a.variant}, synth n={a.n}, seed {a.seed}: held-back {', '.join(held)} (base {a.steps} steps + "
                      f"extension {a.extend_steps}, {_stages(a)}, vs full {a.steps})", held, extended, full_model, base, catalog,
                      load_catalog(data / "catalog.jsonl", base_schema), splits)
    # wall times of this call; a resumed (already finished) run reports the time it took to find that out
    console.print(f"training time: base {base_s:.0f} s ({base_run.stopped}), extension {ext_s:.0f} s "
                  f"({ext_run.stopped}), full {full_s:.0f} s ({full_run.stopped}); base vectors of the "
                  f"extension bit-identical on {n} test images: {same}", highlight=False)


if __name__ == "__main__":
    main()
