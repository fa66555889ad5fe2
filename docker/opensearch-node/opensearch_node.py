#!/usr/bin/env python3
"""A real OpenSearch node (or a small loopback cluster) without containers.

    docker/opensearch-node.sh start [--nodes N] [--port P] [--setting key=value ...] [--write-queue-size N]
    docker/opensearch-node.sh stop
    docker/opensearch-node.sh status
    docker/opensearch-node.sh fetch        # fetch and assemble only (warms the cache for CI)

Artifacts come from Maven's own resolution (docker/opensearch-node/pom.xml): the minimal distribution
``org.opensearch.distribution.integ-test-zip:opensearch`` (no JDK; on 2.x only transport-netty4), the
lang-painless and lang-mustache jars (laid out as modules/<name>, as the full distribution has them) and
the plugin zips (k-NN, and job-scheduler + ML Commons where published at the same version). The node is
assembled once into .opensearch/opensearch-<version>/; later starts do no Maven work. Nodes run on
127.0.0.1 as an unprivileged user (OpenSearch refuses root), each with its own config/data/logs under
.opensearch/nodes/node-<k>/.

Exit codes: 0 ok, 1 failure, 2 usage, 3 a prerequisite is missing (java or mvn), so CI can skip live
tests with the printed reason. Progress goes to stderr; ``start`` prints the URL as its last stdout line.
Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
POM = HERE / "pom.xml"

VERSION = os.environ.get("OPENSEARCH_VERSION", "2.19.1")
PLUGIN_VERSION = os.environ.get("OPENSEARCH_PLUGIN_VERSION", VERSION + ".0")
BASE = Path(os.environ.get("OPENSEARCH_NODE_HOME", REPO / ".opensearch")).resolve()
HEAP = os.environ.get("OPENSEARCH_NODE_HEAP", "512m")
USER = os.environ.get("OPENSEARCH_NODE_USER", "opensearch")
ML_MODE = os.environ.get("OPENSEARCH_NODE_ML", "auto").lower()  # auto | 1 | 0
CLUSTER = os.environ.get("OPENSEARCH_NODE_CLUSTER", "fgplugin-dev")
# Several clusters side by side (a single node and a two-node cluster for the tests) share the assembled
# distribution; each instance has its own nodes, data and state. "default" keeps the original paths.
INSTANCE = os.environ.get("OPENSEARCH_NODE_INSTANCE", "default")
HOST = "127.0.0.1"

EXIT_FAIL, EXIT_USAGE, EXIT_PREREQ = 1, 2, 3
STAMP = ".fgplugin-assembled.json"
RECIPE = 2  # bump when the assembly changes: older assembled nodes are rebuilt

MODULE_DESCRIPTOR = """\
description={description}
version={version}
name={name}
classname={classname}
java.version={java}
opensearch.version={version}
custom.foldername=
extended.plugins=
has.native.controller=false
"""
# Modules the 2.x minimal distribution lacks, laid out from Maven jars as the full distribution ships
# them: name -> (description, plugin class candidates (3.x name first), plugin-security.policy grants).
MODULES = {
    "lang-painless": (
        "An easy, safe and fast scripting language for OpenSearch",
        ("org.opensearch.painless.PainlessModulePlugin", "org.opensearch.painless.PainlessPlugin"),
        ['permission java.lang.RuntimePermission "createClassLoader";',
         'permission java.lang.RuntimePermission "getClassLoader";']),
    "lang-mustache": (
        "Mustache scripting integration for OpenSearch",
        ("org.opensearch.script.mustache.MustacheModulePlugin", "org.opensearch.script.mustache.MustachePlugin"),
        ['permission java.lang.RuntimePermission "accessDeclaredMembers";']),
}


class Fail(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def say(msg: str) -> None:
    print(f"opensearch-node: {msg}", file=sys.stderr, flush=True)


def major() -> int:
    return int(VERSION.split(".")[0])


def home_dir() -> Path:
    return BASE / f"opensearch-{VERSION}"


def nodes_dir() -> Path:
    return BASE / ("nodes" if INSTANCE == "default" else f"nodes-{INSTANCE}")


def cluster_name() -> str:
    return CLUSTER if INSTANCE == "default" else f"{CLUSTER}-{INSTANCE}"


def state_file() -> Path:
    return BASE / ("state.json" if INSTANCE == "default" else f"state-{INSTANCE}.json")


# ---------------------------------------------------------------------------------------------- java


def _java_major(java_home: Path) -> int | None:
    release = java_home / "release"
    text = None
    if release.is_file():
        m = re.search(r'^JAVA_VERSION="([^"]+)"', release.read_text(errors="replace"), re.M)
        text = m.group(1) if m else None
    if text is None and (java_home / "bin" / "java").is_file():
        try:
            out = subprocess.run([str(java_home / "bin" / "java"), "-version"], capture_output=True,
                                 text=True, timeout=30).stderr
        except (OSError, subprocess.SubprocessError):
            return None
        m = re.search(r'version "([^"]+)"', out)
        text = m.group(1) if m else None
    if not text:
        return None
    parts = text.split(".")
    return int(parts[1]) if parts[0] == "1" else int(re.match(r"\d+", parts[0]).group(0))


def find_java() -> Path:
    """A JDK this OpenSearch version runs on: 2.x needs 11..23 (it still uses the security manager,
    gone in Java 24), 3.x needs 21+."""
    lo, hi = (21, 999) if major() >= 3 else (11, 23)
    want = f"{lo}+" if hi == 999 else f"{lo}..{hi}"
    explicit = os.environ.get("OPENSEARCH_JAVA_HOME")
    if explicit:
        v = _java_major(Path(explicit))
        if v is None or not lo <= v <= hi:
            found = "has no usable java" if v is None else f"is Java {v}"
            raise Fail(f"OPENSEARCH_JAVA_HOME={explicit} {found}; OpenSearch {VERSION} needs Java {want}",
                       EXIT_PREREQ)
        return Path(explicit)
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent.parent)
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        candidates += sorted(p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink())
    for c in candidates:
        v = _java_major(c)
        if v is not None and lo <= v <= hi and (c / "bin" / "java").is_file():
            return c
    raise Fail(f"java {want} not found (needed by OpenSearch {VERSION}); install a JDK or set OPENSEARCH_JAVA_HOME",
               EXIT_PREREQ)


# ------------------------------------------------------------------------------------------ artifacts


def _maven(art: Path, with_ml: bool) -> tuple[bool, str]:
    mvn = shutil.which("mvn")
    if not mvn:
        raise Fail(f"mvn not found: it is needed once to fetch OpenSearch {VERSION} into {BASE}; install Maven",
                   EXIT_PREREQ)
    cmd = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(POM),
           f"-Dopensearch.version={VERSION}", f"-Dopensearch.plugin.version={PLUGIN_VERSION}",
           f"-Dartifacts.dir={art}"]
    if not with_ml:
        cmd.append("-DnoMl")
    cmd += shlex.split(os.environ.get("OPENSEARCH_NODE_MVN_ARGS", ""))
    cmd += ["dependency:copy-dependencies@node-zips", "dependency:copy-dependencies@painless",
            "dependency:copy-dependencies@mustache"]
    say(f"fetching OpenSearch {VERSION} artifacts with Maven{' (with ML Commons)' if with_ml else ''} ...")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout)
    errors = [ln for ln in out.splitlines() if ln.startswith("[ERROR]") and ln.strip() != "[ERROR]"]
    return p.returncode == 0, (errors[0] if errors else out.strip()[-500:])


def _zip(art: Path, name: str) -> Path | None:
    p = art / "zips" / name
    return p if p.is_file() else None


def fetch_artifacts(want_ml: bool | None) -> tuple[Path, bool]:
    """Artifacts under BASE/artifacts/<version>; returns (dir, ml available)."""
    art = BASE / "artifacts" / VERSION
    core = [_zip(art, f"opensearch-{VERSION}.zip"), _zip(art, f"opensearch-knn-{PLUGIN_VERSION}.zip"),
            art / "modules" / "lang-painless" / f"lang-painless-{VERSION}.jar",
            art / "modules" / "lang-mustache" / f"lang-mustache-client-{VERSION}.jar"]
    ml = [_zip(art, f"opensearch-job-scheduler-{PLUGIN_VERSION}.zip"),
          _zip(art, f"opensearch-ml-plugin-{PLUGIN_VERSION}.zip")]
    have_core = all(p is not None and p.is_file() for p in core)
    have_ml = all(ml)
    if have_core and (have_ml or want_ml is False):
        return art, have_ml and want_ml is not False
    ok, msg = _maven(art, with_ml=want_ml is not False)
    if ok:
        return art, want_ml is not False
    if want_ml is None:  # auto: ML Commons / job-scheduler may not be published for this version
        say(f"ML Commons/job-scheduler {PLUGIN_VERSION} not available, going on without them; Maven said: {msg}")
        ok, msg2 = _maven(art, with_ml=False)
        if ok:
            return art, False
        msg = msg2
    raise Fail(f"Maven could not fetch OpenSearch {VERSION} artifacts: {msg}")


def _extract(zip_path: Path, dest: Path) -> None:
    """unzip keeping the unix modes (bin/ scripts must stay executable)."""
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            target = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o7777
            if mode and not info.is_dir():
                os.chmod(target, mode)


def assembled_stamp() -> dict | None:
    p = home_dir() / STAMP
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def ensure_assembled(java: Path) -> dict:
    want_ml = {"1": True, "true": True, "0": False, "false": False}.get(ML_MODE)  # None = auto
    stamp = assembled_stamp()
    if stamp and stamp.get("recipe") == RECIPE and (want_ml is None or stamp.get("ml") == want_ml):
        return stamp
    art, ml = fetch_artifacts(want_ml)
    build = BASE / f".build-{VERSION}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    say(f"assembling OpenSearch {VERSION} in {home_dir()} ...")
    _extract(art / "zips" / f"opensearch-{VERSION}.zip", build)
    home = build / f"opensearch-{VERSION}"
    for name, (description, classes, grants) in MODULES.items():
        target = home / "modules" / name
        if target.is_dir():  # 3.x minimal distributions have it already
            continue
        target.mkdir(parents=True)
        names: set[str] = set()
        for jar in sorted((art / "modules" / name).glob("*.jar")):
            shutil.copy2(jar, target / jar.name)
            with zipfile.ZipFile(jar) as z:
                names.update(z.namelist())
        classname = next((c for c in classes if c.replace(".", "/") + ".class" in names), None)
        if classname is None:
            raise Fail(f"module {name}: none of {', '.join(classes)} in {art / 'modules' / name}")
        (target / "plugin-descriptor.properties").write_text(MODULE_DESCRIPTOR.format(
            description=description, version=VERSION, name=name, classname=classname,
            java=21 if major() >= 3 else 11))
        (target / "plugin-security.policy").write_text(
            "grant {\n" + "".join(f"  {g}\n" for g in grants) + "};\n")
    plugins = (["opensearch-job-scheduler", "opensearch-ml-plugin"] if ml else []) + ["opensearch-knn"]
    env = dict(os.environ, OPENSEARCH_JAVA_HOME=str(java), OPENSEARCH_PATH_CONF=str(home / "config"))
    env.pop("OPENSEARCH_JAVA_OPTS", None)
    for name in plugins:
        z = art / "zips" / f"{name}-{PLUGIN_VERSION}.zip"
        say(f"installing plugin {z.name} ...")
        p = subprocess.run([str(home / "bin" / "opensearch-plugin"), "install", "--batch", z.as_uri()],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            tail = "\n".join(p.stdout.strip().splitlines()[-15:])
            raise Fail(f"opensearch-plugin install {z.name} failed (exit {p.returncode}):\n{tail}")
    installed = sorted(d.name for d in (home / "plugins").iterdir() if d.is_dir())
    stamp = {"recipe": RECIPE, "version": VERSION, "plugin_version": PLUGIN_VERSION, "ml": ml, "plugins": installed,
             "modules": sorted(d.name for d in (home / "modules").iterdir() if d.is_dir())}
    (home / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(home_dir(), ignore_errors=True)
    home.rename(home_dir())
    shutil.rmtree(build, ignore_errors=True)
    shutil.rmtree(art, ignore_errors=True)  # Maven's local repository keeps the downloads
    say(f"assembled: modules {', '.join(stamp['modules'])}; plugins {', '.join(installed)}")
    return stamp


# ---------------------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"opensearch" in f.read()  # bin/opensearch, then (same pid) the java process
    except (OSError, IndexError):
        return False


def _node_pids() -> list[tuple[Path, int]]:
    out = []
    if nodes_dir().is_dir():
        for d in sorted(nodes_dir().iterdir()):
            pf = d / "opensearch.pid"
            try:
                out.append((pf, int(pf.read_text().strip())))
            except (OSError, ValueError):
                pass
    return out


def _read_state() -> dict | None:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _get(url: str, timeout: float = 5.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _ensure_user() -> tuple[int, int] | None:
    """(uid, gid) to run as, or None when we are not root (then we run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        say(f"creating system user {USER} ...")
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        p = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", USER], capture_output=True, text=True)
        if p.returncode != 0:
            raise Fail(f"cannot create user {USER} (OpenSearch refuses to run as root): {p.stderr.strip()}")
        pw = pwd.getpwnam(USER)
    return pw.pw_uid, pw.pw_gid


def _as_user(ids: tuple[int, int] | None) -> list[str]:
    if ids is None:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={ids[0]}", f"--regid={ids[1]}", "--init-groups", "--"]
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", USER, "--"]


def _chown_tree(path: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, *ids)
        for n in files:
            os.chown(os.path.join(root, n), *ids)


def _yaml(value) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML


def _node_config(i: int, n: int, http: int, transport: int, extra: dict[str, str], ml: bool) -> dict[str, str]:
    d = nodes_dir() / f"node-{i + 1}"
    cfg = {
        "cluster.name": _yaml(cluster_name()),
        "node.name": _yaml(f"node-{i + 1}"),
        "network.host": _yaml(HOST),
        "http.port": str(http + i),
        "transport.port": str(transport + i),
        "path.data": _yaml(str(d / "data")),
        "path.logs": _yaml(str(d / "logs")),
        "cluster.routing.allocation.disk.threshold_enabled": "false",
    }
    if n == 1:
        cfg["discovery.type"] = _yaml("single-node")
    else:
        cfg["discovery.seed_hosts"] = _yaml([f"{HOST}:{transport + j}" for j in range(n)])
        cfg["cluster.initial_cluster_manager_nodes"] = _yaml([f"node-{j + 1}" for j in range(n)])
    if ml:
        cfg["plugins.ml_commons.only_run_on_ml_node"] = "false"
    cfg.update(extra)
    return cfg


def _write_node(i: int, cfg: dict[str, str], ids) -> Path:
    d = nodes_dir() / f"node-{i + 1}"
    conf = d / "config"
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(home_dir() / "config", conf)
    for sub in ("data", "logs", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (conf / "opensearch.yml").write_text(
        "# written by docker/opensearch-node.sh; rewritten at every start\n"
        + "".join(f"{k}: {v}\n" for k, v in cfg.items()))
    jvm = (home_dir() / "config" / "jvm.options").read_text()
    jvm = re.sub(r"^-Xms\S+$", f"-Xms{HEAP}", jvm, flags=re.M)
    jvm = re.sub(r"^-Xmx\S+$", f"-Xmx{HEAP}", jvm, flags=re.M)
    jvm = jvm.replace("-XX:HeapDumpPath=data", f"-XX:HeapDumpPath={d / 'data'}")
    jvm = jvm.replace("logs/", f"{d / 'logs'}/")
    (conf / "jvm.options").write_text(jvm)
    # the node's own log file is enough: no console appender (stdout goes to console.log)
    l4j = (conf / "log4j2.properties").read_text()
    (conf / "log4j2.properties").write_text(re.sub(r"^rootLogger\.appenderRef\.console\.ref.*$", "", l4j, flags=re.M))
    _chown_tree(d, ids)
    return d


def _log_file(d: Path) -> Path:
    main = d / "logs" / f"{cluster_name()}.log"
    return main if main.is_file() and main.stat().st_size > 0 else d / "console.log"


def _tail(p: Path, n: int = 25) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop_pids(pids: list[tuple[Path, int]], timeout: float = 60.0) -> None:
    live = [(pf, pid) for pf, pid in pids if _alive(pid)]
    for _, pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for _, pid in live) and time.monotonic() < deadline:
        time.sleep(0.3)
    for _, pid in live:
        if _alive(pid):
            say(f"pid {pid} ignored SIGTERM for {timeout:.0f}s, killing it")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 15
    while any(_alive(pid) for _, pid in live) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pf, _ in pids:
        pf.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ commands


def cmd_fetch(args) -> int:
    stamp = ensure_assembled(find_java())
    say(f"ready: {home_dir()} (plugins: {', '.join(stamp['plugins'])})")
    return 0


def cmd_start(args) -> int:
    n, http, transport = args.nodes, args.port, args.transport_port or args.port + 100
    if not 1 <= n <= 5:
        raise Fail("--nodes must be between 1 and 5", EXIT_USAGE)
    extra: dict[str, str] = {}
    for kv in [s for s in re.split(r"[;\n]", os.environ.get("OPENSEARCH_NODE_SETTINGS", "")) if s.strip()] + args.setting:
        if "=" not in kv:
            raise Fail(f"setting {kv!r} is not key=value", EXIT_USAGE)
        k, v = kv.split("=", 1)
        extra[k.strip()] = v.strip()
    if args.write_queue_size is not None:
        extra["thread_pool.write.queue_size"] = str(args.write_queue_size)
    url = f"http://{HOST}:{http}"
    layout = {"version": VERSION, "nodes": n, "http": http, "transport": transport}

    state = _read_state()
    running = [p for p in _node_pids() if _alive(p[1])]
    if running:
        if state and all(state.get(k) == v for k, v in layout.items()) and state.get("settings") == extra \
                and len(running) == n:
            say(f"already running ({n} node{'s' if n > 1 else ''}, OpenSearch {VERSION})")
            print(state["url"])
            return 0
        raise Fail(f"a node is already running ({(state or {}).get('url', '?')}, "
                   f"{len(running)} node(s)) with other settings; run 'stop' first")

    java = find_java()
    stamp = ensure_assembled(java)
    busy = [p for i in range(n) for p in (http + i, transport + i) if not _port_free(p)]
    if busy:
        raise Fail(f"port(s) {', '.join(map(str, busy))} on {HOST} already in use; pick another with --port/--transport-port")
    ids = _ensure_user()
    prefix = _as_user(ids)
    if prefix:
        probe = subprocess.run(prefix + ["test", "-x", str(home_dir() / "bin" / "opensearch")], capture_output=True)
        if probe.returncode != 0:
            raise Fail(f"user {USER} cannot reach {home_dir()}: make its parent folders world-traversable "
                       f"or set OPENSEARCH_NODE_HOME to another place")

    # data survives a restart with the same layout; a new layout (or --clean) starts from empty nodes
    stamp_layout = {"version": VERSION, "nodes": n, "transport": transport, "http": http}
    old = (state or {}).get("layout")
    if args.clean or old != stamp_layout:
        if nodes_dir().exists():
            say("starting from empty data" + ("" if args.clean else " (new layout)"))
        shutil.rmtree(nodes_dir(), ignore_errors=True)
    nodes_dir().mkdir(parents=True, exist_ok=True)
    for d in nodes_dir().iterdir():
        if d.is_dir() and not re.fullmatch(r"node-[1-%d]" % n, d.name):
            shutil.rmtree(d)

    env = dict(os.environ, OPENSEARCH_JAVA_HOME=str(java))
    env.pop("JAVA_HOME", None)
    procs = []
    say(f"starting {n} node{'s' if n > 1 else ''} of OpenSearch {VERSION} (heap {HEAP}) on {HOST}:{http}"
        + (f"-{http + n - 1}" if n > 1 else "") + " ...")
    for i in range(n):
        d = _write_node(i, _node_config(i, n, http, transport, extra, stamp.get("ml", False)), ids)
        node_env = dict(env, OPENSEARCH_PATH_CONF=str(d / "config"), OPENSEARCH_TMPDIR=str(d / "tmp"), HOME=str(d))
        with open(d / "console.log", "ab") as log:
            if ids:
                os.chown(d / "console.log", *ids)
            p = subprocess.Popen(prefix + [str(home_dir() / "bin" / "opensearch")], cwd=d, env=node_env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        (d / "opensearch.pid").write_text(f"{p.pid}\n")
        procs.append((d, p))
    state = {"url": url, "nodes": n, "version": VERSION, "http": http, "transport": transport, "settings": extra,
             "layout": stamp_layout, "plugins": stamp.get("plugins", []), "started": time.time()}
    state_file().write_text(json.dumps(state, indent=1) + "\n")

    deadline = time.monotonic() + args.timeout
    ready: set[int] = set()
    while True:
        for d, p in procs:
            if p.poll() is not None:
                log = _log_file(d)
                _stop_pids(_node_pids())
                raise Fail(f"{d.name} exited with code {p.returncode} during startup; log {log}:\n{_tail(log)}")
        for i in range(n):
            if i in ready:
                continue
            h = _get(f"http://{HOST}:{http + i}/_cluster/health?wait_for_nodes={n}&wait_for_status=yellow&timeout=2s", 8)
            if h and not h.get("timed_out") and h.get("number_of_nodes") == n and h.get("status") in ("yellow", "green"):
                ready.add(i)
        if len(ready) == n:
            break
        if time.monotonic() > deadline:
            d = procs[0][0]
            log = _log_file(d)
            _stop_pids(_node_pids())
            raise Fail(f"cluster not yellow/green with {n} node(s) after {args.timeout:.0f}s; stopped it. "
                       f"log {log}:\n{_tail(log)}")
        time.sleep(1)
    say(f"up: {n} node{'s' if n > 1 else ''}, plugins {', '.join(stamp.get('plugins', []))}; "
        f"logs in {nodes_dir()}/node-*/logs")
    print(url, flush=True)
    return 0


def cmd_stop(args) -> int:
    pids = _node_pids()
    live = [p for p in pids if _alive(p[1])]
    if not live:
        for pf, _ in pids:
            pf.unlink(missing_ok=True)
        say("not running")
        return 0
    say(f"stopping {len(live)} node(s) (pids {', '.join(str(p) for _, p in live)}) ...")
    _stop_pids(pids, timeout=args.timeout)
    say("stopped")
    return 0


def cmd_status(args) -> int:
    state = _read_state() or {}
    pids = _node_pids()
    live = [p for p in pids if _alive(p[1])]
    if not live:
        if pids:  # pid files left behind: the node(s) died without 'stop'
            print(f"stopped: node(s) exited without 'stop'; see {_log_file(pids[0][0].parent)}")
        else:
            print("stopped")
        return 1
    n = state.get("nodes", len(pids))
    url = state.get("url", f"http://{HOST}:9200")
    h = _get(f"{url}/_cluster/health", 5) or {}
    print(f"running: {len(live)}/{n} node(s), OpenSearch {state.get('version', '?')}, "
          f"cluster {h.get('status', 'not answering')}, plugins {', '.join(state.get('plugins', []))}")
    print(url)
    return 0 if len(live) == n and h.get("status") in ("yellow", "green") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="opensearch-node.sh", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="fetch/assemble if needed, start and wait for yellow/green; prints the URL")
    s.add_argument("--nodes", type=int, default=1, help="nodes in the cluster (default 1)")
    s.add_argument("--port", type=int, default=int(os.environ.get("OPENSEARCH_NODE_PORT", "9200")),
                   help="HTTP port of the first node (default 9200; node k uses port+k-1)")
    s.add_argument("--transport-port", type=int, default=None, help="transport port of the first node (default port+100)")
    s.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="extra opensearch.yml setting (repeatable; also OPENSEARCH_NODE_SETTINGS='k=v;k=v')")
    s.add_argument("--write-queue-size", type=int, default=None, help="thread_pool.write.queue_size (small to test 429s)")
    s.add_argument("--clean", action="store_true", help="start from empty data")
    s.add_argument("--timeout", type=float, default=float(os.environ.get("OPENSEARCH_NODE_TIMEOUT", "180")),
                   help="seconds to wait for the cluster (default 180)")
    t = sub.add_parser("stop", help="stop the node(s) started here and wait until they are gone")
    t.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("status", help="whether running, and the URL (exit 0 only when running and healthy)")
    sub.add_parser("fetch", help="fetch and assemble only")
    ap.add_argument("--instance", default=None, help="name of this cluster's nodes and data (default: "
                    "OPENSEARCH_NODE_INSTANCE or 'default'); clusters of other instances run beside it")
    args = ap.parse_args(argv)
    if args.instance:
        global INSTANCE
        INSTANCE = args.instance
    BASE.mkdir(parents=True, exist_ok=True)
    with open(BASE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "fetch": cmd_fetch}[args.cmd](args)
        except Fail as e:
            say(f"error: {e}")
            return e.code
        except KeyboardInterrupt:
            say("interrupted")
            return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
