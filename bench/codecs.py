"""Vector codecs in the embedded store and on a real OpenSearch node: bytes per item, ranking overlap with
float32, exact and ANN latency, ANN recall.

For each size: bench/query.py's clustered unit vectors (A attributes x d, the same vectors for every codec)
go into one fresh embedded store per codec (float32, float16, int8, binary); then per codec: bytes per item
of the DuckDB file (after a checkpoint) and of the vector arrays beside it (allocated on disk), overlap@k of
its exact top k with float32's for 1, 2 and 4 attributes (the same queries), and the p50 latency of those
exact queries, without and with a filter passing 20 %. Then its ANN indexes (``prepare_ann``, timed) and
the ``ann`` and ``ann+rescore`` modes of the same queries: recall@k against the codec's own exact ranking
and against float32's, and p50 latency.

With ``--node-size N`` (one of ``--sizes``) the same N items also go into a real OpenSearch node
(bench/node.py starts one, instance ``bench``), one index per codec the lucene engine can hold (float32;
int8 as Lucene byte vectors; float16 and binary are refused by the mapping, and the node has no faiss
libraries), each force-merged to one segment: bytes per item by Lucene file kind, the k-NN stats graph
memory, and exact / ann / ann+rescore: recall@k against the embedded store's exact rankings (float32's
and the same codec's) and p50 latency.

    nice -n 19 .venv/bin/python bench/codecs.py --sizes 100000
    nice -n 19 .venv/bin/python bench/codecs.py --sizes 20000 --node-size 20000 --codecs float32,int8
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fgplugin.codecs import CODECS, INT8_DEFAULT_SCALE, bytes_per_vector, uses_scales
from fgplugin.errors import StoreError
from fgplugin.opensearch.mapping import vector_property
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.embedded import DB_FILE, DuckDBStore
from fgplugin.search.store import IndexLayout
from fgplugin.search.vectors import CACHE_DIR

console = Console()


def _bench_module(name: str):
    """A sibling bench/ script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"fgplugin_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Q = _bench_module("query")  # its generator, documents, query specs and timing: the same set its tables measure
N = _bench_module("node")  # start, load and stop the real node
CONFIGS = [(na, cat) for na in (1, 2, 4) for cat in (None, "c0")]  # attributes weighted, filter (c0: 20 %)
ANN_MODES = ("ann", "ann+rescore")
NODE_ENGINE = "lucene"  # the node's k-NN plugin has no native (faiss) libraries
WARMUP = 3  # queries run on the node before timing (caches, the stored script)


@dataclass
class BenchSet:
    """One size's generated items: the same vectors and metadata for every codec and both stores."""

    n: int
    attrs: list[str]
    d: int
    vecs: dict
    ids: np.ndarray
    category: np.ndarray
    price: np.ndarray

    @classmethod
    def make(cls, n: int, attrs: list[str], d: int) -> "BenchSet":
        rng = np.random.default_rng(n)
        vecs = Q.generate(n, attrs, d, seed=n)
        ids = np.array([f"item{i:08d}" for i in range(n)])
        category = np.array(Q.CATEGORIES)[rng.integers(0, len(Q.CATEGORIES), size=n)]
        return cls(n, attrs, d, vecs, ids, category, rng.uniform(1, 500, size=n).round(2))

    def docs(self, start: int, stop: int) -> list:
        return Q.bench_docs(self.ids, self.vecs, self.attrs, self.category, self.price, start, stop)

    def specs(self, na: int, cat: str | None, k: int, reps: int, mode: str) -> list:
        return Q.query_specs(self.vecs, self.attrs, self.d, self.n, na, cat, k, reps, mode)

    def layout(self, codec: str) -> IndexLayout:
        schema = AttributeSchema(tuple(Attribute(a, ("x", "y")) for a in self.attrs), name="bench")
        scales = {a: INT8_DEFAULT_SCALE for a in self.attrs} if uses_scales(codec) else {}
        return IndexLayout(schema, {a: self.d for a in self.attrs}, {"category": "keyword", "price": "float"}, "bench",
                           codec=codec, scales=scales)


def build(path: Path, codec: str, data: BenchSet, batch: int) -> float:
    """A store of ``codec`` holding the generated items; returns items written per second."""
    n = data.n
    with DuckDBStore(path) as store:
        store.ensure_index(data.layout(codec))
        t = time.perf_counter()
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task(f"{codec}: writing {n:,} items", total=n)
            for s in range(0, n, batch):
                res = store.upsert(data.docs(s, min(n, s + batch)))
                assert not res.failed, res.failed[:3]
                prog.advance(task, min(batch, n - s))
        store.con.execute("CHECKPOINT").fetchall()
        return n / (time.perf_counter() - t)


