"""The index worker and `fgplugin index`: round trip, resume after SIGKILL, every failure in the errors
file, --retry-errors, --prune, new model versions, and schema mismatches refused."""

from __future__ import annotations

import copy
import datetime as dt
import http.server
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from fgplugin import synth
from fgplugin.catalog import load_catalog
from fgplugin.errors import ModelCardError
from fgplugin.export import ExportedEncoder
from fgplugin.images import ImageLimits
from fgplugin.indexer import index_catalog, read_errors
from fgplugin_cli.index import report_table
from fgplugin.search.spec import QuerySpec, parse_filter
from fgplugin.schema import AttributeSchema
from fgplugin.search.embedded import DuckDBStore
from fgplugin_cli.app import app

from opensearch_spec import api_spec  # noqa: F401 (session fixture)
from test_encoder import tiny_export

N = 24
ATOL = 1e-5  # stored vectors vs encoding the same images directly (float32 storage, same model)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    export = tiny_export(tmp_path_factory.getbasetemp(), synth.synth_schema())
    data = tmp_path_factory.mktemp("data")
    catalog_path = synth.generate(data, N, seed=3, size=64, workers=1)
    return ExportedEncoder.load(export, device="cpu"), export, catalog_path


def run_cli(*args: str):
    return CliRunner().invoke(app, ["index", *map(str, args)])


def report_of(result) -> dict:
    assert result.stdout.lstrip().startswith("{"), result.output
    return json.loads(result.stdout)


def as_utc(v):
    return dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")).replace(tzinfo=None)


def test_cli_round_trips_vectors_and_metadata_and_reruns_skip(env, tmp_path):
    enc, export, catalog_path = env
    store_dir = tmp_path / "store"
    r = run_cli("--catalog", catalog_path, "--model", export, "--store", f"embedded:{store_dir}",
                "--batch-size", 8, "--workers", 2, "--json")
    assert r.exit_code == 0, r.output
    rep = report_of(r)
    assert (rep["indexed"], rep["skipped_current"], rep["failed"], rep["ok"]) == (N, 0, 0, True)

    cat = load_catalog(catalog_path, enc.schema)
    direct = enc.encode_images([Image.open(cat.image_source(it)) for it in cat])
    with DuckDBStore(store_dir, read_only=True) as st:
        assert st.count() == N and set(st.versions().values()) == {enc.version}
        docs = st.get_documents(cat.ids)
        assert st.get_meta("model_path") == str(Path(export).resolve())
    assert sorted(docs) == sorted(cat.ids)
    for i, it in enumerate(cat):
        d = docs[it.id]
        for a in enc.attributes:
            np.testing.assert_allclose(d.vectors[a], direct[a][i], atol=ATOL)
        assert d.image == cat.image_source(it) and d.model_version == enc.version
        assert set(d.metadata) == set(it.metadata)
        for k, v in it.metadata.items():
            if cat.metadata_types[k] == "date":
                assert as_utc(d.metadata[k]) == as_utc(v)
            else:
                assert d.metadata[k] == pytest.approx(v) if isinstance(v, float) else d.metadata[k] == v

    again = report_of(run_cli("--catalog", catalog_path, "--model", export, "--store", f"embedded:{store_dir}", "--json"))
    assert (again["indexed"], again["skipped_current"], again["to_index"]) == (0, N, 0)
    assert not (store_dir / "errors.jsonl").exists()


KILLER = """
import os, signal, sys
from fgplugin.search.embedded import DuckDBStore
after = int(sys.argv[1])
real = DuckDBStore.upsert
calls = []
def upsert(self, docs):
    result = real(self, docs)
    calls.append(len(docs))
    if len(calls) == after:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as if the machine died
    return result
DuckDBStore.upsert = upsert
from fgplugin_cli.app import app
app(sys.argv[2:], prog_name="fgplugin")
"""


