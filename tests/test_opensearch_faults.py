"""Faults on a real OpenSearch node (its own instance, started here): the node stopped in the middle of
an index run and started again, after which a rerun holds exactly the catalog; a write queue so small
that bulk requests are rejected with 429, retried until nothing is lost; and the CLI end to end against
the node (index, then query, equal to the embedded store)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

from conftest import LocalCluster
from fgplugin import synth
from fgplugin.errors import StoreError
from fgplugin.export import ExportedEncoder
from fgplugin.indexer import index_catalog
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.search.store import Document
from test_encoder import tiny_export
from test_store_contract import layout, make_docs

pytestmark = [pytest.mark.live]
N = 24


@pytest.fixture(scope="module")
def node(request, opensearch_url):  # noqa: ARG001 - skips, saying why, where no node can be had
    n = LocalCluster("faults", 1)
    # One write thread with a queue of one: concurrent bulk requests are rejected (429) at once.
    if not n.start("--write-queue-size", "1", "--setting", "thread_pool.write.size=1"):
        pytest.skip(n.error)
    yield n
    n.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    export = tiny_export(tmp_path_factory.getbasetemp(), synth.synth_schema())
    catalog_path = synth.generate(tmp_path_factory.mktemp("data"), N, seed=11, size=64, workers=1)
    return ExportedEncoder.load(export, device="cpu"), export, catalog_path


def store_on(url: str, alias: str) -> OpenSearchStore:
    return OpenSearchStore.from_url(url, index=alias, refresh="wait_for", engine="lucene", retry_total_s=3.0,
                                    retry_initial_s=0.2, bulk_initial_backoff=0.05, bulk_max_retries=30)


def test_node_stopped_mid_index_then_rerun_holds_exactly_the_catalog(node, env):
    enc, _, catalog_path = env
    ids = [json.loads(line)["id"] for line in catalog_path.read_text().splitlines()]
    alias = f"fgfault-{uuid.uuid4().hex[:6]}"
    st = store_on(node.url, alias)
    batches = []

    def stop_after_two(batch):
        batches.append(len(batch))
        if len(batches) == 2:
            node.run("stop", timeout=120)  # the node goes away between two bulk writes

    rep = index_catalog(catalog_path, enc, st, batch_size=4, workers=1, on_batch=stop_after_two)
    assert rep.aborted and rep.indexed == 8 and not rep.ok  # the store error ends the run, nothing is a failure
    assert not rep.failures
    st.close()
    args = [a for a in node.last_start_args if a != "--clean"]
    r = node.run(*args)  # same ports, same data
    assert r.returncode == 0, r.stderr[-2000:]
    st = store_on(node.url, alias)
    rep = index_catalog(catalog_path, enc, st, batch_size=4, workers=1)
    assert (rep.indexed, rep.skipped_current, rep.ok) == (N - 8, 8, True)
    assert sorted(st.versions()) == sorted(ids) and st.count() == N  # exactly the catalog: no gap, no duplicate
    for name in list(st.client.indices.get(index=f"{alias}-*")):
        st.client.indices.delete(index=name)
    st.close()


def test_a_tiny_write_queue_rejects_bulk_writes_and_the_retries_lose_nothing(node):
    alias = f"fgqueue-{uuid.uuid4().hex[:6]}"
    st = store_on(node.url, alias)
    st.config.bulk_chunk_size = 25
    st.ensure_index(layout())
    docs = make_docs(seed=3)
    parts = [docs[i::6] for i in range(6)]
    failed: list = []
    errors: list[BaseException] = []

    def write(part: list[Document]) -> None:
        try:
            failed.extend(st.upsert(part).failed)
        except StoreError as e:  # pragma: no cover - shown if it happens
            errors.append(e)

    before = _rejected(st)
    threads = [threading.Thread(target=write, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and not failed
    assert _rejected(st) > before  # the node did reject writes (429): the retries were exercised
    st.refresh()
    assert st.count() == len(docs) and set(st.versions()) == {d.id for d in docs}
    got = st.get_vectors([docs[5].id])[docs[5].id]["sleeve"]
    v = docs[5].vectors["sleeve"]
    assert np.allclose(got, v / np.linalg.norm(v), atol=1e-6)
    for name in list(st.client.indices.get(index=f"{alias}-*")):
        st.client.indices.delete(index=name)
    st.close()


def _rejected(st: OpenSearchStore) -> int:
    stats = st.client.nodes.stats(metric="thread_pool")
    return sum(n["thread_pool"]["write"]["rejected"] for n in stats["nodes"].values())


def test_cli_index_and_query_on_the_node_equal_the_embedded_store(opensearch_url, env, tmp_path):
    enc, export, catalog_path = env
    fg = [sys.executable, "-m", "fgplugin_cli.app"]
    alias = f"fgcli-{uuid.uuid4().hex[:6]}"
    stores = {"opensearch": f"opensearch:{opensearch_url}/{alias}", "embedded": f"embedded:{tmp_path / 'st'}"}
    hits = {}
    for kind, url in stores.items():
        r = subprocess.run([*fg, "index", "--catalog", str(catalog_path), "--model", str(export), "--store", url,
                            "--engine", "lucene", "--errors", str(tmp_path / f"{kind}.errors.jsonl"), "--json"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout)["indexed"] == N
        first = json.loads(catalog_path.read_text().splitlines()[0])["id"]
        r = subprocess.run([*fg, "query", "--store", url, "--like", first, "--attr", "sleeve_length",
                            "--attr", "neckline=0.5", "--filter", "price<80", "-k", "10", "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        hits[kind] = [(h["id"], h["score"]) for h in json.loads(r.stdout)["hits"]]
    assert [i for i, _ in hits["opensearch"]] == [i for i, _ in hits["embedded"]] and hits["embedded"]
    assert [s for _, s in hits["opensearch"]] == pytest.approx([s for _, s in hits["embedded"]], abs=1e-4)
    st = OpenSearchStore.from_url(opensearch_url, index=alias)
    for name in list(st.client.indices.get(index=f"{alias}-*")):
        st.client.indices.delete(index=name)
    st.close()