def disk_bytes(path: Path) -> tuple[int, int, int]:
    """(DuckDB file bytes, vector array bytes, ANN index bytes), the latter two as allocated on disk."""
    db = (path / DB_FILE).stat().st_size
    files = [f for f in (path / CACHE_DIR).glob("*") if f.is_file()]
    arrays = sum(f.stat().st_blocks * 512 for f in files if not f.name.startswith("ann_"))
    ann = sum(f.stat().st_blocks * 512 for f in files if f.name.startswith("ann_"))
    return db, arrays, ann


@dataclass
class CodecRun:
    """One codec's embedded store at one size: what its rows in the tables are made of."""

    rate: float
    db: int
    arrays: int
    ann_bytes: int
    ann_build_s: float
    exact: dict  # (attrs, filter) -> (p50 ms, results)
    ann: dict  # (mode, attrs, filter) -> (p50 ms, results)


def run_codec(path: Path, codec: str, data: BenchSet, args) -> CodecRun:
    """Build the store of ``codec``, its ANN indexes for the attributes the queries weight, and run every
    query configuration exactly and in both ANN modes."""
    rate = build(path, codec, data, args.batch)
    with DuckDBStore(path) as store:  # the indexes a query would build on first use, built (and timed) here
        t = time.perf_counter()
        store.prepare_ann(data.attrs[:4])
        build_s = time.perf_counter() - t
    exact, ann = {}, {}
    with DuckDBStore(path, read_only=True) as store:
        for na, cat in CONFIGS:
            p50, _, got = Q.timed_specs(store, data.specs(na, cat, args.k, args.queries, "exact"))
            exact[(na, cat)] = (p50, got)
            for mode in ANN_MODES:
                p50, _, got = Q.timed_specs(store, data.specs(na, cat, args.k, args.queries, mode))
                ann[(mode, na, cat)] = (p50, got)
    db, arrays, ann_bytes = disk_bytes(path)
    return CodecRun(rate, db, arrays, ann_bytes, build_s, exact, ann)


def ran_exact(results: list) -> bool:
    """Whether every query of an ANN configuration ran exactly (the store's plan: too few rows for the index)."""
    return all(r.mode == "exact" for r in results)


def joined(values: list[str]) -> str:
    return " / ".join(values)


