"""`fgplugin serve` throughput and latency over a real socket, against the same model in-process.

The server runs as its own process (`fgplugin serve`, so client and server do not share a GIL) on a
free localhost port. For each concurrency C, C client tasks each send single-image requests
(base64 JSON, what an ML Commons connector sends) back to back; we report images/s and p50/p95
request latency, the mean batch the micro-batcher formed, and the in-process reference: the same
decode + preprocess + model call on batches of C images in one thread (the best the server could do
if batching were perfect and HTTP free). served/in-process is the serving efficiency; 1 minus it is
the overhead.

    .venv/bin/python bench/serve.py                       # untrained asen_v2, 112 px, CPU
    .venv/bin/python bench/serve.py --model runs/export --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "fashion-product-images"
console = Console()


def sample_images(n: int, seed: int = 0) -> list[bytes]:
    """Real product photos from ../shared when present (JPEG as stored), else synthetic 224x224 JPEGs."""
    files = sorted(SHARED_IMAGES.rglob("*.jpg"))[: n * 10] if SHARED_IMAGES.is_dir() else []
    if files:
        rng = np.random.default_rng(seed)
        return [p.read_bytes() for p in rng.choice(files, size=min(n, len(files)), replace=False)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def untrained_export(out: Path, variant: str, image_size: int) -> Path:
    """An untrained export of the demo's model shape (speed does not depend on the weights)."""
    from fgplugin.export import export_model
    from fgplugin.models import build_model, load_config, save_checkpoint
    from fgplugin.synth import synth_schema

    model = build_model(load_config(variant, {"trunk": "resnet18", "image_size": image_size}), synth_schema())
    save_checkpoint(out.parent / "ckpt", model)
    return export_model(out.parent / "ckpt", out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def in_process(encoder, blobs: list[bytes], c: int, seconds: float) -> tuple[float, list[float]]:
    """images/s and per-call latencies of decode + preprocess + model on batches of c, one thread."""
    from fgplugin.images import decode

    lat: list[float] = []
    n = 0
    i = 0
    # Warm-up: the first calls at a new batch size are much slower (kernel selection, allocations).
    t_warm = time.perf_counter() + 1.0
    for k in range(100):
        encoder.encode_tensors(encoder.preprocess.batch([decode(b, "bench") for b in blobs[:c]]))
        if k >= 4 and time.perf_counter() > t_warm:
            break
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or not lat:
        batch = [blobs[(i + j) % len(blobs)] for j in range(c)]
        i += c
        t = time.perf_counter()
        ims = [decode(b, "bench") for b in batch]
        encoder.encode_tensors(encoder.preprocess.batch(ims))
        lat.append(time.perf_counter() - t)
        n += c
    return n / sum(lat), lat


async def served(url: str, blobs: list[bytes], c: int, requests: int) -> tuple[float, list[float], int]:
    """images/s, request latencies and model calls for ``requests`` single-image requests, c at a time."""
    bodies = [{"image": base64.b64encode(b).decode()} for b in blobs]
    lat: list[float] = []

    async def worker(client: httpx.AsyncClient, todo, record: bool) -> None:
        for i in todo:
            t = time.perf_counter()
            r = await client.post("/encode", json=bodies[i % len(bodies)])
            if record:
                lat.append(time.perf_counter() - t)
            r.raise_for_status()

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        warm = iter(range(6 * c))  # as in-process: let the server's model warm up at these batch sizes
        await asyncio.gather(*(worker(client, warm, False) for _ in range(c)))
        calls0 = (await client.get("/health")).json()["model_calls"]
        todo = iter(range(requests))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client, todo, True) for _ in range(c)))
        wall = time.perf_counter() - t0
        calls = (await client.get("/health")).json()["model_calls"] - calls0
    return requests / wall, lat, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="export folder (default: an untrained --variant at --image-size)")
    ap.add_argument("--variant", default="asen_v2")
    ap.add_argument("--image-size", type=int, default=112, help="input size of the default model (the demo's)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=160, help="requests per concurrency level")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=3.0, help="in-process timing per level and round")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate served / in-process this many times per level and keep each side's best "
                         "(both then see the same background load)")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    import torch

    from fgplugin.export import ExportedEncoder

    tmp = tempfile.TemporaryDirectory(prefix="fg-bench-serve-")
    model = Path(args.model) if args.model else untrained_export(Path(tmp.name) / "export", args.variant, args.image_size)
    encoder = ExportedEncoder.load(model, device="cpu")
    blobs = sample_images(64)
    console.print(f"model {encoder.version[:12]} ({encoder.card.get('variant')}, {encoder.preprocess.image_size} px, "
                  f"{len(encoder.attributes)} attributes); {len(blobs)} images "
                  f"({'shared photos' if SHARED_IMAGES.is_dir() else 'synthetic'}); torch threads "
                  f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    port = free_port()
    cmd = [sys.executable, "-m", "fgplugin_cli.app", "serve", "--model", str(model), "--port", str(port),
           "--device", "cpu", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-concurrency", "1024", "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("fgplugin serve did not start")
            time.sleep(0.2)
        table = Table(title=f"fgplugin serve vs in-process (CPU, max_batch={args.max_batch}, "
                            f"max_wait={args.max_wait_ms:g} ms)")
        for col in ("concurrency", "served img/s", "p50 ms", "p95 ms", "mean batch",
                    "in-process img/s (batch=C)", "in-proc p50 ms", "served / in-process"):
            table.add_column(col, justify="right")
        for c in levels:
            best_srv: tuple[float, list[float], int] | None = None
            best_ref: tuple[float, list[float]] | None = None
            for _ in range(args.rounds):
                srv = asyncio.run(served(url, blobs, c, args.requests))
                ref = in_process(encoder, blobs, c, args.seconds)
                best_srv = srv if best_srv is None or srv[0] > best_srv[0] else best_srv
                best_ref = ref if best_ref is None or ref[0] > best_ref[0] else best_ref
            assert best_srv is not None and best_ref is not None
            (ips, lat, calls), (ref_ips, ref_lat) = best_srv, best_ref
            table.add_row(str(c), f"{ips:.1f}", f"{1000 * pct(lat, 50):.1f}", f"{1000 * pct(lat, 95):.1f}",
                          f"{args.requests / max(calls, 1):.1f}", f"{ref_ips:.1f}",
                          f"{1000 * pct(ref_lat, 50):.1f}", f"{ips / ref_ips:.2f}")
        console.print(table)
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