def test_killed_run_resumes_without_duplicates_or_gaps(env, tmp_path):
    enc, export, catalog_path = env
    store = f"embedded:{tmp_path / 'store'}"
    args = ["index", "--catalog", str(catalog_path), "--model", str(export), "--store", store,
            "--batch-size", "4", "--workers", "2", "--json"]
    proc = subprocess.run([sys.executable, "-c", KILLER, "3", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    with DuckDBStore(tmp_path / "store", read_only=True) as st:
        assert st.count() == 12  # three batches of four were written before the kill

    r = run_cli(*args[1:])
    assert r.exit_code == 0, r.output
    rep = report_of(r)
    assert (rep["skipped_current"], rep["indexed"]) == (12, N - 12)
    with DuckDBStore(tmp_path / "store", read_only=True) as st:
        ids = [i for (i,) in st.con.execute("SELECT id FROM docs").fetchall()]
    assert sorted(ids) == sorted(load_catalog(catalog_path, enc.schema).ids)  # no duplicates, no gaps


class _Slow(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/slow"):
            time.sleep(2.0)
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up, as it should

    def log_message(self, *args):
        pass


def test_failures_go_to_the_errors_file_and_retry_errors_clears_fixed_ones(env, tmp_path):
    enc, export, catalog_path = env
    src_dir = catalog_path.parent
    rows = [json.loads(line) for line in catalog_path.read_text().splitlines()][:10]
    for r in rows:
        r["image"] = str(src_dir / r["image"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(bad / "big.png")
    Image.new("RGB", (400, 300), (200, 30, 40)).save(bad / "wide.png")
    handler = type("H", (_Slow,), {"body": Path(rows[0]["image"]).read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    template = {k: v for k, v in rows[0].items() if k not in ("id", "image")}
    extra = {"corrupt": str(bad / "corrupt.jpg"), "missing": str(bad / "nope.jpg"), "big": str(bad / "big.png"),
             "wide": str(bad / "wide.png"), "slow": f"{url}/slow.jpg", "web": f"{url}/ok.jpg",
             "ftp": "ftp://example.com/x.jpg"}
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"id": k, "image": v, **template} for k, v in extra.items()]))
    shutil.copy(src_dir / "schema.toml", tmp_path / "schema.toml")
    store_dir = tmp_path / "store"
    errors = store_dir / "errors.jsonl"
    limits = ImageLimits(max_bytes=50_000, max_pixels=100_000, timeout_s=0.3, retries=0)

    try:
        st = DuckDBStore(store_dir)
        rep = index_catalog(catalog, enc, st, batch_size=4, workers=3, errors_path=errors, limits=limits)
        assert rep.indexed == 11 and not rep.ok  # the 10 good rows and the image served over HTTP
        assert {f.id: (f.stage, f.kind) for f in rep.failures} == {
            "corrupt": ("decode", "corrupt"), "missing": ("read", "missing"), "big": ("read", "too_large"),
            "wide": ("decode", "too_large"), "slow": ("read", "timeout"),
        }
        lines = [json.loads(line) for line in errors.read_text().splitlines()]
        assert {(e["id"], e["stage"], e["kind"]) for e in lines} == {
            ("corrupt", "decode", "corrupt"), ("missing", "read", "missing"), ("big", "read", "too_large"),
            ("wide", "decode", "too_large"), ("slow", "read", "timeout"), ("ftp", "catalog", "bad_url"),
        }
        assert all(e["reason"] and e["time"] for e in lines)
        assert sorted(st.versions()) == sorted([r["id"] for r in rows] + ["web"])

        # A plain rerun does not retry known failures (the slow URL would cost its timeout again).
        rep = index_catalog(catalog, enc, st, errors_path=errors, limits=limits)
        assert (rep.indexed, rep.skipped_failed, rep.to_index, len(rep.failures)) == (0, 5, 0, 0)
        assert not rep.ok

        shutil.copy(rows[1]["image"], bad / "corrupt.jpg")  # fix one file
        rep = index_catalog(catalog, enc, st, errors_path=errors, retry_errors=True, limits=limits)
        assert rep.indexed == 1 and rep.to_index == 5
        assert set(read_errors(errors)) == {"missing", "big", "wide", "slow"}
        assert "corrupt" in st.versions()
        st.close()

        # The CLI (default size limits: big and wide now pass) exits 1 while anything is still failing.
        r = run_cli("--catalog", catalog, "--model", export, "--store", f"embedded:{store_dir}",
                    "--retry-errors", "--timeout", "0.3", "--json")
        assert r.exit_code == 1, r.output
        rep = report_of(r)
        assert rep["indexed"] == 2 and rep["failed_by_cause"] == {"catalog/bad_url": 1, "read/timeout": 1, "read/missing": 1}
        assert set(read_errors(errors)) == {"missing", "slow"}
        assert rep["errors_path"] == str(errors)
    finally:
        server.shutdown()


def test_prune_removes_rows_deleted_from_the_catalog(env, tmp_path):
    enc, _, catalog_path = env
    st = DuckDBStore(tmp_path / "store")
    rep = index_catalog(catalog_path, enc, st, batch_size=16)
    assert rep.indexed == N and st.count() == N
    lines = catalog_path.read_text().splitlines()
    fewer = catalog_path.parent / "fewer.jsonl"  # beside the images, so relative paths still resolve
    fewer.write_text("\n".join(lines[5:]) + "\n")
    removed = {json.loads(line)["id"] for line in lines[:5]}

    rep = index_catalog(fewer, enc, st)
    assert (rep.orphans, rep.pruned, st.count()) == (5, 0, N)  # reported, kept without --prune
    # 5 of 24 is more than one run may remove by default: refused, with the count and the way to confirm.
    rep = index_catalog(fewer, enc, st, prune=True)
    assert (rep.pruned, rep.ok, st.count()) == (0, False, N)
    assert rep.removal_refused.startswith("5 of the 24 stored documents would be removed (5 not in the catalog)")
    assert "--max-removal 21" in rep.removal_refused
    rep = index_catalog(fewer, enc, st, prune=True, max_removal=0.21)
    assert (rep.pruned, rep.indexed, rep.skipped_current, rep.ok) == (5, 0, N - 5, True)
    assert st.count() == N - 5 and not removed & set(st.versions())
    st.close()


def test_a_new_model_version_reindexes_and_drops_stale_vectors_it_cannot_replace(env, tmp_path):
    enc, _, catalog_path = env
    st = DuckDBStore(tmp_path / "store")
    index_catalog(catalog_path, enc, st, batch_size=16)
    lines = [json.loads(line) for line in catalog_path.read_text().splitlines()]
    lines[0]["image"] = "images/gone.jpg"
    changed = catalog_path.parent / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in lines))
    v2 = copy.copy(enc)
    v2.version = "0" * 64  # what a retrained export would bring
    rep = index_catalog(changed, v2, st, batch_size=16)
    assert (rep.indexed, rep.skipped_current, rep.stale_removed) == (N - 1, 0, 1)
    assert [(f.id, f.kind) for f in rep.failures] == [(lines[0]["id"], "missing")]
    versions = st.versions()
    assert len(versions) == N - 1 and set(versions.values()) == {v2.version}  # no old-model vector left
    st.close()


def test_schema_mismatch_is_refused(env, tmp_path):
    enc, export, catalog_path = env
    other = AttributeSchema.from_dict({"name": "other", "attributes": {"colour": ["red", "blue"]}})
    other.save(tmp_path / "schema.toml")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"id": "a", "image": str(catalog_path.parent / "images" / "x.jpg"), "colour": "red"}) + "\n")
    r = run_cli("--catalog", catalog, "--model", export, "--store", f"embedded:{tmp_path / 'store'}")
    assert r.exit_code == 2
    msg = " ".join(r.output.split())
    assert "schema" in msg and "fgplugin-synth" in msg and "other" in msg
    with DuckDBStore(tmp_path / "store2") as st, pytest.raises(ModelCardError, match="was built for schema .*but the catalog .* uses schema .other."):
        index_catalog(load_catalog(catalog, other), enc, st)
    assert not (tmp_path / "store" / "fgplugin.duckdb").exists()  # refused before the store was opened


