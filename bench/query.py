"""Exact weighted multi-attribute query latency: the embedded DuckDB store vs a NumPy scan.

For each size: generate clustered unit vectors (A attributes x d), write them into a fresh embedded
store (write throughput), then time k=20 queries over 1, 2 and 4 attributes, with and without a
filter that passes 20 % of the items, on DuckDB and on an in-RAM NumPy scan (both must return the
same ids), next to the memory-bandwidth floor of the scan (bytes the query must read / measured
memcpy bandwidth) and the store's bytes per item; then the store's ``ann`` and ``ann+rescore`` modes:
latency, recall@k against its exact ranking, the speed-up over exact and the plan each query chose.
With ``--node-size N`` (one of the sizes), the same N vectors also go into a real OpenSearch node
(bench/node.py starts one) and the same queries run there: exact, ann, ann+rescore, recall@k against
the node's exact ranking, and whether the node's exact ids equal the embedded store's.

    .venv/bin/python bench/query.py --sizes 100000,1000000
    .venv/bin/python bench/query.py --sizes 100000 --node-size 100000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fgplugin.search.spec import QuerySpec, Term
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import Document, IndexLayout
from fgplugin.search.embedded import DuckDBStore

console = Console()
CATEGORIES = tuple(f"c{i}" for i in range(5))  # category=c0 passes 20 %


def generate(n: int, attrs: list[str], d: int, seed: int, clusters: int = 64) -> dict[str, np.ndarray]:
    """Clustered unit vectors per attribute (uniform random data flatters no index and no cache)."""
    rng = np.random.default_rng(seed)
    out = {}
    for a in attrs:
        centres = rng.normal(size=(clusters, d)).astype(np.float32)
        x = centres[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a] = x
    return out


def memcpy_bandwidth(mib: int = 512) -> float:
    """Bytes per second of a large in-RAM copy (best of 5): the floor of any scan."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best  # a copy reads N and writes N bytes; a scan only reads: count the read


class NumpyScan:
    def __init__(self, vecs: dict[str, np.ndarray], category: np.ndarray, ids: np.ndarray):
        self.vecs, self.category, self.ids = vecs, category, ids

    def search(self, weights: dict[str, float], q: dict[str, np.ndarray], category: str | None, k: int) -> list[str]:
        rows = np.flatnonzero(self.category == category) if category is not None else None
        score = None
        for a, w in weights.items():
            x = self.vecs[a] if rows is None else self.vecs[a][rows]
            s = w * (x @ (q[a] / np.linalg.norm(q[a])))
            score = s if score is None else score + s
        top = np.argpartition(-score, k)[:k] if len(score) > k else np.arange(len(score))
        idx = top if rows is None else rows[top]
        order = sorted(zip(-score[top], self.ids[idx]))  # score desc, then id asc
        return [str(i) for _, i in order]


def timed(fn, reps: int) -> tuple[float, float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95)), out


def bench_docs(ids, vecs, attrs, category, price, start: int, stop: int) -> list[Document]:
    """Documents start..stop of the generated set (vectors, category and price)."""
    return [Document(str(ids[i]), {a: vecs[a][i] for a in attrs}, {"category": str(category[i]),
                                                                   "price": float(price[i])}, "bench")
            for i in range(start, stop)]


def build_store(path: Path, vecs, attrs, d, category, price, ids, batch: int) -> float:
    schema = AttributeSchema(tuple(Attribute(a, ("x", "y")) for a in attrs), name="bench")
    layout = IndexLayout(schema, {a: d for a in attrs}, {"category": "keyword", "price": "float"}, "bench")
    store = DuckDBStore(path)
    store.ensure_index(layout)
    n = len(ids)
    t = time.perf_counter()
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task(f"writing {n:,} items", total=n)
        for s in range(0, n, batch):
            docs = bench_docs(ids, vecs, attrs, category, price, s, min(n, s + batch))
            res = store.upsert(docs)
            assert not res.failed, res.failed[:3]
            prog.advance(task, len(docs))
    store.con.execute("CHECKPOINT").fetchall()
    dt = time.perf_counter() - t
    store.close()
    return n / dt


def timed_specs(store, specs: list[QuerySpec]) -> tuple[float, float, list]:
    """p50 / p95 ms of store.search over specs (one warm-up first) and the results."""
    store.search(specs[0])
    times, out = [], []
    for spec in specs:
        t = time.perf_counter()
        out.append(store.search(spec))
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95)), out


def recall_at_k(got: list, ref: list, k: int) -> float:
    return float(np.mean([len({h.id for h in g.hits} & {h.id for h in r.hits}) / k for g, r in zip(got, ref)]))


