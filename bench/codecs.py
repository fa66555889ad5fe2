"""Vector codecs in the embedded store: bytes per item on disk, ranking overlap with float32, exact latency.

For each size: bench/query.py's clustered unit vectors (A attributes x d, the same vectors for every codec)
go into one fresh embedded store per codec (float32, float16, int8, binary); then per codec: bytes per item
of the DuckDB file (after a checkpoint) and of the vector arrays beside it (allocated on disk), overlap@k of
its exact top k with float32's for 1, 2 and 4 attributes (the same queries), and the p50 latency of those
exact queries, without and with a filter passing 20 %.

    nice -n 19 .venv/bin/python bench/codecs.py --sizes 100000
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fgplugin.codecs import CODECS, INT8_DEFAULT_SCALE, bytes_per_vector, uses_scales
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.embedded import DB_FILE, DuckDBStore
from fgplugin.search.store import IndexLayout
from fgplugin.search.vectors import CACHE_DIR

console = Console()


def _query_module():
    """bench/query.py (its generator, documents, query specs and timing): the same set its tables measure."""
    spec = importlib.util.spec_from_file_location("fgplugin_bench_query", Path(__file__).with_name("query.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Q = _query_module()


def build(path: Path, codec: str, vecs, attrs, d, category, price, ids, batch: int) -> float:
    """A store of ``codec`` holding the generated items; returns items written per second."""
    schema = AttributeSchema(tuple(Attribute(a, ("x", "y")) for a in attrs), name="bench")
    scales = {a: INT8_DEFAULT_SCALE for a in attrs} if uses_scales(codec) else {}
    layout = IndexLayout(schema, {a: d for a in attrs}, {"category": "keyword", "price": "float"}, "bench",
                         codec=codec, scales=scales)
    n = len(ids)
    with DuckDBStore(path) as store:
        store.ensure_index(layout)
        t = time.perf_counter()
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task(f"{codec}: writing {n:,} items", total=n)
            for s in range(0, n, batch):
                res = store.upsert(Q.bench_docs(ids, vecs, attrs, category, price, s, min(n, s + batch)))
                assert not res.failed, res.failed[:3]
                prog.advance(task, min(batch, n - s))
        store.con.execute("CHECKPOINT").fetchall()
        return n / (time.perf_counter() - t)


def disk_bytes(path: Path) -> tuple[int, int]:
    """(DuckDB file bytes, vector array bytes allocated on disk; ANN files excluded)."""
    db = (path / DB_FILE).stat().st_size
    arrays = sum(f.stat().st_blocks * 512 for f in (path / CACHE_DIR).glob("*")
                 if f.is_file() and not f.name.startswith("ann_"))
    return db, arrays


def main() -> None:  # long: one table, row by row
    ap = Q.store_args(__doc__)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated, float32 first")
    args = ap.parse_args()
    console.width = max(console.width, 160)
    codecs = args.codecs.split(",")
    if codecs[0] != "float32":
        ap.error("--codecs must start with float32 (the reference ranking)")
    attrs = [f"attr{i}" for i in range(args.attributes)]
    d, k = args.dim, args.k
    console.print(f"{args.attributes} attributes x {d}-d, k={k}; command: {' '.join(sys.argv)}")
    table = Table(title=f"Codecs, embedded store: bytes per item on disk, overlap@{k} of exact rankings with "
                        "float32's, exact query p50 ms (1 / 2 / 4 attributes)", title_justify="left")
    for col in ("items", "codec", "vector bytes/item", "DuckDB bytes/item", "arrays bytes/item", "total bytes/item",
                "write items/s", "overlap@k 1/2/4", "exact p50 ms, no filter", "exact p50 ms, 20 % filter"):
        table.add_column(col, justify="right")
    root = Path(tempfile.mkdtemp(prefix="fg-codecs-", dir=args.dir))
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            rng = np.random.default_rng(n)
            vecs = Q.generate(n, attrs, d, seed=n)
            ids = np.array([f"item{i:08d}" for i in range(n)])
            category = np.array(Q.CATEGORIES)[rng.integers(0, len(Q.CATEGORIES), size=n)]
            price = rng.uniform(1, 500, size=n).round(2)
            reference: dict = {}
            for codec in codecs:
                path = root / f"{codec}-{n}"
                rate = build(path, codec, vecs, attrs, d, category, price, ids, args.batch)
                lat: dict = {None: [], "c0": []}
                overlap = []
                with DuckDBStore(path, read_only=True) as store:
                    for na in (1, 2, 4):
                        for cat in (None, "c0"):
                            specs = Q.query_specs(vecs, attrs, d, n, na, cat, k, args.queries, "exact")
                            p50, _, got = Q.timed_specs(store, specs)
                            lat[cat].append(p50)
                            if codec == "float32":
                                reference[(na, cat)] = got
                            elif cat is None:
                                overlap.append(Q.recall_at_k(got, reference[(na, cat)], k))
                db, arrays = disk_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
                table.add_row(f"{n:,}", codec, f"{args.attributes * bytes_per_vector(codec, d):,}", f"{db / n:,.0f}",
                              f"{arrays / n:,.0f}", f"{(db + arrays) / n:,.0f}", f"{rate:,.0f}",
                              " / ".join(f"{o:.3f}" for o in overlap) if overlap else "(reference)",
                              " / ".join(f"{x:.1f}" for x in lat[None]), " / ".join(f"{x:.1f}" for x in lat["c0"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    console.print(table)
    console.print("vector bytes/item = the codes of every attribute (binary: its sign bits and the int8 codes they "
                  "are rescored with); arrays = the row-aligned files queries scan (codes, bits, norms, presence), "
                  "rebuilt from DuckDB when missing; binary: candidates from the bits, the best max(10 k, 200, 2 % of the rows) "
                  "rescored on the int8 codes.")


if __name__ == "__main__":
    main()
