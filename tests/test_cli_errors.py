"""One-line errors, exit 2, no traceback, no long waits: malformed OpenSearch URLs (`query`, `index`,
`opensearch setup`), unreachable clusters (refused, or accepting and never answering), the timeout and
retry profiles (interactive commands vs the indexer), and `query --html` to a path that cannot be written."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from fgplugin.opensearch.client import INTERACTIVE, load_config
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.errors import StoreError
from fgplugin_cli.app import app

from test_query import store_dir  # noqa: F401 (module fixture: a small embedded store)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_config(no_fgplugin_env):  # noqa: ARG001 - every test here starts from no settings
    pass


@pytest.fixture()
def silent_server():
    """127.0.0.1:PORT accepts connections and never answers (a hung node, a blackholing proxy)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    for c in conns:
        c.close()
    srv.close()


def invoke(*args: str, env: dict[str, str] | None = None):
    r = CliRunner().invoke(app, list(args), env=env)
    return r, r.stdout + r.stderr


def assert_one_line_error(r, out: str, message: str) -> None:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert r.exit_code == 2, out
    assert "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    assert message in lines[0], out


# -- malformed URLs -------------------------------------------------------------------------------
MALFORMED = [
    ("opensearch:http://host:notaport", "port must be a number from 1 to 65535"),
    ("opensearch:http://host:0", "port must be a number from 1 to 65535"),
    ("opensearch:http://[::1", "unclosed '['"),
    ("opensearch:http://[fgnotip]:9200", "is not an IPv6 address"),
    ("opensearch:", "names no cluster URL"),
    ("opensearch:   ", "names no cluster URL"),
    ("opensearch:ftp://x", "must start with http:// or https://"),
    ("opensearch:http://my host:9200", "characters a host name cannot have"),
    ("opensearch:http://:9200", "names no host"),
    ("opensearch:http://host:9200/?timeout=1", "query string"),
]


@pytest.mark.parametrize("url,message", MALFORMED)
def test_query_refuses_a_malformed_url_in_one_line(url, message):
    t0 = time.perf_counter()
    r, out = invoke("query", "--store", url, "--like", "a", "--attr", "colour")
    assert_one_line_error(r, out, message)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("url,message", MALFORMED)
def test_index_refuses_a_malformed_url_in_one_line(url, message, export_and_catalog):
    export, catalog = export_and_catalog
    r, out = invoke("index", "--catalog", str(catalog), "--model", str(export), "--store", url, "--device", "cpu",
                    "--workers", "1")
    assert_one_line_error(r, out, message)


@pytest.mark.parametrize("url,message", MALFORMED)
def test_setup_refuses_a_malformed_url_in_one_line(url, message, export_and_catalog):
    export, _ = export_and_catalog
    r, out = invoke("opensearch", "setup", "--model", str(export), "--serve-url", "http://fgplugin-serve:8080",
                    "--apply", "--store", url)
    assert_one_line_error(r, out, message)


@pytest.mark.parametrize("serve_url,message", [("http://h:notaport", "port must be a number"),
                                               ("http://[::1", "unclosed '['"),
                                               ("fgplugin-serve:8080", "must be an http(s) URL")])
def test_setup_refuses_a_malformed_serve_url_before_reading_the_model(serve_url, message, tmp_path):
    r, out = invoke("opensearch", "setup", "--model", str(tmp_path / "no-model"), "--serve-url", serve_url)
    assert_one_line_error(r, out, message)


# -- unreachable clusters -------------------------------------------------------------------------
def test_query_against_a_refused_port_fails_within_seconds():
    port = closed_port()
    t0 = time.perf_counter()
    r, out = invoke("query", "--store", f"opensearch:http://127.0.0.1:{port}", "--like", "a", "--attr", "colour")
    took = time.perf_counter() - t0
    assert r.exit_code == 2 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error:") and f"127.0.0.1:{port}" in last and "cannot connect (Connection refused)" in last
    assert took < 6, f"took {took:.1f} s"


def test_query_against_a_silent_server_fails_within_seconds(silent_server):
    t0 = time.perf_counter()
    r, out = invoke("query", "--store", f"opensearch:http://127.0.0.1:{silent_server}", "--like", "a",
                    "--attr", "colour")
    took = time.perf_counter() - t0
    assert r.exit_code == 2 and "Traceback" not in out, out
    assert "no answer within 3 s" in out and "FGPLUGIN_OPENSEARCH_CONNECT_TIMEOUT" in out, out
    assert took < 8, f"took {took:.1f} s"


def test_setup_apply_against_a_refused_port_fails_within_seconds(export_and_catalog):
    export, _ = export_and_catalog
    t0 = time.perf_counter()
    r, out = invoke("opensearch", "setup", "--model", str(export), "--serve-url", "http://fgplugin-serve:8080",
                    "--apply", "--store", f"opensearch:http://127.0.0.1:{closed_port()}")
    assert r.exit_code == 2 and "cannot connect" in out and "Traceback" not in out, out
    assert time.perf_counter() - t0 < 6