def main() -> None:  # long: the options, the tables and their notes
    ap = Q.store_args(__doc__)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated, float32 first")
    ap.add_argument("--node-size", type=int, default=0,
                    help="also load this many items (one of --sizes) into a real OpenSearch node, once per codec "
                         "its lucene engine holds, and query it")
    ap.add_argument("--node-port", type=int, default=9270, help="HTTP port of the node bench/node.py starts")
    ap.add_argument("--node-batch", type=int, default=2000, help="documents per upsert into the node")
    args = ap.parse_args()
    console.width = max(console.width, 160)
    codecs = args.codecs.split(",")
    if codecs[0] != "float32":
        ap.error("--codecs must start with float32 (the reference ranking)")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.node_size and args.node_size not in sizes:
        ap.error(f"--node-size {args.node_size} must be one of --sizes ({args.sizes}): the node's answers are "
                 "judged against the embedded stores' exact rankings at that size")
    attrs = [f"attr{i}" for i in range(args.attributes)]
    d, k = args.dim, args.k
    console.print(f"{args.attributes} attributes x {d}-d, k={k}; command: {' '.join(sys.argv)}")
    console.print(f"machine: {N.machine()}; load average at start: {load_average()}")
    table = Table(title=f"Codecs, embedded store: bytes per item on disk, overlap@{k} of exact rankings with "
                        "float32's, exact query p50 ms (1 / 2 / 4 attributes)", title_justify="left")
    for col in ("items", "codec", "vector bytes/item", "DuckDB bytes/item", "arrays bytes/item", "total bytes/item",
                "write items/s", "overlap@k 1/2/4", "exact p50 ms, no filter", "exact p50 ms, 20 % filter"):
        table.add_column(col, justify="right")
    ann_t = Table(title=f"Codecs, embedded store, ANN: recall@{k} against the codec's own exact ranking and "
                        f"against float32's, p50 ms (1 / 2 / 4 attributes)", title_justify="left")
    for col in ("items", "codec", "mode", "filter", f"recall@{k} vs own exact", f"recall@{k} vs float32 exact",
                "p50 ms", "ANN build s", "ANN bytes/item"):
        ann_t.add_column(col, justify="right")
    node_tables = None
    root = Path(tempfile.mkdtemp(prefix="fg-codecs-", dir=args.dir))
    try:
        for n in sizes:
            data = BenchSet.make(n, attrs, d)
            runs: dict[str, CodecRun] = {}
            for codec in codecs:
                path = root / f"{codec}-{n}"
                run = runs[codec] = run_codec(path, codec, data, args)
                shutil.rmtree(path, ignore_errors=True)
                ref = runs["float32"]
                overlap = [Q.recall_at_k(run.exact[(na, None)][1], ref.exact[(na, None)][1], k) for na in (1, 2, 4)]
                lat = {cat: [f"{run.exact[(na, cat)][0]:.1f}" for na in (1, 2, 4)] for cat in (None, "c0")}
                table.add_row(f"{n:,}", codec, f"{args.attributes * bytes_per_vector(codec, d):,}", f"{run.db / n:,.0f}",
                              f"{run.arrays / n:,.0f}", f"{(run.db + run.arrays) / n:,.0f}", f"{run.rate:,.0f}",
                              joined([f"{o:.3f}" for o in overlap]) if codec != "float32" else "(reference)",
                              joined(lat[None]), joined(lat["c0"]))
                ann_rows(ann_t, n, codec, run, ref, k, args.attributes)
                if n != args.node_size and codec != "float32":
                    del runs[codec]  # keep only what later rows and the node are judged against
            if n == args.node_size:
                node_tables = bench_node(data, args, codecs, {c: r.exact for c, r in runs.items()})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    console.print(table)
    console.print("vector bytes/item = the codes of every attribute (binary: its sign bits and the int8 codes they "
                  "are rescored with); arrays = the row-aligned files queries scan (codes, bits, norms, presence), "
                  "rebuilt from DuckDB when missing; binary: candidates from the bits, the best max(10 k, 200, 2 % of the rows) "
                  "rescored on the int8 codes.")
    console.print(ann_t)
    console.print("ann / ann+rescore: the ANN index's candidates rescored exactly on the codes (one attribute: its "
                  "IVF index's best k / max(5 k, 100); a mix: the rows the IVF lists of its weighted attributes reach, "
                  "the best max(500, 5 x that window) by list score; fgplugin.search.ann: "
                  "faiss IVF, 8-bit scalar codes for int8 and binary, fp16 for float16); ANN bytes/item = those index "
                  "files on disk (4 attributes indexed); * = every query of that cell ran exactly (the rows it searches x "
                  f"its attributes were at most {DuckDBStore.exact_below:,}: the store's plan skips the index there).")
    if node_tables is not None:
        for t in node_tables[:2]:
            console.print(t)
        console.print(node_tables[2])
    console.print(f"load average at end: {load_average()}")


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def ann_rows(ann_t: Table, n: int, codec: str, run: CodecRun, ref: CodecRun, k: int, n_attrs: int) -> None:
    """The ANN table's rows of one codec: per mode and filter, recall against its own and float32's exact."""
    first = True
    for mode in ANN_MODES:
        for cat in (None, "c0"):
            own, f32, p50 = [], [], []
            for na in (1, 2, 4):
                ms, got = run.ann[(mode, na, cat)]
                star = "*" if ran_exact(got) else ""
                own.append(f"{Q.recall_at_k(got, run.exact[(na, cat)][1], k):.3f}{star}")
                f32.append(f"{Q.recall_at_k(got, ref.exact[(na, cat)][1], k):.3f}{star}")
                p50.append(f"{ms:.1f}{star}")
            ann_t.add_row(f"{n:,}", codec, mode, "20 %" if cat else "none", joined(own), joined(f32), joined(p50),
                          f"{run.ann_build_s:.1f}" if first else "", f"{run.ann_bytes / n:,.0f}" if first else "")
            first = False


def lucene_refusal(codec: str, d: int) -> str | None:
    """Why the node's lucene engine cannot hold ``codec`` (the mapping's own StoreError), None if it can."""
    try:
        vector_property(d, NODE_ENGINE, 16, 128, codec)
    except StoreError as e:
        return str(e)
    return None


def max_score_diff(got: list, ref: list) -> float:
    """The largest |score| difference over the ids both result lists of each query hold."""
    diffs = [abs(a.score - b[a.id]) for g, r in zip(got, ref) for b in [{h.id: h.score for h in r.hits}]
             for a in g.hits if a.id in b]
    return max(diffs, default=0.0)


