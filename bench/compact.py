"""Compact vectors on real data (issue 27): MAP per vector size and codec, against float32 at full size.

For each finished bench/quality.py run (a data set, a variant, a seed) in ``--work``: the run's best
checkpoint encodes its training part and its test part once; then for each size (``full``, or N: the
projection of ``fgplugin export --dim N``, fitted on the training part as the export fits it) and each
codec (``fgplugin index --codec``), the test part is scored the way the stores score it
(fgplugin.codecs: float16 and int8 on their codes, the query as its own int8 codes; binary: the best
candidates on the sign bits, rescored on the int8 codes, the rest after them in bit order), and the
papers' protocol gives per-attribute MAP, overall MAP (weighted by queries) and triplet accuracy.
Bytes per item: the codes of every attribute as the stores keep them (binary: its int8 codes and bits).
The int8 scale of each attribute is the export's rule (127 / the largest component, here on the training part).

    .venv/bin/python bench/compact.py --work /tmp/compact/work --data clothing --seeds 0,1,2 \
        --variant 'asen[lr=3e-4;cls_weight=1;classifier=linear;proxy_share=0.5]'
    .venv/bin/python bench/compact.py --work /tmp/compact/work --data fpi --n 4000 --seeds 0 --variant ...

Vectors are cached in each run folder (``compact_vectors.npz``), so a re-run with other sizes is quick.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the sibling benchmark: same data, splits and run folders)

from fgplugin.codecs import (INT8_MAX, bit_cosines, bit_tables, bits, bytes_per_vector, encode,  # noqa: E402
                             scoring_query, unit_decoded)
from fgplugin.evaluation import average_precision, encode_catalog, triplet_accuracy  # noqa: E402
from fgplugin.models import load_checkpoint  # noqa: E402
from fgplugin.models.compact import fit_projection  # noqa: E402
from fgplugin.splits import Splits, sample_triplets  # noqa: E402

K = 20  # the result size the binary candidate count is sized for (the store's rule: max(10 k, 200, 2 %))
CACHE = "compact_vectors.npz"


def binary_candidates(n_rows: int, k: int = K) -> int:
    return min(n_rows, max(10 * k, 200, int(0.02 * n_rows)))


def encoded(run_dir: Path, cat: Any, splits: Splits) -> dict[str, Any]:
    """Train and test vectors of the run's best checkpoint (cached in the run folder), with the test labels."""
    cache = run_dir / CACHE
    have = cat.by_id()
    train_ids = [i for i in splits.train if i in have]
    q_ids, c_ids = list(splits.test_query), list(splits.test_candidate)
    if not cache.is_file():
        model, _ = load_checkpoint(run_dir / "best", map_location="cpu")
        if model.query_slack:
            raise SystemExit(f"{run_dir.name}: posterior = prob vectors cannot be compacted (slack value)")
        quality.console.print(f"encoding {len(train_ids)} training and {len(q_ids) + len(c_ids)} test items of {run_dir.name}")
        np.savez(cache, train=encode_catalog(model, cat, train_ids).numpy(),
                 test=encode_catalog(model, cat, q_ids + c_ids).numpy(),
                 dims=np.array([model.dims[a] for a in cat.schema.names]))
    z = np.load(cache)
    row = {it.id: r for r, it in enumerate(cat.items)}
    labels = cat.label_matrix()[[row[i] for i in q_ids + c_ids]]
    dims = {a: int(d) for a, d in zip(cat.schema.names, z["dims"])}
    return {"train": z["train"], "test": z["test"], "dims": dims, "labels": labels, "nq": len(q_ids)}