def test_opensearch_store_errors_file_named_after_the_index_rejections_and_promotion(env, tmp_path, monkeypatch):
    from fake_opensearch import FakeOpenSearch

    from fgplugin.opensearch.store import OpenSearchStore

    enc, export, catalog_path = env
    rows = [json.loads(line) for line in catalog_path.read_text().splitlines()]
    for r in rows:
        r["image"] = str(catalog_path.parent / r["image"])
    gone = tmp_path / "gone.jpg"
    rows.append({**rows[0], "id": "gone", "image": str(gone)})
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(catalog_path.parent / "schema.toml", tmp_path / "schema.toml")
    rejected = rows[3]["id"]
    monkeypatch.chdir(tmp_path)  # the errors file of an OpenSearch store goes to the working folder
    args = ["--catalog", catalog, "--model", export, "--index", "shop", "--batch-size", 8, "--json"]
    with FakeOpenSearch() as fake:
        fake.reject[rejected] = "failed to parse field [emb_colour]"
        r = run_cli(*args, "--store", f"opensearch:{fake.url}")
        assert r.exit_code == 1, r.output
        rep = report_of(r)
        assert rep["indexed"] == N - 1
        assert rep["failed_by_cause"] == {"read/missing": 1, "store/rejected": 1}
        errors = tmp_path / "shop.errors.jsonl"
        assert rep["errors_path"] == str(errors)
        entries = {e["id"]: e for e in map(json.loads, errors.read_text().splitlines())}
        assert set(entries) == {"gone", rejected} and "emb_colour" in entries[rejected]["reason"]
        assert (entries[rejected]["stage"], entries["gone"]["stage"]) == ("store", "read")

        del fake.reject[rejected]  # the cluster takes it now; the file appears too
        shutil.copy(rows[1]["image"], gone)
        r = run_cli(*args, "--store", f"opensearch:{fake.url}", "--retry-errors")
        assert r.exit_code == 0, r.output
        assert report_of(r)["indexed"] == 2 and not errors.exists()

        # A retrained model fills a new index beside the served one, then the alias moves to it.
        v2 = copy.copy(enc)
        v2.version = "0" * 64
        st = OpenSearchStore.from_url(fake.url, index="shop")
        old_index = next(iter(fake.aliases["shop"]))
        rep = index_catalog(catalog, v2, st, batch_size=16)
        assert (rep.indexed, rep.skipped_current) == (N + 1, 0)
        assert rep.promoted == "shop-000000000000" and fake.aliases["shop"] == {"shop-000000000000"}
        assert old_index != "shop-000000000000" and len(fake.indices[old_index]["docs"]) == N + 1
        assert set(st.versions().values()) == {v2.version} and len(st.versions()) == N + 1
        st.close()