def query_specs(vecs, attrs, d, n, na: int, cat: str | None, k: int, reps: int, mode: str) -> list[QuerySpec]:
    """``reps`` queries near random items (the same ones for every mode: seeded by the configuration)."""
    rng = np.random.default_rng(1000 * na + (cat is not None))
    weights = {a: float(w) for a, w in zip(attrs[:na], (1.0, 0.5, 0.25, 0.125))}
    filters = [Term("category", cat)] if cat else []
    out = []
    for _ in range(reps):
        ref = int(rng.integers(0, n))
        q = {a: vecs[a][ref] + 0.1 * rng.normal(size=d).astype(np.float32) for a in weights}
        out.append(QuerySpec(dict(weights), vectors=q, filters=filters, k=k, mode=mode))
    return out


def store_args(description: str) -> argparse.ArgumentParser:
    """The options every store benchmark shares (sizes, vector shape, queries), for bench/codecs.py too."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000", help="comma-separated item counts (e.g. 100000,1000000)")
    ap.add_argument("--attributes", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=20, help="timed queries per configuration")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20000, help="upsert batch size")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    return ap


def main() -> None:
    ap = store_args(__doc__)
    ap.add_argument("--memory-limit", default="4GB", help="DuckDB memory_limit while querying")
    ap.add_argument("--node-size", type=int, default=0,
                    help="also load this many items (one of --sizes) into a real OpenSearch node and query it")
    ap.add_argument("--node-port", type=int, default=9270, help="HTTP port of the node bench/node.py starts")
    ap.add_argument("--node-batch", type=int, default=2000, help="documents per upsert into the node")
    args = ap.parse_args()
    console.width = max(console.width, 160)  # wide tables stay readable when piped to a file

    attrs = [f"attr{i}" for i in range(args.attributes)]
    d, k = args.dim, args.k
    bw = memcpy_bandwidth()
    console.print(f"memcpy bandwidth (read side): {bw / 1e9:.1f} GB/s; {args.attributes} attributes x {d}-d, k={k}; "
                  f"command: {' '.join(sys.argv)}")
    root = Path(tempfile.mkdtemp(prefix="fg-bench-", dir=args.dir))
    exact_t = Table(title="Exact weighted query latency, ms (p50 / p95); goal: 1.5 x floor + 5 ms unfiltered, "
                          "2 x floor + 5 ms filtered", title_justify="left")
    for col in ("items", "attrs", "filter", "embedded store", "NumPy scan", "scan floor", "goal", "met", "same ids"):
        exact_t.add_column(col, justify="right")
    ann_t = Table(title=f"ANN, embedded store: p50 ms and recall@{k} vs its exact ranking; goal: recall >= 0.95 at "
                        ">= 10 x the exact query's speed", title_justify="left")
    for col in ("items", "attrs", "filter", "exact", "ann", "ann+rescore", "recall ann", "recall ann+rescore",
                "speed-up", "met", "plan"):
        ann_t.add_column(col, justify="right")
    summary = Table(title="Stores", title_justify="left")
    for col in ("store", "items", "write items/s", "ANN build s", "bytes/item (all files)", "raw vector bytes/item"):
        summary.add_column(col, justify="right")
    node_t = Table(title=f"ANN, real OpenSearch node: p50 ms and recall@{k} vs the node's exact ranking; goal: recall "
                         ">= 0.95 at >= 10 x the exact query's speed", title_justify="left")
    for col in ("items", "attrs", "filter", "exact", "ann", "ann+rescore", "recall ann", "recall ann+rescore",
                "speed-up", "met", "exact ids = embedded", "plan"):
        node_t.add_column(col, justify="right")
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            _bench_size(n, args, attrs, bw, root, exact_t, ann_t, summary, node_t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    console.print(summary)
    console.print(exact_t)
    console.print(ann_t)
    if args.node_size:
        console.print(node_t)
    console.print(
        "scan floor = bytes of the chosen attributes' vectors over the rows that pass the filter / memcpy "
        "bandwidth; speed-up = exact p50 / the faster ANN mode's p50 among those with recall >= 0.95.")


def _bench_size(n: int, args, attrs, bw: float, root: Path, exact_t: Table, ann_t: Table, summary: Table,
                node_t: Table) -> None:  # long: one size's whole measurement, row by row
    d, k = args.dim, args.k
    rng = np.random.default_rng(n)
    vecs = generate(n, attrs, d, seed=n)
    ids = np.array([f"item{i:08d}" for i in range(n)])
    category = np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), size=n)]
    price = rng.uniform(1, 500, size=n).round(2)
    path = root / f"store-{n}"
    rate = build_store(path, vecs, attrs, d, category, price, ids, args.batch)
    with DuckDBStore(path) as store:  # the indexes a query would build on first use, built (and timed) here
        t = time.perf_counter()
        store.prepare_ann(attrs[:4])  # the attributes the queries weight
        build_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    summary.add_row("embedded", f"{n:,}", f"{rate:,.0f}", f"{build_s:.0f} (4 IVF)",
                    f"{size / n:,.0f}", f"{args.attributes * d * 4:,}")
    scan = NumpyScan(vecs, category, ids)
    runs: dict = {}  # (attrs, filter) -> (specs per mode, embedded exact results), for the node
    with DuckDBStore(path, read_only=True) as store:
        store.con.execute(f"SET memory_limit = '{args.memory_limit}'").fetchall()
        for na in (1, 2, 4):
            for cat in (None, "c0"):
                specs = {m: query_specs(vecs, attrs, d, n, na, cat, k, args.queries, m)
                         for m in ("exact", "ann", "ann+rescore")}
                e50, e95, exact = timed_specs(store, specs["exact"])
                runs[(na, cat)] = (specs, exact)
                spec0 = specs["exact"][0]
                n50, n95, np_ids = timed(lambda: scan.search(spec0.attributes, spec0.vectors, cat, k), args.queries)
                frac = 1.0 if cat is None else float(np.mean(category == cat))
                floor = n * frac * na * d * 4 / bw * 1000  # the chosen attributes' vectors of the passing rows
                goal = (1.5 if cat is None else 2.0) * floor + 5
                same = [h.id for h in exact[0].hits] == np_ids
                exact_t.add_row(f"{n:,}", str(na), "20 %" if cat else "none", f"{e50:.1f} / {e95:.1f}",
                                f"{n50:.1f} / {n95:.1f}", f"{floor:.1f}", f"{goal:.1f}", "yes" if e50 <= goal else "no",
                                "yes" if same else "NO")
                _ann_row(store, specs, exact, e50, n, na, cat, k, ann_t)
        layout = store.layout
    shutil.rmtree(path, ignore_errors=True)
    if n == args.node_size:
        _bench_node(n, args, attrs, layout, lambda a, b: bench_docs(ids, vecs, attrs, category, price, a, b), runs,
                    summary, node_t)


def _bench_node(n: int, args, attrs, layout, docs, runs: dict, summary: Table, node_t: Table) -> None:
    """The same documents and queries on a real OpenSearch node (started here, stopped at the end)."""
    from node import drop_index, load_node, node_header, open_node_store, start_node, stop_node  # bench/ helper

    k = args.k
    url = start_node(args.node_port)
    store = open_node_store(url, "fgbench")
    try:
        console.print(f"node: {node_header(store)}; loading {n:,} items ...")
        osr = load_node(store, layout, n, docs, args.node_batch, console.print)
        summary.add_row("OpenSearch node", f"{n:,}", f"{osr['rate']:,.0f}", f"{osr['merge_s']:.0f} (force-merge)",
                        f"{osr['store_bytes'] / n:,.0f}", f"{args.attributes * args.dim * 4:,}")
        for (na, cat), (specs, embedded_exact) in runs.items():
            for s in specs["exact"][:3]:  # warm the node's caches and scripts
                store.search(s)
            e50, _, exact = timed_specs(store, specs["exact"])
            a50, _, ann = timed_specs(store, specs["ann"])
            r50, _, rescored = timed_specs(store, specs["ann+rescore"])
            rec_a, rec_r = recall_at_k(ann, exact, k), recall_at_k(rescored, exact, k)
            good = [p for p, r in ((a50, rec_a), (r50, rec_r)) if r >= 0.95]
            speedup = e50 / min(good) if good else 0.0
            same = np.mean([[h.id for h in x.hits] == [h.id for h in y.hits] for x, y in zip(exact, embedded_exact)])
            plan = (rescored[0].plan or ann[0].plan).removeprefix("plan: ")[:40]
            node_t.add_row(f"{n:,}", str(na), "20 %" if cat else "none", f"{e50:.1f}", f"{a50:.1f}", f"{r50:.1f}",
                           f"{rec_a:.3f}", f"{rec_r:.3f}", f"{speedup:.1f}x" if good else "-",
                           "yes" if speedup >= 10 else "no", f"{same:.2f}", plan)
            console.print(f"  node: {na} attr(s), filter {cat or 'none'}: done")
    finally:
        drop_index(store, console.print)
        stop_node()


def _ann_row(store, specs, exact, e50: float, n: int, na: int, cat, k: int, ann_t: Table) -> None:
    a50, _, ann = timed_specs(store, specs["ann"])
    r50, _, rescored = timed_specs(store, specs["ann+rescore"])
    rec_a, rec_r = recall_at_k(ann, exact, k), recall_at_k(rescored, exact, k)
    good = [p for p, r in ((a50, rec_a), (r50, rec_r)) if r >= 0.95]
    speedup = e50 / min(good) if good else 0.0
    plan = (rescored[0].plan or ann[0].plan or rescored[0].note)[:40]
    ann_t.add_row(f"{n:,}", str(na), "20 %" if cat else "none", f"{e50:.1f}", f"{a50:.1f}", f"{r50:.1f}",
                  f"{rec_a:.3f}", f"{rec_r:.3f}", f"{speedup:.1f}x" if good else "-",
                  "yes" if speedup >= 10 else "no", plan)


if __name__ == "__main__":
    main()
