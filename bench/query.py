"""Exact weighted multi-attribute query latency: the embedded DuckDB store vs a NumPy scan.

For each size: generate clustered unit vectors (A attributes x d), write them into a fresh embedded
store (write throughput), then time k=20 queries over 1, 2 and 4 attributes, with and without a
filter that passes 20 % of the items, on DuckDB and on an in-RAM NumPy scan (both must return the
same ids), next to the memory-bandwidth floor of the scan (bytes the query must read / measured
memcpy bandwidth) and the store's bytes per item. With ``--ann`` and faiss-cpu installed, an
in-process HNSW over the concatenated vector is measured too (latency and recall@20 vs exact); the
embedded store itself has no ANN (DuckDB's vss extension cannot be installed offline).

    .venv/bin/python bench/query.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import shutil
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
from fgplugin.search.embedded import DB_FILE, DuckDBStore

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


def try_faiss():
    try:
        import faiss  # optional: pip install faiss-cpu
    except ImportError:
        return None
    return faiss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000", help="comma-separated item counts (e.g. 100000,1000000)")
    ap.add_argument("--attributes", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=20, help="timed queries per configuration")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20000, help="upsert batch size")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    ap.add_argument("--memory-limit", default="4GB", help="DuckDB memory_limit while querying")
    ap.add_argument("--ann", action="store_true", help="also measure faiss HNSW over the concatenated vector")
    ap.add_argument("--ann-max", type=int, default=200_000, help="skip the HNSW build above this many items (slow)")
    args = ap.parse_args()

    attrs = [f"attr{i}" for i in range(args.attributes)]
    d, k = args.dim, args.k
    bw = memcpy_bandwidth()
    console.print(f"memcpy bandwidth (read side): {bw / 1e9:.1f} GB/s; {args.attributes} attributes x {d}-d, k={k}")
    root = Path(tempfile.mkdtemp(prefix="fg-bench-", dir=args.dir))
    table = Table(title="Exact weighted query latency, ms (p50 / p95)", title_justify="left")
    for col in ("items", "attrs", "filter", "DuckDB", "NumPy", "scan floor", "same ids"):
        table.add_column(col, justify="right")
    summary = Table(title="Stores", title_justify="left")
    for col in ("items", "DuckDB write items/s", "DuckDB bytes/item", "raw vector bytes/item", "ANN"):
        summary.add_column(col, justify="right")
    ann_table = None
    faiss = try_faiss() if args.ann else None
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            rng = np.random.default_rng(n)
            vecs = generate(n, attrs, d, seed=n)
            ids = np.array([f"item{i:08d}" for i in range(n)])
            category = np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), size=n)]
            price = rng.uniform(1, 500, size=n).round(2)
            path = root / f"store-{n}"
            rate = build_store(path, vecs, attrs, d, category, price, ids, args.batch)
            file_bytes = (path / DB_FILE).stat().st_size
            summary.add_row(f"{n:,}", f"{rate:,.0f}", f"{file_bytes / n:,.0f}", f"{args.attributes * d * 4:,}",
                            "faiss HNSW (below)" if faiss and n <= args.ann_max else "none (no vss offline)")
            store = DuckDBStore(path, read_only=True)
            store.con.execute(f"SET memory_limit = '{args.memory_limit}'").fetchall()
            scan = NumpyScan(vecs, category, ids)
            qrng = np.random.default_rng(7)
            for na in (1, 2, 4):
                chosen = attrs[:na]
                weights = {a: float(w) for a, w in zip(chosen, (1.0, 0.5, 0.25, 0.125))}
                for cat in (None, "c0"):
                    ref = int(qrng.integers(0, n))
                    q = {a: vecs[a][ref] + 0.1 * qrng.normal(size=d).astype(np.float32) for a in chosen}
                    filters = [Term("category", cat)] if cat else []
                    spec = QuerySpec(weights, vectors=q, filters=filters, k=k)
                    p50, p95, res = timed(lambda: store.search(spec), args.queries)
                    n50, n95, np_ids = timed(lambda: scan.search(weights, q, cat, k), args.queries)
                    frac = 1.0 if cat is None else float(np.mean(category == cat))
                    # the scan must read every chosen attribute's vectors of the rows that pass the filter
                    floor = n * frac * na * d * 4 / bw * 1000
                    same = [h.id for h in res.hits] == np_ids
                    table.add_row(f"{n:,}", str(na), "20 %" if cat else "none", f"{p50:.1f} / {p95:.1f}",
                                  f"{n50:.1f} / {n95:.1f}", f"{floor:.2f}", "yes" if same else "NO")
            store.close()
            if faiss is not None and n <= args.ann_max:
                ann_table = ann_table or _ann_table()
                _bench_faiss(faiss, ann_table, vecs, attrs, d, k, n, args.queries)
            shutil.rmtree(path, ignore_errors=True)
            del vecs, scan
    finally:
        shutil.rmtree(root, ignore_errors=True)
    console.print(table)
    console.print(summary)
    if ann_table is not None:
        console.print(ann_table)
    console.print(
        "scan floor = bytes of the chosen attributes' vectors over the rows that pass the filter / memcpy "
        "bandwidth. DuckDB reads one FLOAT\\[d] column per chosen attribute; both engines use the machine's cores."
    )


def _ann_table() -> Table:
    t = Table(title="faiss HNSW over the concatenated vector (M=32, efConstruction=200), exact rescoring off",
              title_justify="left")
    for col in ("items", "attrs", "efSearch", "p50 ms", "recall@20 vs exact", "build s"):
        t.add_column(col, justify="right")
    return t


def _bench_faiss(faiss, table: Table, vecs, attrs, d, k, n, reps) -> None:
    """HNSW on concat(x_a) with inner product; query = concat(w_a q_a), zeros for unused attributes."""
    allv = np.ascontiguousarray(np.concatenate([vecs[a] for a in attrs], axis=1))
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(allv.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(allv)
    build = time.perf_counter() - t
    rng = np.random.default_rng(11)
    for na in (1, 2, 4, len(attrs)):
        for ef in (64, 256):
            index.hnsw.efSearch = ef
            recalls, times = [], []
            for _ in range(reps):
                ref = int(rng.integers(0, n))
                q = np.zeros(allv.shape[1], np.float32)
                for j, a in enumerate(attrs[:na]):
                    qa = vecs[a][ref] + 0.1 * rng.normal(size=d).astype(np.float32)
                    q[j * d:(j + 1) * d] = qa / np.linalg.norm(qa) / (j + 1)
                exact = set(np.argpartition(-(allv @ q), k)[:k].tolist())
                t0 = time.perf_counter()
                _, got = index.search(q[None, :], k)
                times.append((time.perf_counter() - t0) * 1000)
                recalls.append(len(exact & set(got[0].tolist())) / k)
            table.add_row(f"{n:,}", str(na), str(ef), f"{np.median(times):.2f}", f"{np.mean(recalls):.2f}", f"{build:.0f}")


if __name__ == "__main__":
    main()
