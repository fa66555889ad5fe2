"""`fgplugin index --shard i/n`: n workers, each handling the catalog items whose id hashes into its shard,
together index exactly the catalog (same ids and vectors as one unsharded run), each resumable with its own
errors file, removing only its own documents; --prune is refused with --shard, a shard run does not switch
an OpenSearch alias unless told to, and bad --shard values are refused before any work. Checked on the
embedded store and on the OpenSearch store (the fake node, and the real node the test session starts)."""

from __future__ import annotations

import copy
import json
import os
import threading
import uuid

import numpy as np
import pytest

from fgplugin.catalog import load_catalog
from fgplugin.errors import SettingError
from fgplugin.indexer import Shard, index_catalog, shard_catalog, shard_of
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.search.embedded import DuckDBStore
from opensearch_spec import api_spec  # noqa: F401 (session fixture)
from test_index_safety import fake, make_store, rows_of, write_rows  # noqa: F401 (fixtures: both kinds of store)
from test_indexer import ATOL, N, env, report_of, run_cli  # noqa: F401 (the tiny export and an N-item catalog)

SHARDS = 3


def shards(n: int = SHARDS) -> list[Shard]:
    return [Shard(i, n) for i in range(n)]


def all_vectors(st, ids) -> dict[str, dict[str, np.ndarray]]:
    return st.get_vectors(sorted(ids))


# -- the hash ----------------------------------------------------------------------------------------
def test_every_id_is_in_exactly_one_shard_and_the_assignment_is_pinned():
    ids = [f"sku-{i}" for i in range(2000)] + ["", "ünïcode", "a/b", "x" * 600]
    for n in (1, 2, 3, 7):
        owners = [[s.index for s in shards(n) if s.owns(i)] for i in ids]
        assert all(len(o) == 1 for o in owners)
        counts = np.bincount([o[0] for o in owners], minlength=n)
        assert counts.min() > 0.8 * len(ids) / n  # spread evenly enough to share the work
    # Every worker, on every machine and Python, must put an id in the same shard (Python's own str hash
    # is salted per process): the assignment is pinned here.
    assert [shard_of(f"sku-{i}", 7) for i in range(20)] == [2, 5, 5, 2, 2, 4, 1, 6, 0, 2, 2, 3, 5, 4, 6, 3, 6, 0, 5, 4]
    assert shard_of("ünïcode", 5) == 3


@pytest.mark.parametrize("text, cause", [("4/4", "must be in 0..3"), ("x", "expected I/N"), ("1/0", "at least 1"),
                                         ("-1/4", "expected I/N"), ("1/2/3", "expected I/N")])
def test_bad_shard_values_are_refused_before_any_work(env, tmp_path, text, cause):
    _, export, catalog_path = env
    with pytest.raises(SettingError, match=cause):
        Shard.parse(text)
    store_dir = tmp_path / "store"
    r = run_cli("--catalog", catalog_path, "--model", export, "--store", f"embedded:{store_dir}", "--shard", text)
    assert r.exit_code == 2, r.output
    assert "--shard" in r.output and cause in " ".join(r.output.split())
    assert not store_dir.exists()  # nothing was opened, let alone written


def test_prune_with_a_shard_is_refused_naming_the_cause(env, tmp_path):
    enc, export, catalog_path = env
    store_dir = tmp_path / "store"
    r = run_cli("--catalog", catalog_path, "--model", export, "--store", f"embedded:{store_dir}",
                "--shard", "0/3", "--prune")
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    assert "--prune is refused with --shard 0/3" in msg and "whole catalog" in msg
    assert "unsharded `fgplugin index --prune` afterwards" in msg
    assert not store_dir.exists()
    with DuckDBStore(store_dir) as st, pytest.raises(SettingError, match="prune .* whole catalog"):
        index_catalog(catalog_path, enc, st, shard=Shard(1, 3), prune=True)
    with DuckDBStore(store_dir, read_only=True) as st:
        assert st.count() == 0


