"""Index throughput: encoding (decode vs model, and the pipeline that overlaps them) and store writes.

Encoding: an export of the default model config (``configs/asen_v2.toml``, untrained: speed does not
depend on the weights), or ``--model EXPORT``, on real 224x224 product photos from
``../shared/fashion-product-images`` (generated garments when that folder is absent). Three numbers:

- decode only: ``--workers`` threads read, decode, resize and normalise images, no model;
- model only: forward passes on already-preprocessed batches;
- pipelined: :func:`fgplugin.encoder.iter_encoded`, loaders and model overlapping (what
  ``fgplugin index`` gets), with the time the model thread waited for images.

Store: ``--store-items`` documents with random unit vectors (the model's dims) and three metadata
fields written into a fresh embedded store by the index worker's batch size and by 1000, then the
``fingerprints()`` scan a resumed run starts with.

    .venv/bin/python bench/index.py                 # default config, 256 images, 100k store items
    .venv/bin/python bench/index.py --model EXPORT --images 1024 --workers 4
    .venv/bin/python bench/index.py --set trunk=resnet18 --skip-store
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fgplugin.encoder import iter_encoded, make_client
from fgplugin.export import ExportedEncoder
from fgplugin.images import DEFAULT_LIMITS, decode, read_bytes
from fgplugin.schema import AttributeSchema
from fgplugin.search.store import Document, IndexLayout
from fgplugin.search.embedded import DuckDBStore

console = Console()
SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "fashion-product-images" / "images"


def parse_overrides(pairs: list[str]) -> dict:
    from fgplugin.models import parse_overrides as parse

    return parse(pairs)


def default_export(tmp: Path, variant: str, overrides: dict) -> Path:
    """Export an untrained model of the default config (for the synthetic schema)."""
    from fgplugin.export import export_model
    from fgplugin.models import build_model, load_config, save_checkpoint
    from fgplugin.synth import synth_schema

    config = load_config(variant, overrides)
    model = build_model(config, synth_schema())
    save_checkpoint(tmp / "ckpt", model)
    return export_model(tmp / "ckpt", tmp / "export")


def bench_images(tmp: Path, n: int) -> tuple[list[str], str]:
    if SHARED_IMAGES.is_dir():
        files = sorted(p for p in SHARED_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        if len(files) >= n:
            return [str(p) for p in files], f"real product photos ({SHARED_IMAGES.parent.name})"
    from fgplugin import synth

    cat = synth.generate(tmp / "synth", n, seed=0, size=224)
    return sorted(str(p) for p in (cat.parent / "images").iterdir())[:n], "generated garments (224 px)"


def time_decode(enc: ExportedEncoder, paths: list[str], workers: int) -> float:
    tf = enc.preprocess.transform()
    client = make_client(DEFAULT_LIMITS, workers)

    def load(p: str) -> torch.Tensor:
        return tf(decode(read_bytes(p, client=client), p))

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(load, paths):
            pass
    client.close()
    return time.perf_counter() - t


def time_model(enc: ExportedEncoder, paths: list[str], batch_size: int) -> float:
    tf = enc.preprocess.transform()
    batches = [torch.stack([tf(decode(read_bytes(p), p)) for p in paths[i:i + batch_size]])
               for i in range(0, len(paths), batch_size)]
    enc.encode_tensors(batches[0][:2])  # warm-up
    t = time.perf_counter()
    for b in batches:
        enc.encode_tensors(b)
    return time.perf_counter() - t


def bench_store(tmp: Path, n: int, dims: dict[str, int], batch_sizes: tuple[int, ...]) -> list[tuple[str, int, float]]:
    schema = AttributeSchema.from_dict({"name": "bench", "attributes": {a: ["x", "y"] for a in dims}})
    layout = IndexLayout(schema, dims, {"brand": "keyword", "price": "float", "in_stock": "boolean"}, "bench-v1")
    rng = np.random.default_rng(0)
    rows = []
    for bs in batch_sizes:
        d = tmp / f"store-{bs}"
        st = DuckDBStore(d)
        st.ensure_index(layout)
        written, elapsed = 0, 0.0
        for start in range(0, n, 10_000):  # generate in chunks: the vectors are not part of the timing
            m = min(10_000, n - start)
            vecs = {a: rng.normal(size=(m, k)).astype(np.float32) for a, k in dims.items()}
            for v in vecs.values():
                v /= np.linalg.norm(v, axis=1, keepdims=True)
            docs = [Document(f"item{start + i:08d}", {a: vecs[a][i] for a in dims},
                             {"brand": f"b{i % 50}", "price": float(i % 997), "in_stock": bool(i % 3)},
                             "bench-v1", f"images/{start + i}.jpg") for i in range(m)]
            t = time.perf_counter()
            for i in range(0, m, bs):
                r = st.upsert(docs[i:i + bs])
                assert not r.failed, r.failed[:1]
            elapsed += time.perf_counter() - t
            written += m
        assert st.count() == n
        rows.append((f"upsert, {bs} per batch", n, elapsed))
        t = time.perf_counter()
        v = st.fingerprints()
        rows.append((f"fingerprints() scan (resume check), after batches of {bs}", len(v), time.perf_counter() - t))
        st.close()
        shutil.rmtree(d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="Export folder (default: export the default config, untrained).")
    ap.add_argument("--variant", default="asen_v2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Config override for the default export, e.g. --set trunk=resnet18 (repeatable).")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default).")
    ap.add_argument("--store-items", type=int, default=100_000)
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--skip-store", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fgplugin-bench-index-"))
    table = Table(title=f"fgplugin index throughput ({torch.get_num_threads()} torch threads, "
                        f"{'CUDA' if torch.cuda.is_available() else 'CPU'})", title_justify="left")
    for col, just in (("what", "left"), ("items", "right"), ("seconds", "right"), ("items/s", "right"), ("note", "left")):
        table.add_column(col, justify=just)
    dims = None
    try:
        if not args.skip_encode:
            with console.status("preparing the export and images"):
                export = args.model or default_export(tmp, args.variant, parse_overrides(args.set))
                enc = ExportedEncoder.load(export)
                paths, source = bench_images(tmp, args.images)
            dims = enc.dims
            card = enc.card
            model_desc = f"{card.get('variant')} {card.get('config', {}).get('trunk', '')} {enc.preprocess.image_size}px"
            with console.status("decode only"):
                td = time_decode(enc, paths, args.workers)
            table.add_row(f"decode+resize only, {args.workers} threads", str(len(paths)), f"{td:.2f}",
                          f"{len(paths) / td:.1f}", source)
            with console.status("model only"):
                tm = time_model(enc, paths, args.batch_size)
            table.add_row(f"model only, batch {args.batch_size}", str(len(paths)), f"{tm:.2f}",
                          f"{len(paths) / tm:.1f}", f"{model_desc} on {enc.device}")
            with console.status("pipelined"):
                t = time.perf_counter()
                decode_s = model_s = wait_s = 0.0
                n = 0
                for b in iter_encoded(enc, [(str(i), p) for i, p in enumerate(paths)], batch_size=args.batch_size,
                                      workers=args.workers):
                    n += len(b.ids)
                    decode_s += b.timings.read_s + b.timings.decode_s
                    model_s += b.timings.model_s
                    wait_s += b.timings.wait_s
                tp = time.perf_counter() - t
            table.add_row("pipelined (iter_encoded)", str(n), f"{tp:.2f}", f"{n / tp:.1f}",
                          f"model {model_s:.1f} s, waited for images {wait_s:.1f} s, "
                          f"loader thread-seconds {decode_s:.1f}")
        if not args.skip_store:
            if dims is None:
                dims = {f"a{i}": 64 for i in range(7)}
            for what, n, s in bench_store(tmp, args.store_items, dict(dims), (args.batch_size, 1000)):
                table.add_row(what, str(n), f"{s:.2f}", f"{n / s:,.0f}",
                              f"embedded store, {len(dims)} attributes x {sum(dims.values()) // len(dims)} d")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(table)


if __name__ == "__main__":
    main()