# -- re-running after the catalog changed ----------------------------------------------------------------
def _edit_and_rerun(enc, catalog_path, tmp_path, open_store):
    """Index a copy of the catalog; change one item's price, point another at a different image file,
    rewrite a third's file in place (and touch a label and a date's spelling); re-run. Returns the store."""
    data = tmp_path / "data"
    shutil.copytree(catalog_path.parent, data)
    catalog = data / "catalog.jsonl"
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    st = open_store()
    rep = index_catalog(catalog, enc, st, batch_size=8, workers=2)
    assert (rep.indexed, rep.metadata_updated, rep.skipped_current) == (N, 0, 0)
    before = st.get_vectors([r["id"] for r in rows])

    priced, repointed, replaced, relabelled, redated = (r["id"] for r in rows[:5])
    rows[0]["price"] = 12345.5
    rows[1]["image"] = rows[7]["image"]  # another existing file
    shutil.copyfile(data / rows[8]["image"], data / rows[2]["image"])  # same path, new content
    rows[3]["colour"] = next(c for c in enc.schema["colour"].values if c != rows[3]["colour"])  # labels are not stored
    rows[4]["added"] += "T00:00:00Z"  # the same instant, spelled differently
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))

    encoded: list[str] = []
    rep = index_catalog(catalog, enc, st, batch_size=8, workers=2,
                        on_batch=lambda b: encoded.extend(b.ids))
    assert sorted(encoded) == sorted([repointed, replaced])  # the price change was not re-encoded
    assert (rep.indexed, rep.metadata_updated, rep.skipped_current, rep.to_index) == (2, 1, N - 3, 3)
    assert rep.ok and not rep.failures and rep.stale_removed == 0
    d = rep.to_dict()
    assert (d["indexed"], d["metadata_updated"], d["skipped_current"]) == (2, 1, N - 3)
    console = Console(file=io.StringIO(), width=120)
    console.print(report_table(rep))
    assert re.search(r"metadata updated\W+1\b", console.file.getvalue())

    after = st.get_vectors([r["id"] for r in rows])
    direct = enc.encode_images([Image.open(data / rows[7]["image"]), Image.open(data / rows[8]["image"])])
    for a in enc.attributes:
        np.testing.assert_allclose(after[repointed][a], direct[a][0], atol=ATOL)  # the new image's vectors
        np.testing.assert_allclose(after[replaced][a], direct[a][1], atol=ATOL)
        assert not np.allclose(after[replaced][a], before[replaced][a], atol=1e-3)
        for i in (priced, relabelled, redated, rows[9]["id"]):
            np.testing.assert_array_equal(after[i][a], before[i][a])  # kept as they were
    attr = enc.attributes[0]
    hits = st.search(QuerySpec({attr: 1.0}, like_id=rows[10]["id"], filters=[parse_filter("price>10000")], k=5)).hits
    assert [(h.id, h.metadata["price"]) for h in hits] == [(priced, 12345.5)]
    assert st.image_of(repointed) == str(data / rows[7]["image"])  # the document names its new image

    encoded.clear()
    rep = index_catalog(catalog, enc, st, on_batch=lambda b: encoded.extend(b.ids))
    assert (rep.indexed, rep.metadata_updated, rep.skipped_current, encoded) == (0, 0, N, [])
    return st