# -- together exactly the catalog ----------------------------------------------------------------------
def test_shard_runs_together_index_exactly_the_catalog_and_rerun_skips(env, make_store, tmp_path):  # noqa: F811
    enc, _, catalog_path = env
    cat = load_catalog(catalog_path, enc.schema)
    whole, parts = make_store(), make_store()
    assert index_catalog(cat, enc, whole, batch_size=8).indexed == N

    reports = [index_catalog(catalog_path, enc, parts, batch_size=5, shard=s,
                             errors_path=s.errors_path(tmp_path / "errors.jsonl")) for s in shards()]
    for s, rep in zip(shards(), reports):
        mine = [i for i in cat.ids if s.owns(i)]
        assert rep.shard == str(s) and rep.ok and not rep.failures
        assert (rep.catalog_items, rep.indexed, rep.skipped_current) == (len(mine), len(mine), 0)
        # The documents other shards wrote before it are neither its orphans nor anything it removes.
        assert (rep.orphans, rep.pruned, rep.stale_removed, rep.invalid_removed) == (0, 0, 0, 0)
        assert rep.to_dict()["shard"] == str(s)
    assert sum(r.indexed for r in reports) == N and min(r.indexed for r in reports) > 0
    assert sorted(parts.versions()) == sorted(cat.ids) == sorted(whole.versions())
    want, got = all_vectors(whole, cat.ids), all_vectors(parts, cat.ids)
    for i in cat.ids:
        for a in enc.attributes:
            np.testing.assert_allclose(got[i][a], want[i][a], atol=ATOL)
    assert not list(tmp_path.glob("errors*.jsonl"))  # nothing failed, so no errors file stands

    # A shard run again (a worker restarted) finds its part current and touches nothing else.
    again = index_catalog(catalog_path, enc, parts, shard=Shard(1, SHARDS))
    assert (again.indexed, again.metadata_updated, again.to_index) == (0, 0, 0)
    assert again.skipped_current == reports[1].catalog_items and again.ok
    # An item gone from the catalog is an orphan of its own shard only, and no shard prunes it ...
    gone = cat.ids[0]
    rows = [{**r, "image": str(catalog_path.parent / r["image"])} for r in rows_of(catalog_path) if r["id"] != gone]
    fewer = write_rows(tmp_path / "fewer.jsonl", rows)
    for s in shards():
        rep = index_catalog(fewer, enc, parts, shard=s)
        assert (rep.orphans, rep.pruned, rep.indexed) == (int(s.owns(gone)), 0, 0)
    # ... the unsharded prune afterwards does, and finds everything else current.
    final = index_catalog(fewer, enc, parts, prune=True)
    assert (final.skipped_current, final.indexed, final.orphans, final.pruned) == (N - 1, 0, 1, 1)
    assert sorted(parts.versions()) == sorted(set(cat.ids) - {gone})


@pytest.mark.parametrize("node", ["opensearch-fake", "opensearch-live"])
def test_concurrent_shard_workers_on_one_new_opensearch_index(env, request, node):
    """Workers start together on an index nobody has created yet: all of them finish, none is lost."""
    enc, _, catalog_path = env
    url = request.getfixturevalue("fake").url if node == "opensearch-fake" else request.getfixturevalue("opensearch_url")
    alias = f"fgshard-{uuid.uuid4().hex[:8]}"
    reports: dict[int, object] = {}
    crashed: list[BaseException] = []

    def worker(s: Shard) -> None:
        st = OpenSearchStore.from_url(url, index=alias, refresh="wait_for",
                                      engine=os.environ.get("FGPLUGIN_OPENSEARCH_ENGINE", "lucene"))
        try:
            reports[s.index] = index_catalog(catalog_path, enc, st, batch_size=4, shard=s)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            crashed.append(e)
        finally:
            st.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in shards()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    with OpenSearchStore.from_url(url, index=alias) as st:
        try:
            assert not crashed, crashed
            assert sum(r.indexed for r in reports.values()) == N and all(r.ok for r in reports.values())
            assert sorted(st.versions()) == sorted(load_catalog(catalog_path, enc.schema).ids)
        finally:
            if node == "opensearch-live":  # the fake node goes with the module
                for name in list(st.client.indices.get(index=f"{alias}-*")):
                    st.client.indices.delete(index=name)