def bench_node(data: BenchSet, args, codecs: list[str], embedded: dict) -> tuple[Table, Table, str]:  # long: one index per codec, row by row
    """The same items on a real OpenSearch node (started here, stopped at the end), one index per codec the
    lucene engine holds; judged against the embedded stores' exact rankings (``embedded``: codec -> the
    exact results per configuration)."""
    n, k = data.n, args.k
    size_t = Table(title=f"Codecs on a real OpenSearch node (lucene), {n:,} items force-merged to one segment: "
                         "bytes per item", title_justify="left")
    for col in ("items", "codec", ".vec raw vectors", ".vex HNSW graph", ".dvd doc values", ".fdt _source",
                "other files", "index (_stats store)", "k-NN graph memory KB", "write items/s", "force-merge s"):
        size_t.add_column(col, justify="right")
    query_t = Table(title=f"Codecs on the node: recall@{k} against the embedded store's exact rankings (float32's; "
                          f"the same codec's), p50 ms (1 / 2 / 4 attributes)", title_justify="left")
    for col in ("items", "codec", "mode", "filter", f"recall@{k} vs embedded float32 exact",
                f"recall@{k} vs embedded same-codec exact", "p50 ms", "max |score diff| vs embedded"):
        query_t.add_column(col, justify="right")
    held = []
    for codec in codecs:
        why = lucene_refusal(codec, data.d)
        if why:
            console.print(f"node: codec {codec} not loaded: {why}")
        else:
            held.append(codec)
    url = N.start_node(args.node_port)
    try:
        for codec in held:
            store = N.open_node_store(url, "fgcodecs")
            try:
                console.print(f"node: {N.node_header(store)}; codec {codec}: loading {n:,} items ...")
                osr = N.load_node(store, data.layout(codec), n, data.docs, args.node_batch, console.print)
                node_rows(store, data, args, codec, embedded, query_t)
                graph_kb = N.knn_graph_memory_kb(store)  # after the queries: a native cache fills on search
                console.print(f"  node: codec {codec}: {osr['segments']} segment(s); bytes by file kind: "
                              + ", ".join(f"{e} {b:,}" for e, b in sorted(osr["disk_parts"].items(), key=lambda eb: -eb[1])))
                g = N.file_groups(osr["disk_parts"])
                size_t.add_row(f"{n:,}", codec, *(f"{b / n:,.0f}" for b in g.values()), f"{osr['store_bytes'] / n:,.0f}",
                               f"{graph_kb:,}", f"{osr['rate']:,.0f}", f"{osr['merge_s']:.0f}")
            finally:
                N.drop_index(store, console.print)
    finally:
        N.stop_node()
    note = (f"Node: bytes per item of the index's files in the node's data folder, by kind: .vec = the raw "
            f"vectors the HNSW graphs are built on (every emb_<attribute> field and emb_all, their {len(data.attrs) * data.d}-d "
            "concatenation, so each vector twice), .vex = the HNSW graphs (neighbour lists), .dvd = doc values (the "
            "vectors the exact script reads), .fdt = stored fields (_source: the documents as sent, vectors as JSON "
            "numbers, compressed), other = every other file (.vem/.vemf vector metadata, .fdx, terms, points, ...; "
            "a compound .cfs file counts as the files it packs); index = the _stats API's primary store size. k-NN "
            "graph memory = the k-NN stats API's graph_memory_usage after the queries: the plugin's native "
            "(faiss/nmslib) graph cache; lucene graphs are Lucene files read through the page cache, not counted "
            "there. float16 and binary: refused by the lucene mapping "
            "(fgplugin.opensearch.mapping), and this node's k-NN plugin has no native libraries for faiss, so they are "
            "not measured on the node. Queries: exact = the painless script over every document (its row: overlap of "
            "the node's exact top k with the embedded store's, the same codec, which should be 1.000); ann = knn "
            "clauses (int8: always rescored by the script); recall against the embedded exact rankings.")
    return size_t, query_t, note


def node_rows(store, data: BenchSet, args, codec: str, embedded: dict, query_t: Table) -> None:
    """Every query configuration on the node (exact, ann, ann+rescore), judged against the embedded stores."""
    k = args.k
    for mode in ("exact",) + ANN_MODES:
        for cat in (None, "c0"):
            f32, own, p50, diff = [], [], [], []
            for na in (1, 2, 4):
                specs = data.specs(na, cat, k, args.queries, mode)
                for s in specs[:WARMUP]:
                    store.search(s)
                ms, _, got = Q.timed_specs(store, specs)
                f32.append(f"{Q.recall_at_k(got, embedded['float32'][(na, cat)][1], k):.3f}")
                own.append(f"{Q.recall_at_k(got, embedded[codec][(na, cat)][1], k):.3f}")
                p50.append(f"{ms:.1f}")
                diff.append(max_score_diff(got, embedded[codec][(na, cat)][1]))
            query_t.add_row(f"{data.n:,}", codec, mode, "20 %" if cat else "none", joined(f32), joined(own),
                            joined(p50), f"{max(diff):.1g}" if mode == "exact" else "-")
        console.print(f"  node: codec {codec}, {mode}: done")


if __name__ == "__main__":
    main()
