"""The embedded DuckDB store vs a real OpenSearch node (k-NN plugin, lucene HNSW), side by side.

Same data as bench/query.py (clustered unit vectors, A attributes x d, metadata ``category`` with 5
values, ``price``): write throughput and bytes per item of each store, then k=20 like-id queries over
1, 2 and 4 attributes (weights 1, .5, .25, .125), with and without ``category=c0`` (20 %): exact on
both stores, ann and ann+rescore on both stores (each choosing its candidate plan per query), p50/p95
latency, recall@k of ann / ann+rescore against OpenSearch exact, and exact-vs-exact agreement
between the stores. Without ``--url`` it starts its own node (docker/opensearch-node.sh, instance
``bench``) and stops it at the end, even on errors.

    OPENSEARCH_NODE_HEAP=2g .venv/bin/python bench/opensearch.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from node import drop_index, load_node, machine, node_header, open_node_store, start_node, stop_node  # noqa: E402
from query import CATEGORIES, bench_docs, build_store, console, generate, timed_specs  # noqa: E402  (bench/ is not a package)

from fgplugin.search.spec import QuerySpec, Term  # noqa: E402
from fgplugin.search.embedded import DB_FILE, DuckDBStore  # noqa: E402

WEIGHTS = (1.0, 0.5, 0.25, 0.125)
WARMUP = 3


def run(store, specs: list[QuerySpec]) -> tuple[float, float, list]:
    """p50 / p95 ms over specs[WARMUP:] (the first WARMUP are warm-ups) and the timed results."""
    for s in specs[:WARMUP]:
        store.search(s)
    return timed_specs(store, specs[WARMUP:])


def recall(got: list, ref: list, k: int) -> float:
    return float(np.mean([len({h.id for h in g.hits} & {h.id for h in r.hits}) / k for g, r in zip(got, ref)]))


def agreement(a: list, b: list) -> tuple[float, float]:
    """Fraction of queries whose id lists are identical, and the largest |score diff| over shared ids."""
    same = np.mean([[h.id for h in x.hits] == [h.id for h in y.hits] for x, y in zip(a, b)])
    diff = max((abs(sa[i] - sb[i]) for x, y in zip(a, b)
                for sa, sb in [({h.id: h.score for h in x.hits}, {h.id: h.score for h in y.hits})]
                for i in sa.keys() & sb.keys()), default=0.0)
    return float(same), float(diff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an OpenSearch cluster already running (default: start a node, instance 'bench')")
    ap.add_argument("--port", type=int, default=9270, help="HTTP port of the node this script starts")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--attributes", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=30, help="timed queries per configuration (after 3 warm-ups)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2000, help="documents per store.upsert call")
    ap.add_argument("--index", default="fgbench")
    ap.add_argument("--keep", action="store_true", help="do not stop the node this script started")
    ap.add_argument("--out", type=Path, help="write the raw figures to this JSON file")
    args = ap.parse_args()
    console.width = max(console.width, 200)  # wide tables stay readable when piped to a file

    attrs = [f"attr{i}" for i in range(args.attributes)]
    n, d, k = args.n, args.dim, args.k
    raw: dict = {"argv": sys.argv, "n": n, "attributes": args.attributes, "dim": d, "k": k, "queries": args.queries}
    started = args.url is None
    url = args.url
    tmp = tempfile.TemporaryDirectory(prefix="fg-bench-os-")
    store = duck = None
    try:
        if started:
            url = start_node(args.port)
        store = open_node_store(url, args.index)
        header = (f"{machine()}; {node_header(store)} at {url}; {n:,} items x {args.attributes} x {d}-d, k={k}\n"
                  f"command: {' '.join(sys.argv)}")
        console.print(header)
        raw["header"] = header

        rng = np.random.default_rng(n)
        vecs = generate(n, attrs, d, seed=n)
        ids = np.array([f"item{i:08d}" for i in range(n)])
        category = np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), size=n)]
        price = rng.uniform(1, 500, size=n).round(2)

        path = Path(tmp.name) / "duck"
        t = time.perf_counter()
        duck_rate = build_store(path, vecs, attrs, d, category, price, ids, batch=20000)
        raw["duckdb"] = {"rate": duck_rate, "write_s": time.perf_counter() - t,
                         "file_bytes": (path / DB_FILE).stat().st_size}
        duck = DuckDBStore(path, read_only=True)
        console.print(f"duckdb: {duck_rate:,.0f} items/s; indexing into OpenSearch ...")
        raw["opensearch"] = osr = load_node(store, duck.layout, n, lambda a, b: bench_docs(ids, vecs, attrs, category, price,
                                                                                   a, b), args.batch, console.print)
        console.print(f"opensearch: {osr['rate']:,.0f} items/s, force-merge {osr['merge_s']:.0f} s" + " " * 20)

        refs = [str(ids[i]) for i in np.random.default_rng(7).choice(n, WARMUP + args.queries, replace=False)]
        for m in ("exact", "ann", "ann+rescore"):  # warm caches and JIT once before the first timed row
            for r in refs[:10]:
                duck.search(QuerySpec({attrs[0]: 1.0}, like_id=r, k=k, mode=m))
                store.search(QuerySpec({attrs[0]: 1.0}, like_id=r, k=k, mode=m))
        qt = Table(title=f"like-id queries, k={k}: p50 / p95 ms ({args.queries} queries each after {WARMUP} warm-ups); "
                         "recall@k vs the same store's exact ranking", title_justify="left")
        for col in ("attrs", "filter", "DuckDB exact", "DuckDB ann", "DuckDB ann+rescore", "OS exact", "OS ann",
                    "OS ann+rescore", "recall DuckDB ann / +rescore", "recall OS ann / +rescore", "exact ids = DuckDB",
                    "max |score diff|"):
            qt.add_column(col, justify="right")
        raw["queries_table"] = []
        for na in (1, 2, 4):
            weights = dict(zip(attrs[:na], WEIGHTS))
            for cat in (None, "c0"):
                filters = [Term("category", cat)] if cat else []
                specs = {m: [QuerySpec(dict(weights), like_id=r, filters=filters, k=k, mode=m) for r in refs]
                         for m in ("exact", "ann", "ann+rescore")}
                res = {}
                for m, ss in specs.items():
                    res[f"duckdb {m}"] = run(duck, ss)
                    res[f"os {m}"] = run(store, ss)
                rec_ann = recall(res["os ann"][2], res["os exact"][2], k)
                rec_rs = recall(res["os ann+rescore"][2], res["os exact"][2], k)
                duck_ann = recall(res["duckdb ann"][2], res["duckdb exact"][2], k)
                duck_rs = recall(res["duckdb ann+rescore"][2], res["duckdb exact"][2], k)
                same, diff = agreement(res["os exact"][2], res["duckdb exact"][2])
                row = {"attrs": na, "filter": cat, "recall_ann": rec_ann, "recall_ann_rescore": rec_rs,
                       "duckdb_recall_ann": duck_ann, "duckdb_recall_ann_rescore": duck_rs,
                       "exact_same_ids": same, "max_score_diff": diff,
                       **{f"{key} p50": v[0] for key, v in res.items()}, **{f"{key} p95": v[1] for key, v in res.items()}}
                raw["queries_table"].append(row)
                ms = [f"{res[key][0]:.1f} / {res[key][1]:.1f}" for key in
                      ("duckdb exact", "duckdb ann", "duckdb ann+rescore", "os exact", "os ann", "os ann+rescore")]
                qt.add_row(str(na), "20 %" if cat else "none", *ms, f"{duck_ann:.2f} / {duck_rs:.2f}",
                           f"{rec_ann:.2f} / {rec_rs:.2f}", f"{same:.2f}", f"{diff:.1g}")
                console.print(f"  {na} attr(s), filter {cat or 'none'}: done")

        du = raw["duckdb"]
        fs = osr["file_sizes"]
        parts = osr["disk_parts"] or {"." + e + " (_stats: 1 file per ext)": b for e, b in fs.items()}
        wt = Table(title=f"Writes and size, {n:,} items ({args.attributes} x {d}-d float32 = "
                         f"{args.attributes * d * 4:,} B of vectors per item)", title_justify="left")
        for col in ("store", "write items/s", "write s", "force-merge s", "bytes/item", "notes"):
            wt.add_column(col, justify="right")
        wt.add_row("DuckDB (embedded)", f"{du['rate']:,.0f}", f"{du['write_s']:.0f}", "-", f"{du['file_bytes'] / n:,.0f}",
                   "file size incl. checkpoint")
        wt.add_row("OpenSearch (lucene HNSW)", f"{osr['rate']:,.0f}", f"{osr['write_s']:.0f}", f"{osr['merge_s']:.0f}",
                   f"{osr['store_bytes'] / n:,.0f}",
                   f"primary store, {osr['segments']} segment(s); B/item: "
                   + ", ".join(f"{e} {b / n:,.0f}" for e, b in sorted(parts.items(), key=lambda eb: -eb[1]) if b >= n)
                   + f"; client CPU {osr['client_cpu_s']:.0f} s of the write; k-NN stats graph memory "
                   f"{osr['knn_graph_memory_kb']} KB" + (" (lucene: graphs are Lucene files, not in the plugin's "
                                                        "native cache)" if osr["knn_graph_memory_kb"] == 0 else ""))
        console.print(wt)
        console.print(qt)
        console.print("OS = OpenSearch; latencies are client-side and include the like-id vector lookup (mget on "
                      "OpenSearch); ann/ann+rescore search emb_all (concatenated vectors), rescore window 5*k. Lucene "
                      "files: .fdt stored fields (_source), .dvd doc values (the vectors the exact script reads), .vec "
                      "HNSW flat vectors, .vex HNSW graphs, .cfs compound file.")
        if args.out:
            args.out.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    finally:
        if duck is not None:
            duck.close()
        if store is not None:
            drop_index(store, console.print)
        tmp.cleanup()
        if started and not args.keep:
            stop_node()


if __name__ == "__main__":
    main()
