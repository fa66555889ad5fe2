"""A real OpenSearch node for the benchmarks: start and stop one (docker/opensearch-node.sh, instance
``bench``), bulk-load generated documents the way a catalog load should be done, and describe the machine.

Used by bench/query.py (``--node-size``) and bench/opensearch.py. The node is the Maven-assembled one of
docker/README.md: the k-NN plugin without native libraries, so indexes use the lucene engine.
"""

from __future__ import annotations

import os
import platform
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable

from fgplugin.opensearch.client import OpenSearchConfig
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.search.store import Document, IndexLayout

ROOT = Path(__file__).resolve().parents[1]
NODE = [str(ROOT / "docker" / "opensearch-node.sh"), "--instance", "bench"]
DEFAULT_HEAP = "2g"  # lucene HNSW graphs are built on the heap; the test nodes' 512m is too small at 100k


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")))
    return f"{os.cpu_count()} CPUs ({cpu}), {mem / 2**20:.0f} GiB RAM"


def start_node(port: int) -> str:
    """Start the bench node (a clean data folder) and return its URL."""
    env = dict(os.environ)
    env.setdefault("OPENSEARCH_NODE_HEAP", DEFAULT_HEAP)
    out = subprocess.run(NODE + ["start", "--port", str(port), "--clean"], check=True, stdout=subprocess.PIPE,
                         text=True, env=env)
    return out.stdout.strip().splitlines()[-1]


def stop_node() -> None:
    subprocess.run(NODE + ["stop"], check=False)


def open_node_store(url: str, index: str) -> OpenSearchStore:
    return OpenSearchStore(OpenSearchConfig(url=url, index=index, timeout=600), engine="lucene", refresh=False)


def node_header(store: OpenSearchStore) -> str:
    info = store.client.info()
    jvm = store.client.nodes.stats(metric="jvm")["nodes"]
    heap = max(nd["jvm"]["mem"]["heap_max_in_bytes"] for nd in jvm.values())
    return (f"OpenSearch {info['version']['number']} ({len(jvm)} node(s), heap {heap / 2**30:.1f} GiB, "
            f"k-NN engine lucene)")


def disk_parts(index_uuid: str) -> dict[str, int]:
    """Bytes per Lucene file kind of the local bench node's index (the _stats file_sizes keep one file
    per extension, so they undercount per-field files such as .vec/.vex); a compound file (.cfs) counts as
    the files it packs."""
    base = Path(os.environ.get("OPENSEARCH_NODE_HOME", ROOT / ".opensearch")) / "nodes-bench"
    sizes: dict[str, int] = {}
    for f in base.glob(f"node-*/data/nodes/*/indices/{index_uuid}/*/index/*"):
        inner = compound_parts(f.with_suffix(".cfe")) if f.suffix == ".cfs" and f.with_suffix(".cfe").exists() else {}
        if sum(inner.values()) > f.stat().st_size:
            inner = {}  # not the table of this file: count the compound file whole
        for ext, b in (inner or {f.suffix: f.stat().st_size}).items():
            sizes[ext] = sizes.get(ext, 0) + b
    return sizes


def compound_parts(cfe: Path) -> dict[str, int]:
    """Bytes per file kind inside a Lucene compound file (.cfs; a small flushed segment is one), read from
    its entries table ``cfe`` (Lucene90CompoundFormat: index header, vint count, then per file its name
    without the segment prefix and little-endian int64 offset and length); {} when it does not parse."""
    b = cfe.read_bytes()
    pos = 4  # the codec magic

    def vint() -> int:
        nonlocal pos
        out = shift = 0
        while True:
            byte = b[pos]
            pos += 1
            out |= (byte & 0x7F) << shift
            if byte < 0x80:
                return out
            shift += 7

    try:
        skip = vint()  # (read before pos is added to: vint moves it)
        pos += skip + 4 + 16  # codec name, version, segment id
        pos += 1 + b[pos]  # the header's suffix
        sizes: dict[str, int] = {}
        for _ in range(vint()):
            name_len = vint()
            name = b[pos:pos + name_len].decode()  # without the segment prefix: ".fdt", "_Lucene99Hnsw..._0.vec"
            ext = name[name.rfind("."):]
            pos += name_len
            _, length = struct.unpack_from("<qq", b, pos)
            pos += 16
            sizes[ext] = sizes.get(ext, 0) + length
    except (IndexError, UnicodeDecodeError, struct.error):
        return {}
    return sizes