# -- failures, removals, errors files --------------------------------------------------------------------
def test_failures_land_in_their_shards_errors_file_only(env, tmp_path):
    _, export, catalog_path = env
    rows = rows_of(catalog_path)
    for r in rows:
        r["image"] = str(catalog_path.parent / r["image"])
    broken = {rows[k]["id"] for k in (1, 5, 9, 13, 17)}
    for r in rows:
        if r["id"] in broken:
            r["image"] = str(tmp_path / f"missing-{r['id']}.jpg")
    rows[20]["in_stock"] = "maybe"  # an invalid row: a catalog problem, reported by its id's shard
    invalid = rows[20]["id"]
    catalog = write_rows(tmp_path / "catalog.jsonl", rows)
    (tmp_path / "schema.toml").write_text((catalog_path.parent / "schema.toml").read_text())
    store_dir = tmp_path / "store"
    for s in shards():
        r = run_cli("--catalog", catalog, "--model", export, "--store", f"embedded:{store_dir}",
                    "--shard", str(s), "--batch-size", 4, "--json")
        rep = report_of(r)
        mine_broken = {i for i in broken if s.owns(i)}
        mine_invalid = {invalid} if s.owns(invalid) else set()
        assert r.exit_code == (1 if mine_broken or mine_invalid else 0), r.output
        assert rep["shard"] == str(s) and rep["failed"] == len(mine_broken) + len(mine_invalid)
        errors = store_dir / f"errors.shard-{s.index}-of-{SHARDS}.jsonl"
        if mine_broken or mine_invalid:
            assert rep["errors_path"] == str(errors)
            entries = [json.loads(line) for line in errors.read_text().splitlines()]
            assert {e["id"] for e in entries} == mine_broken | mine_invalid
        else:
            assert not errors.exists()
    assert not (store_dir / "errors.jsonl").exists()
    assert sum(1 for _ in store_dir.glob("errors.shard-*-of-3.jsonl")) == len(
        {shard_of(i, SHARDS) for i in broken | {invalid}})
    with DuckDBStore(store_dir, read_only=True) as st:
        assert set(st.versions()) == {r["id"] for r in rows} - broken - {invalid}

    # A shard rerun skips its known failures (its own file), the others' are not its business.
    s = Shard(shard_of(next(iter(broken)), SHARDS), SHARDS)
    rep = report_of(run_cli("--catalog", catalog, "--model", export, "--store", f"embedded:{store_dir}",
                            "--shard", str(s), "--json"))
    assert (rep["indexed"], rep["skipped_previously_failed"]) == (0, len({i for i in broken if s.owns(i)}))


def test_a_shard_removes_only_its_own_invalid_documents_within_its_own_max_removal(env, make_store, tmp_path):  # noqa: F811
    enc, _, catalog_path = env
    st = make_store()
    index_catalog(catalog_path, enc, st)
    rows = rows_of(catalog_path)
    for r in rows:
        r["image"] = str(catalog_path.parent / r["image"])
    by_shard = {k: [r for r in rows if shard_of(r["id"], SHARDS) == k] for k in range(SHARDS)}
    ours, theirs = by_shard[0][0], by_shard[1][0]
    ours["in_stock"] = theirs["in_stock"] = "maybe"
    catalog = write_rows(tmp_path / "catalog.jsonl", rows)
    (tmp_path / "schema.toml").write_text((catalog_path.parent / "schema.toml").read_text())
    stored_in_0 = len(by_shard[0])

    # One removal out of shard 0's documents, not out of all N: a limit just under 1/stored_in_0 refuses.
    rep = index_catalog(catalog, enc, st, shard=Shard(0, SHARDS), max_removal=0.99 / stored_in_0)
    assert rep.invalid_removed == 0 and rep.removal_refused.startswith(f"1 of the {stored_in_0} stored documents")
    rep = index_catalog(catalog, enc, st, shard=Shard(0, SHARDS), max_removal=1.01 / stored_in_0)
    assert (rep.invalid_removed, rep.removal_refused) == (1, None)
    assert [p.item_id for p in rep.catalog_problems] == [ours["id"]]
    assert ours["id"] not in set(st.versions()) and theirs["id"] in set(st.versions())


def test_shard_catalog_gives_rows_without_an_id_to_shard_zero(env, tmp_path):
    enc, _, catalog_path = env
    rows: list = rows_of(catalog_path)
    rows[2] = json.dumps({k: v for k, v in rows[2].items() if k != "id"})
    cat = load_catalog(write_rows(tmp_path / "no-id.jsonl", rows), enc.schema, strict=False)
    parts = [shard_catalog(cat, s) for s in shards()]
    assert sorted(i for p in parts for i in p.ids) == sorted(cat.ids)
    assert [len(p.problems) for p in parts] == [1, 0, 0]


# -- OpenSearch: a new model version's index ---------------------------------------------------------------
def test_a_shard_run_does_not_promote_unless_told(env, fake):  # noqa: F811
    enc, _, catalog_path = env
    with OpenSearchStore.from_url(fake.url, index="promo", refresh="wait_for") as st:
        index_catalog(catalog_path, enc, st)
    served = set(fake.aliases["promo"])
    v2 = copy.copy(enc)
    v2.version = "1" * 64
    for s in shards():
        with OpenSearchStore.from_url(fake.url, index="promo", refresh="wait_for") as st:
            rep = index_catalog(catalog_path, v2, st, shard=s)
        assert rep.ok and rep.promoted is None and rep.indexed > 0
        assert f"a shard run ({s}) does not switch the alias" in rep.not_promoted and "--promote" in rep.not_promoted
        assert set(fake.aliases["promo"]) == served  # queries still read the complete old index
    with OpenSearchStore.from_url(fake.url, index="promo", refresh="wait_for") as st:
        rep = index_catalog(catalog_path, v2, st, shard=Shard(2, SHARDS), promote=True)
        assert (rep.indexed, rep.promoted) == (0, "promo-111111111111")
        assert fake.aliases["promo"] == {"promo-111111111111"} and len(st.versions()) == N