def test_profiles_and_their_settings(monkeypatch):
    quick = load_config("http://h:1", env={}, interactive=True)
    patient = load_config("http://h:1", env={})
    assert (quick.connect_timeout, quick.retry_total_s, quick.retry_timeouts) == (
        INTERACTIVE["connect_timeout"], INTERACTIVE["retry_total_s"], False)
    assert patient.retry_total_s >= 30 and patient.retry_timeouts and patient.connect_timeout <= 10
    env = {"FGPLUGIN_OPENSEARCH_CONNECT_TIMEOUT": "7", "FGPLUGIN_OPENSEARCH_RETRY_TOTAL_S": "9",
           "FGPLUGIN_OPENSEARCH_TIMEOUT": "11"}
    cfg = load_config("http://h:1", env=env, interactive=True)  # explicit settings beat the profile
    assert (cfg.connect_timeout, cfg.retry_total_s, cfg.timeout) == (7.0, 9.0, 11.0)
    for bad in ("soon", "-1", "0", "nan"):
        with pytest.raises(StoreError, match="connect_timeout must be a positive number"):
            load_config("http://h:1", env={"FGPLUGIN_OPENSEARCH_CONNECT_TIMEOUT": bad})


def test_the_indexer_profile_retries_and_says_what_it_waits_for(silent_server, caplog):
    caplog.set_level(logging.WARNING)
    s = OpenSearchStore(load_config(f"http://127.0.0.1:{silent_server}", env={}, connect_timeout=0.3,
                                    retry_total_s=0.4, retry_initial_s=0.1))
    with pytest.raises(StoreError) as exc:
        s.count()
    assert "after 3 attempts" in str(exc.value) and "no answer within 0.3 s" in str(exc.value)
    waits = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(waits) == 2
    assert "reading alias 'fgplugin' failed" in waits[0] and f"127.0.0.1:{silent_server}" in waits[0]
    assert "of at most 0.4 s" in waits[0] and "FGPLUGIN_OPENSEARCH_RETRY_TOTAL_S" in waits[0]
    quick = OpenSearchStore(load_config(f"http://127.0.0.1:{silent_server}", env={}, interactive=True,
                                        connect_timeout=0.3))
    t0 = time.perf_counter()
    with pytest.raises(StoreError) as exc:
        quick.count()
    assert "attempts" not in str(exc.value)  # a timeout is not retried when someone is waiting
    assert time.perf_counter() - t0 < 2


# -- query --html ---------------------------------------------------------------------------------
def html_query(store_dir, html, *extra):  # noqa: F811
    return invoke("query", "--store", f"embedded:{store_dir / 'store'}", "--like", "sku004", "--attr", "colour",
                  "-k", "3", "--html", str(html), *extra)


def test_html_to_a_directory_fails_before_the_query(store_dir, tmp_path):  # noqa: F811
    r, out = html_query(store_dir, tmp_path)
    assert_one_line_error(r, out, f"--html {tmp_path}: is a directory")
    assert "sku" not in out  # failed before any work


def test_html_under_a_file_fails_before_the_query(store_dir, tmp_path):  # noqa: F811
    (tmp_path / "file.txt").write_text("x")
    target = tmp_path / "file.txt" / "out.html"
    r, out = html_query(store_dir, target)
    assert_one_line_error(r, out, f"--html {target}: {tmp_path / 'file.txt'} is not a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_html_to_a_read_only_folder_fails_before_the_query(store_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        r, out = html_query(store_dir, folder / "out.html")
        assert_one_line_error(r, out, f"--html {folder / 'out.html'}: cannot write it (Permission denied)")
    finally:
        folder.chmod(0o700)


def test_html_that_fails_while_writing_keeps_the_results(store_dir, tmp_path, monkeypatch):  # noqa: F811
    import fgplugin.query.html

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fgplugin.query.html, "write_report", full)
    target = tmp_path / "out.html"
    r, out = html_query(store_dir, target, "--json")
    assert r.exit_code == 2 and "Traceback" not in out, out
    assert '"hits"' in r.stdout  # the results still printed
    assert f"--html {target}: cannot write it (No space left on device)" in " ".join(r.stderr.split())
    assert not target.exists()


def test_html_check_leaves_no_file_behind_and_creates_folders(store_dir, tmp_path):  # noqa: F811
    target = tmp_path / "out.html"
    r, out = invoke("query", "--store", f"embedded:{store_dir / 'store'}", "--like", "no-such-id", "--attr", "colour",
                    "--html", str(target))
    assert r.exit_code == 2 and not target.exists(), out  # the check's probe file is gone
    target = tmp_path / "new" / "deeper" / "out.html"
    r, out = html_query(store_dir, target)
    assert r.exit_code == 0, out
    assert target.is_file()
