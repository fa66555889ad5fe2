"""Generator throughput: images/s of ``fgplugin data synth`` at 1 and 2 workers.

Each row runs :func:`fgplugin.synth.generate` end to end into a fresh temporary folder (render,
JPEG encode, write images, catalog, boxes, splits), so pool start-up is included, and also reports
the CPU time per image of one render in this process (no JPEG, no pool): the floor a worker pays.
Load from other processes on the machine lowers the wall-clock figures; the table prints the
1-minute load average next to them.

    .venv/bin/python bench/synth.py                  # 600 images at 224 px, workers 1 and 2
    .venv/bin/python bench/synth.py -n 2000 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from rich.console import Console
from rich.table import Table

from fgplugin.synth import generate, render_item


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=600, help="images per run")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    console = Console()

    t = time.process_time()
    k = 50
    for i in range(k):
        render_item(i, args.seed, args.size)
    render_cpu_ms = 1000 * (time.process_time() - t) / k

    table = Table(title=f"fgplugin data synth: {args.n} images at {args.size} px ({os.cpu_count()} CPUs)")
    table.add_column("workers", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("images/s", justify="right")
    table.add_column("images/min", justify="right")
    table.add_column("load avg (1 min)", justify="right")
    for w in (int(x) for x in args.workers.split(",")):
        out = tempfile.mkdtemp(prefix="fgplugin-bench-synth-")
        try:
            t0 = time.perf_counter()
            generate(out, args.n, seed=args.seed, size=args.size, workers=w)
            dt = time.perf_counter() - t0
        finally:
            shutil.rmtree(out, ignore_errors=True)
        table.add_row(str(w), f"{dt:.1f}", f"{args.n / dt:.0f}", f"{60 * args.n / dt:.0f}", f"{os.getloadavg()[0]:.1f}")
    console.print(table)
    console.print(f"one render in this process: {render_cpu_ms:.1f} ms CPU per image "
                  f"(= {1000 / render_cpu_ms:.0f} images/s per free core, before JPEG and file writes)")


if __name__ == "__main__":
    main()