def sized(data: dict[str, Any], names: list[str], size: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per attribute: (unit training vectors, unit test vectors) at ``size`` (full, or the fitted projection)."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    if size == "full":
        return ([data["train"][:, i, :data["dims"][a]] for i, a in enumerate(names)],
                [data["test"][:, i, :data["dims"][a]] for i, a in enumerate(names)])
    p = fit_projection(data["train"], data["dims"], names, int(size))
    project = lambda x, i: unit((x[:, i] - p.mean[i]) @ p.basis[i])  # noqa: E731  (CompactModel.embed_all)
    return ([project(data["train"], i) for i in range(len(names))], [project(data["test"], i) for i in range(len(names))])


def scores(train: np.ndarray, test: np.ndarray, nq: int, codec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query-by-candidate scores as the store computes them, the query forms, the candidate forms) of one
    attribute; the forms score triplets (binary: its int8 forms, which give its final scores)."""
    scale = INT8_MAX / max(float(np.abs(train).max()), 1e-6)
    q = np.stack([scoring_query(v, codec) for v in test[:nq]]) if codec != "float32" else test[:nq].astype(np.float64)
    forms = unit_decoded(encode(test, codec, scale), codec)
    s = q @ forms[nq:].T
    if codec == "binary":
        packed = bits(encode(test[nq:], "int8", scale))
        coarse = np.stack([bit_cosines(packed, bit_tables(v)) for v in test[:nq]])
        keep = binary_candidates(len(packed))
        top = np.argpartition(-coarse, keep - 1, axis=1)[:, :keep]
        final = coarse - 10.0  # outside the candidates: after them, in bit order
        np.put_along_axis(final, top, np.take_along_axis(s, top, axis=1), axis=1)
        s = final
    all_forms = np.concatenate([q, forms[nq:]]).astype(np.float32)
    return s, all_forms, forms.astype(np.float32)


def measure(data: dict[str, Any], names: list[str], size: str, codec: str, triplets: np.ndarray) -> dict[str, Any]:
    labels, nq = data["labels"], data["nq"]
    train, test = sized(data, names, size)
    per, counts, qforms, cforms = {}, {}, [], []
    for i, a in enumerate(names):
        s, qf, cf = scores(train[i], test[i], nq, codec)
        qforms.append(qf)
        cforms.append(cf)
        ql, cl = labels[:nq, i], labels[nq:, i]
        qm, cm = ql >= 0, cl >= 0
        rel = torch.from_numpy(ql[qm][:, None] == cl[cm][None, :])
        ap = average_precision(torch.from_numpy(s[qm][:, cm]).double(), rel).numpy()
        ap = ap[~np.isnan(ap)]
        per[a], counts[a] = (float(ap.mean()) if len(ap) else float("nan")), len(ap)
    total = sum(counts.values())
    overall = sum(per[a] * counts[a] for a in names if counts[a]) / total
    pad = max(f.shape[1] for f in cforms)
    stack = lambda fs: np.stack([np.pad(f, ((0, 0), (0, pad - f.shape[1]))) for f in fs], axis=1)  # noqa: E731
    qv = np.concatenate([stack(qforms)[:nq], stack(cforms)[nq:]])
    ta = triplet_accuracy(stack(cforms), triplets, attribute_names=names, anchor_vecs=qv)["overall"]
    dims = {a: test[i].shape[1] for i, a in enumerate(names)}
    return {"map": overall, "per_attribute": per, "triplet": ta,
            "bytes": sum(bytes_per_vector(codec, d) for d in dims.values()), "dims": dims}


def main(argv: list[str] | None = None) -> dict[str, Any]:  # long: one table, row by row
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the --work folder of the quality.py runs")
    p.add_argument("--data", required=True, help="fpi or clothing (or synth)")
    p.add_argument("--variant", required=True, help="the variant spec, as given to quality.py")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n", type=int, default=None, help="the --n the runs used (fpi: 4000)")
    p.add_argument("--sizes", default="full,128,64,32,16", help="full and/or projection sizes")
    p.add_argument("--codecs", default="float32,float16,int8,binary")
    p.add_argument("--triplets", type=int, default=2000)
    p.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    a = p.parse_args(argv)
    quality.console.width = max(quality.console.width, 200)  # one line per row in a log
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    sizes, codecs = a.sizes.split(","), a.codecs.split(",")
    cat = quality.prepare_data(a.data, a.work, n=a.n, size=0)[0]
    names = cat.schema.names
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {(s, c): [] for s in sizes for c in codecs}
    for seed in seeds:
        splits = Splits.load(quality.seeded_splits(cat, a.work, a.data, seed, None if a.data == "synth" else a.n))
        data = encoded(quality.run_folder(a.work, a.data, a.variant, seed), cat, splits)
        triplets = sample_triplets(data["labels"], a.triplets, seed=0)
        for s in sizes:
            for c in codecs:
                rows[(s, c)].append(measure(data, names, s, c, triplets))
    ref = statistics.fmean(r["map"] for r in rows[("full", "float32")]) if ("full", "float32") in rows else None
    t = Table(title=f"{a.data} / {escape(a.variant)}: compact vectors, test part, seeds {a.seeds} "
                    "(MAP %, weighted; mean ± sd over seeds)", title_justify="left")
    for col in ("size", "codec", "bytes/item", "MAP", "vs float32 full", "MAP per seed", "triplet acc",
                *[n[:10] for n in names]):
        t.add_column(col, justify="right")
    for (s, c), rs in rows.items():
        maps = [100 * r["map"] for r in rs]
        sd = f" ± {statistics.stdev(maps):.1f}" if len(maps) > 1 else ""
        delta = f"{statistics.fmean(maps) - 100 * ref:+.1f}" if ref is not None else ""
        t.add_row(s if s == "full" else f"{s}", c, f"{rs[0]['bytes']:,}", f"{statistics.fmean(maps):.1f}{sd}", delta,
                  ", ".join(f"{m:.1f}" for m in maps), f"{100 * statistics.fmean(r['triplet'] for r in rs):.1f}",
                  *[f"{100 * statistics.fmean(r['per_attribute'][n] for r in rs):.1f}" for n in names])
    quality.console.print(t)
    quality.console.print(f"full = the model's own width ({max(rows[(sizes[0], codecs[0])][0]['dims'].values())} "
                          "values per attribute); N = fgplugin export --dim N (principal axes of the training part); "
                          f"binary: the best max(10 k, 200, 2 %) of the candidates by sign bits (k = {K}) rescored on "
                          "int8, its triplet accuracy from its int8 scores; command: " + escape(" ".join(sys.argv)))
    out = {f"{s}/{c}": rs for (s, c), rs in rows.items()}
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": out}, indent=2))
    return out


if __name__ == "__main__":
    main()
