"""A new attribute by `train --extend` vs a model trained with every attribute from the start.

On generated garments (``fgplugin data synth``): a base model is trained on every attribute but the
held-back one(s) and extended with it (``fgplugin.training.extend``); a full model is trained on every
attribute from the start with the base's settings, same split and seed. The table gives the held-back
attribute's test MAP (the papers' protocol, valid + test queries against valid + test candidates)
for both, chance, and each training time; the base attributes' vectors of the extension are checked
bit-identical to the base's (``torch.equal``) on the test images.

    nice -n 19 .venv/bin/python bench/extend.py --n 1000 --held colour --steps 300 --extend-steps 100
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--held", default="colour", help="comma-separated attributes held back from the base")
    p.add_argument("--variant", default="asen")
    p.add_argument("--steps", type=int, default=300, help="steps of the base and of the full model")
    p.add_argument("--extend-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fgplugin-bench-extend")
    a = p.parse_args()
    torch.set_num_threads(2)
    held = a.held.split(",")
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
    ext_run = extend(base, None, data / "catalog.jsonl", held, a.work / f"ext-{tag}", device="cpu", resume=True,
                     overrides={"steps": a.extend_steps})
    ext_s = time.perf_counter() - t
    extended, _ = load_checkpoint(ext_run.last)
    t = time.perf_counter()
    full_run = train(load_config(a.variant, cfg), catalog, splits, a.work / f"full-{tag}", device="cpu", resume=True)
    full_s = time.perf_counter() - t
    full_model, _ = load_checkpoint(full_run.last)

    ext_map, chance, _ = _map(extended, catalog, splits, held)
    full_map, _, _ = _map(full_model, catalog, splits, held)
    test = load_catalog(data / "catalog.jsonl", base_schema)
    ids = list(splits.test_candidate)
    vb, ve = encode_catalog(base, test, ids), encode_catalog(extended, test, ids)
    same = torch.equal(vb, ve[:, :vb.shape[1], :vb.shape[2]])
    table = Table(title=f"{a.variant}, synth n={a.n}, seed {a.seed}: held-back {', '.join(held)} "
                        f"(base {a.steps} steps + extension {a.extend_steps} vs full {a.steps})")
    for col in ("attribute", "chance", "extend MAP", "full MAP", "extend - full"):
        table.add_column(col, justify="right" if col != "attribute" else "left")
    for n in held:
        table.add_row(n, f"{100 * chance[n]:.1f}", f"{100 * ext_map[n]:.1f}", f"{100 * full_map[n]:.1f}",
                      f"{100 * (ext_map[n] - full_map[n]):+.1f}")
    console.print(table)
    # wall times of this call; a resumed (already finished) run reports the time it took to find that out
    console.print(f"training time: base {base_s:.0f} s ({base_run.stopped}), extension {ext_s:.0f} s "
                  f"({ext_run.stopped}), full {full_s:.0f} s ({full_run.stopped}); base vectors of the "
                  f"extension bit-identical on {len(ids)} test images: {same}", highlight=False)


if __name__ == "__main__":
    main()
