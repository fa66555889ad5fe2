"""Shared fixtures. ../shared/ (beside the repo) holds real data; tests that need it skip without it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Two cores: keep torch from oversubscribing when pytest runs beside other work.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real data and the OpenSearch API spec live there)")
    return SHARED


# -- a real OpenSearch node -----------------------------------------------------------------------
# FGPLUGIN_OPENSEARCH_URL names a cluster to test against; without it the tests start their own node
# from Maven Central artifacts with docker/opensearch-node.sh (needs Java and Maven; the first start
# fetches and assembles it, later ones take seconds) and stop it at the end. FGPLUGIN_TEST_NODE=0
# turns that off. The node has the k-NN plugin without its native libraries, so tests index with the
# pure-Java Lucene engine (FGPLUGIN_OPENSEARCH_ENGINE=lucene).
NODE_SCRIPT = REPO / "docker" / "opensearch-node.sh"
LIVE_ENV = "FGPLUGIN_OPENSEARCH_URL"
NODE_HOME = Path(os.environ.get("OPENSEARCH_NODE_HOME", REPO / ".opensearch"))


def _free_ports(n: int) -> int:
    """The first of n consecutive free loopback ports (node k listens on first+k-1), so that test sessions
    running side by side, and a developer's own node on 9200, never meet."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            socks = []
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free loopback ports for the OpenSearch test node")


class LocalCluster:
    """One test cluster started by this session (a single node, or two nodes on loopback), with its
    own instance name, ports and data, removed again when it stops."""

    def __init__(self, kind: str, nodes: int):
        self.instance = f"pytest-{kind}-{os.getpid()}"
        self.nodes, self.url, self.error = nodes, None, None

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(NODE_SCRIPT), "--instance", self.instance, *args],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *extra: str) -> str:
        http, transport = _free_ports(self.nodes), _free_ports(self.nodes)
        self.last_start_args = ["start", "--nodes", str(self.nodes), "--port", str(http), "--transport-port",
                                str(transport), "--clean", *extra]
        r = self.run(*self.last_start_args)
        if r.returncode == 3:  # a prerequisite (java, mvn) is missing: skip live tests, saying why
            self.error = f"no OpenSearch test node: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
            return ""
        if r.returncode != 0:
            raise RuntimeError(f"the OpenSearch test node did not start (exit {r.returncode}):\n{r.stderr[-4000:]}")
        self.url = r.stdout.strip().splitlines()[-1]
        return self.url

    def stop(self) -> None:
        self.run("stop", timeout=120)
        shutil.rmtree(NODE_HOME / f"nodes-{self.instance}", ignore_errors=True)
        (NODE_HOME / f"state-{self.instance}.json").unlink(missing_ok=True)


def _say(config: pytest.Config, line: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)


def _test_node(request: pytest.FixtureRequest, instance: str, nodes: int) -> str:
    if os.environ.get("FGPLUGIN_TEST_NODE", "1") == "0":
        pytest.skip("FGPLUGIN_TEST_NODE=0: no OpenSearch test node")
    if shutil.which("java") is None and not os.environ.get("OPENSEARCH_JAVA_HOME"):
        pytest.skip("no OpenSearch test node: java is not installed (the live tests need Java 17 and Maven)")
    node = LocalCluster(instance, nodes)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        t0 = time.perf_counter()
        url = node.start()
        if not url:
            _say(request.config, f"\n{node.error}; live tests skipped")
            pytest.skip(node.error)
        _say(request.config, f"\nOpenSearch test cluster ({nodes} node{'s' if nodes > 1 else ''}) at {url}, "
                             f"started in {time.perf_counter() - t0:.0f} s")
    request.addfinalizer(node.stop)
    return url


@pytest.fixture(scope="session")
def opensearch_url(request) -> str:
    """The URL of a real OpenSearch cluster: FGPLUGIN_OPENSEARCH_URL, or a node this session starts."""
    url = os.environ.get(LIVE_ENV)
    if not url:
        url = _test_node(request, "single", 1)
        os.environ[LIVE_ENV] = url  # the CLI in subprocesses finds it too
        os.environ.setdefault("FGPLUGIN_OPENSEARCH_ENGINE", "lucene")
    return url


@pytest.fixture(scope="session")
def opensearch_pair_url(request) -> str:
    """A two-node cluster on loopback (index with 2 primaries and 1 replica): per-shard scoring and k."""
    return _test_node(request, "pair", 2)


@pytest.fixture(scope="module")
def export_and_catalog(tmp_path_factory):
    """The session's tiny untrained export (tests/test_encoder.py) and a two-item generated catalog: for
    CLI tests whose subject is not the model."""
    from fgplugin import synth

    from test_encoder import tiny_export

    export = tiny_export(tmp_path_factory.getbasetemp(), synth.synth_schema())
    catalog = synth.generate(tmp_path_factory.mktemp("catalog"), 2, seed=1, size=64, workers=1)
    return export, catalog


@pytest.fixture()
def no_fgplugin_env(monkeypatch, tmp_path):
    """No FGPLUGIN_* variables and no ~/.config/fgplugin/opensearch.toml: settings from the test alone."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in list(os.environ):
        if k.startswith("FGPLUGIN_"):
            monkeypatch.delenv(k)