def load_node(store: OpenSearchStore, layout: IndexLayout, n: int, docs: Callable[[int, int], list[Document]],
              batch: int, progress: Callable[[str], None] = print) -> dict:
    """Bulk-load documents 0..n through store.upsert with refresh off, then refresh and force-merge to one
    segment (what a catalog load should end with: one graph per field to search)."""
    store.ensure_index(layout)
    index = store.write_index
    store.client.indices.put_settings(index=index, body={"index": {"refresh_interval": "-1"}})
    t, cpu = time.perf_counter(), time.process_time()
    for s in range(0, n, batch):
        part = docs(s, min(n, s + batch))
        res = store.upsert(part)
        assert not res.failed, res.failed[:3]
        if (s // batch + 1) % max(1, n // batch // 10) == 0:
            progress(f"  opensearch: {s + len(part):,}/{n:,} items, {time.perf_counter() - t:.0f} s")
    store.client.indices.put_settings(index=index, body={"index": {"refresh_interval": None}})
    store.refresh()
    write_s, client_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    store.client.indices.forcemerge(index=index, max_num_segments=1, request_timeout=7200)
    store.refresh()
    merge_s = time.perf_counter() - t
    assert store.count() == n, (store.count(), n)
    stats = store.client.indices.stats(index=index, metric="store,segments", include_segment_file_sizes=True)
    prim = stats["indices"][index]["primaries"]
    files = {k: v["size_in_bytes"] for k, v in prim["segments"].get("file_sizes", {}).items()}
    uuid = store.client.indices.get_settings(index=index)[index]["settings"]["index"]["uuid"]
    return {"write_s": write_s, "client_cpu_s": client_cpu_s, "merge_s": merge_s, "rate": n / write_s,
            "store_bytes": prim["store"]["size_in_bytes"], "segments": prim["segments"]["count"], "file_sizes": files,
            "disk_parts": disk_parts(uuid), "knn_graph_memory_kb": knn_graph_memory_kb(store)}


def knn_graph_memory_kb(store: OpenSearchStore) -> int:
    """The k-NN stats API's graph memory (KB, all nodes): the plugin's native (faiss) graph cache, filled by
    queries; lucene graphs are ordinary Lucene files read through the page cache, so it stays 0 for them."""
    knn = store.client.transport.perform_request("GET", "/_plugins/_knn/stats")
    return sum(int(nd.get("graph_memory_usage", 0)) for nd in knn.get("nodes", {}).values())


# What each Lucene file kind of a k-NN index holds (by extension; ``disk_parts``)
LUCENE_FILES = {".vec": "raw vectors", ".vex": "HNSW graph", ".dvd": "doc values (the vectors the exact script reads)",
                ".fdt": "stored fields (_source)"}


def file_groups(parts: dict[str, int]) -> dict[str, int]:
    """``disk_parts`` grouped as LUCENE_FILES names them, everything else under ``other``."""
    out = {ext: parts.get(ext, 0) for ext in LUCENE_FILES}
    out["other"] = sum(b for ext, b in parts.items() if ext not in LUCENE_FILES)
    return out


def drop_index(store: OpenSearchStore, say: Callable[[str], None] = print) -> None:
    try:
        if store.write_index:
            store.client.indices.delete(index=store.write_index, ignore_unavailable=True)
    except Exception as e:  # noqa: BLE001 - a dead node must not hide the real error
        say(f"could not delete the benchmark index: {e}")
    store.close()