def test_rerun_after_catalog_edits_updates_metadata_and_reencodes_changed_images(env, tmp_path):
    enc, _, catalog_path = env
    st = _edit_and_rerun(enc, catalog_path, tmp_path, lambda: DuckDBStore(tmp_path / "store"))
    st.close()


def test_rerun_after_catalog_edits_on_opensearch(env, tmp_path, api_spec):
    from fake_opensearch import FakeOpenSearch

    from fgplugin.opensearch.store import OpenSearchStore

    enc, _, catalog_path = env
    with FakeOpenSearch(api_spec.errors) as fake:
        st = _edit_and_rerun(enc, catalog_path, tmp_path, lambda: OpenSearchStore.from_url(fake.url, index="shop"))
        st.close()
        assert fake.spec_errors == []
        assert all({"image_key", "meta_key"} <= set(src) for src in fake.indices[next(iter(fake.aliases["shop"]))]["docs"].values())


def test_a_store_from_before_fingerprints_is_reindexed(env, tmp_path):
    from test_duckdb_store import make_old_layout

    enc, _, catalog_path = env
    few = catalog_path.parent / "few.jsonl"  # beside the images, so relative paths still resolve
    few.write_text("".join(catalog_path.read_text().splitlines(keepends=True)[:6]))
    st = DuckDBStore(tmp_path / "store")
    index_catalog(few, enc, st)
    st.close()
    make_old_layout(tmp_path / "store")  # no image_key / meta_key columns, as an older fgplugin wrote it

    st = DuckDBStore(tmp_path / "store")
    assert {fp.image_key for fp in st.fingerprints().values()} == {None}
    rep = index_catalog(few, enc, st)
    assert (rep.indexed, rep.skipped_current, rep.metadata_updated, rep.ok) == (6, 0, 0, True)  # unknown: re-indexed
    rep = index_catalog(few, enc, st)
    assert (rep.indexed, rep.skipped_current) == (0, 6)
    st.close()


def test_a_changed_image_that_fails_drops_the_stale_document_until_the_file_is_fixed(env, tmp_path):
    enc, _, catalog_path = env
    rows = [json.loads(line) for line in catalog_path.read_text().splitlines()[:4]]
    for r in rows:
        r["image"] = str(catalog_path.parent / r["image"])
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(catalog_path.parent / "schema.toml", tmp_path / "schema.toml")
    errors = tmp_path / "errors.jsonl"
    st = DuckDBStore(tmp_path / "store")
    assert index_catalog(catalog, enc, st, errors_path=errors).indexed == 4

    later = tmp_path / "later.jpg"
    rows[0]["image"] = str(later)  # not there yet
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = index_catalog(catalog, enc, st, errors_path=errors)
    assert [(f.id, f.kind) for f in rep.failures] == [(rows[0]["id"], "missing")]
    assert rep.stale_removed == 0 and "1 whose update failed" in rep.removal_refused  # 1 of 4: over 10 %
    rep = index_catalog(catalog, enc, st, errors_path=errors, max_removal=0.25)
    assert (rep.skipped_failed, rep.removal_refused) == (1, None)  # failed before, and its document goes now
    assert rep.stale_removed == 1 and rows[0]["id"] not in st.versions()  # no vectors of the old image left
    assert set(read_errors(errors)) == {rows[0]["id"]}
    rep = index_catalog(catalog, enc, st, errors_path=errors)
    assert (rep.skipped_failed, rep.to_index) == (1, 0)  # same inputs: not retried

    shutil.copy(rows[1]["image"], later)  # the file appears: its key changes, so a plain rerun takes it
    rep = index_catalog(catalog, enc, st, errors_path=errors)
    assert (rep.indexed, rep.skipped_failed, rep.ok) == (1, 0, True) and not errors.exists()
    np.testing.assert_allclose(st.get_vectors([rows[0]["id"]])[rows[0]["id"]][enc.attributes[0]],
                               st.get_vectors([rows[1]["id"]])[rows[1]["id"]][enc.attributes[0]], atol=ATOL)
    st.close()
