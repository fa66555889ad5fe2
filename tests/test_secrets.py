"""No credential in any output: the nastiest store URLs through `fgplugin query`, `index` and `opensearch
setup` (CliRunner and the real executable), the scrubbing functions themselves, and secrets (tokens)
readable from a file or the environment instead of the command line, where `ps` shows them."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import typer
from typer.testing import CliRunner

from fgplugin.errors import StoreError
from fgplugin.opensearch.client import OpenSearchConfig, load_config, parse_http_url, split_url
from fgplugin.redact import redact_url, scrub, url_secrets
from fgplugin_cli.app import app
from fgplugin_cli.common import friendly_errors

# Every secret below contains "zq", which nothing else prints: any leaked piece of one shows as "zq".
MARK = "zq"
RESERVED = "zq1:zq2@zq3/zq4?zq5#zq6[zq7]zq8!zq9$zqa&zqb'zqc(zqd)zqe*zqf+zqg,zqh;zqi=zqj%zqk"
ENCODED = quote(RESERVED, safe="")
FAST_FAIL = {"FGPLUGIN_OPENSEARCH_RETRY_TOTAL_S": "0", "FGPLUGIN_OPENSEARCH_CONNECT_TIMEOUT": "1"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = closed_port()
HOST = f"127.0.0.1:{PORT}"

NASTY_URLS = [
    f"opensearch:http://zquser:{ENCODED}@{HOST}",  # every reserved character, percent-encoded (valid)
    f"opensearch:http://zquser:{RESERVED}@{HOST}",  # the same, not encoded (invalid)
    f"opensearch:https://zquser:zqp%40ss%3Aw%2Fd@{HOST}/fgindex",
    f"opensearch:http://zquser:zqp@ss@{HOST}",  # an '@' inside the password
    f"opensearch:http://:zqpass@{HOST}",  # empty user
    f"opensearch:http://zquser:@{HOST}",  # empty password
    f"opensearch:http://zquser@{HOST}",
    f"opensearch:http://zqü:zqpässwörd密码@{HOST}",  # unicode
    f"opensearch:http://zquser:zq pass word@{HOST}",  # spaces
    f"opensearch:http://zquser:zq\"quo'ted@{HOST}",
    f"opensearch:http://zquser:zqpass@[::1]:{PORT}",  # IPv6
    f"opensearch:http://zquser:zqpass@[::1",  # unclosed [
    f"opensearch:http://zquser:zqpass@[fgnotip]:9200",
    f"opensearch:zquser:zqpass@{HOST}",  # no scheme
    f"opensearch://zquser:zqpass@{HOST}",
    f"opensearch:HTTP://zquser:zqpass@{HOST}",
    f"opensearch:http://zquser:zqpass@127.0.0.1:zqport",  # bad port
    f"opensearch:http://zquser:zqpass@127.0.0.1:99999",
    "opensearch:http://admin:zqsecret",  # host forgotten: the "port" is the password
    f"opensearch:http://zquser:zqpass@h 1:{PORT}",  # space in the host
    f"opensearch:ftp://zquser:zqpass@{HOST}",
    f"opensearch:http://{HOST}/?password=zqpass&token=zqtok&api_key=zqkey",
    f"opensearch:http://zquser:zqpass@{HOST}#fgfrag",
    f"opensearch:http://zquser:zqpa%ZZss@{HOST}",  # bad percent-encoding
    f"http://zquser:zqpass@{HOST}",  # opensearch: forgotten
    f"zquser:zqpass@{HOST}",
    f"embedded:http://zquser:zqpass@{HOST}",
    f"embedded:zquser:zqpass@{HOST}",
    f"fgkind:zquser:zqpass@{HOST}",
]


def assert_clean(text: str, what: str = "") -> None:
    assert MARK not in text.lower(), f"secret leaked {what}:\n{text}"


@pytest.fixture(autouse=True)
def _no_config(no_fgplugin_env):  # noqa: ARG001 - every test here starts from no settings
    pass


def run(*args: str, env: dict[str, str] | None = None):
    r = CliRunner().invoke(app, list(args), env={**FAST_FAIL, **(env or {})})
    return r, r.stdout + r.stderr


# -- the functions --------------------------------------------------------------------------------
@pytest.mark.parametrize("url", NASTY_URLS)
def test_redact_url_and_scrub_remove_every_secret(url):
    assert_clean(redact_url(url), "by redact_url")
    for text in (f"error: store URL {url!r} failed", f"at {url}: x", f'"{url}"', f"({url})"):
        assert_clean(scrub(text, url_secrets(url)), "by scrub")  # as cli/common.py's friendly_errors does
        if " " not in url:  # a space splits the URL into words: only the literal secret finds it then
            assert_clean(scrub(text), "by scrub without the secrets")


def test_scrub_keeps_what_is_not_a_secret():
    assert redact_url("https://u:p@h:9200/x?y=1#z") == "https://h:9200/x"
    assert redact_url("http://[::1]:9200") == "http://[::1]:9200"
    assert redact_url("embedded:/data/a@b/store") == "embedded:/data/a@b/store"  # a path, not user info
    assert scrub("image sku@2x.png is missing; mail admin@example.com") == \
        "image sku@2x.png is missing; mail admin@example.com"
    assert scrub("see 'http://zquser:zqpass@h:9200/i': down") == "see 'http://h:9200/i': down"
    assert scrub("opensearch:zquser:zqpass@h:1 failed") == "opensearch:h:1 failed"
    assert scrub("GET /x?password=zq1&size=3 token=zq2") == "GET /x?password=***&size=3 token=***"
    assert scrub('{"api_key": "zq3", "Authorization": "Basic enF1c2VyOnpxcGFzcw=="}') == \
        '{"api_key": "***", "Authorization": "***"}'
    assert scrub("the zqlong-secret went by", ["zqlong-secret"]) == "the *** went by"
    assert scrub("encoded zqa%2Fb too", ["zqa/b"]) == "encoded *** too"


def test_url_secrets_finds_password_and_parameters():
    assert "zqp@ss" in url_secrets("http://u:zqp@ss@h")
    assert "zq pass" in url_secrets("opensearch:http://u:zq pass@h")
    assert {"zqtok", "zqkey"} <= set(url_secrets("http://h/?token=zqtok&api_key=zqkey"))
    assert url_secrets("http://h:9200/x") == [] and url_secrets("http://admin@h") == []


def test_parsing_keeps_odd_but_valid_credentials():
    base, user, password, index = split_url(f"https://zq%20u:{ENCODED}@[::1]:9201/zqindex")
    assert (base, user, password, index) == ("https://[::1]:9201", "zq u", RESERVED, "zqindex")
    assert redact_url("http://admin:zqsecret/x") == "http://admin:***/x"  # a port that is no number: masked
    assert scrub("at http://127.0.0.1:1: down, http://h:9200, ok") == "at http://127.0.0.1:1: down, http://h:9200, ok"
    assert split_url("http://u:p@ss@h:1")[1:3] == ("u", "p@ss")
    assert split_url("http://u:pässwörd密码@h")[2] == "pässwörd密码"
    assert split_url("H")[0] == "http://h"
    assert parse_http_url("http://h:1/p?q=1#f", "x").query == "q=1"


@pytest.mark.parametrize("url", [u.split(":", 1)[1] for u in NASTY_URLS if u.startswith("opensearch:")])
def test_config_errors_and_reprs_hold_no_secret(url):
    try:
        cfg = load_config(url, env={})
    except StoreError as e:
        assert_clean(str(e))
        return
    assert_clean(cfg.url)
    assert cfg.password is None or cfg.password not in repr(cfg)  # the repr names the user, by design


def test_a_url_with_credentials_given_directly_to_the_config_is_split():
    cfg = OpenSearchConfig(url="http://zquser:zqpass@h:9200")
    assert (cfg.url, cfg.user, cfg.password) == ("http://h:9200", "zquser", "zqpass")
    assert "zqpass" not in repr(cfg)


# -- the commands ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url", NASTY_URLS)
def test_query_never_prints_a_secret(url, caplog):
    caplog.set_level(logging.DEBUG)
    r, out = run("query", "--store", url, "--like", "a", "--attr", "colour")
    assert r.exit_code == 2, out
    assert "Traceback" not in out
    assert_clean(out, "in query output")
    assert_clean(caplog.text, "in log lines")


@pytest.mark.parametrize("url", [NASTY_URLS[i] for i in (0, 1, 7, 10, 11, 13, 16, 21, 24, 25, 26)])
def test_index_never_prints_a_secret(url, export_and_catalog, caplog):
    export, catalog = export_and_catalog
    caplog.set_level(logging.DEBUG)
    r, out = run("index", "--catalog", str(catalog), "--model", str(export), "--store", url, "--device", "cpu",
                 "--workers", "1")
    assert r.exit_code == 2, out
    assert "Traceback" not in out
    assert_clean(out, "in index output")
    assert_clean(caplog.text, "in log lines")


SERVE_URLS = ["http://zquser:zqpass@fgplugin-serve:8080", f"http://zquser:{RESERVED}@h:8080",
              "http://zquser:zqpass@[::1", "ftp://zquser:zqpass@h", "zquser:zqpass@h:8080",
              "http://h:8080/?token=zqtok", "http://zquser:zqpass@h:zqport"]


@pytest.mark.parametrize("serve_url", SERVE_URLS)
def test_setup_never_prints_a_secret_in_serve_url(serve_url, export_and_catalog):
    export, _ = export_and_catalog
    r, out = run("opensearch", "setup", "--model", str(export), "--serve-url", serve_url, "--apply",
                 "--store", f"opensearch:http://{HOST}")
    assert r.exit_code == 2, out
    assert "Traceback" not in out
    assert_clean(out, "in setup output")


@pytest.mark.parametrize("url", [NASTY_URLS[i] for i in (0, 1, 3, 7, 10, 11, 13, 16, 21, 24, 26)])
def test_setup_never_prints_a_secret_in_store(url, export_and_catalog):
    export, _ = export_and_catalog
    r, out = run("opensearch", "setup", "--model", str(export), "--serve-url", "http://fgplugin-serve:8080",
                 "--apply", "--store", url, "--serve-token", "zqtoken-123")
    assert r.exit_code == 2, out
    assert "Traceback" not in out
    assert_clean(out, "in setup output")


def test_the_real_executable_prints_no_secret():
    exe = Path(sys.executable).with_name("fgplugin")
    if not exe.is_file():
        pytest.skip(f"{exe} is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGPLUGIN_")}
    for url in (NASTY_URLS[1], NASTY_URLS[11], NASTY_URLS[24], f"opensearch:http://zquser:zqpass@{HOST}"):
        p = subprocess.run([str(exe), "query", "--store", url, "--like", "a", "--attr", "colour"], capture_output=True,
                           text=True, timeout=60, env={**env, **FAST_FAIL})
        assert p.returncode == 2, p.stderr
        assert_clean(p.stdout + p.stderr, f"by {url!r}")
        assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error:")


def test_unexpected_errors_are_scrubbed_one_line_exit_1(monkeypatch):
    import fgplugin_cli.query

    def boom(url, **kw):
        raise RuntimeError(f"internal failure on {url} with Authorization: Basic enF1c2VyOnpxcGFzcw==")

    monkeypatch.setattr(fgplugin_cli.query, "open_store", boom)
    r, out = run("query", "--store", f"opensearch:http://zquser:{RESERVED}@h:1", "--like", "a", "--attr", "c")
    assert r.exit_code == 1 and "Traceback" not in out
    assert "unexpected RuntimeError: internal failure on" in out
    assert_clean(out)
    r, out = run("query", "--store", f"opensearch:http://zquser:{RESERVED}@h:1", "--like", "a", "--attr", "c",
                 env={"FGPLUGIN_DEBUG": "1"})
    assert r.exit_code == 1 and "Traceback" in out
    assert_clean(out)


def test_friendly_errors_scrubs_the_secrets_the_command_was_given(monkeypatch):
    """The last line of defence: a message holding a secret in a form no URL pattern recognises."""
    from fgplugin.errors import FgpluginError

    tiny = typer.Typer()

    @tiny.command()
    @friendly_errors
    def cmd(store: str = typer.Option(...), token: str = typer.Option("")) -> None:
        raise FgpluginError(f"cannot use {store.upper().lower()} / {token} / pw {os.environ['FGPLUGIN_OPENSEARCH_PASSWORD']}"
                            f" / [bold]markup[/bold] stays text")

    monkeypatch.setenv("FGPLUGIN_OPENSEARCH_PASSWORD", "zqenv-password")
    r = CliRunner().invoke(tiny, ["--store", "opensearch:http://u:zq p[a]ss w@h:1", "--token", "zqtoken-9"])
    assert r.exit_code == 2
    assert_clean(r.output)
    assert "[bold]markup[/bold] stays text" in r.output


# -- secrets from files or the environment instead of the command line -----------------------------
@pytest.mark.parametrize("args", [["serve", "--help"], ["opensearch", "setup", "--help"]])
def test_help_names_the_file_and_env_forms_and_warns_about_ps(args):
    r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    text = " ".join(r.output.split())
    assert r.exit_code == 0
    assert "token-file" in text and "FGPLUGIN_SERVE_TOKEN" in text and "FGPLUGIN_SERVE_TOKEN_FILE" in text
    assert "`ps` shows the command line to every user" in text


@pytest.fixture()
def captured_serve(monkeypatch):
    import fgplugin.serve

    seen = {}
    monkeypatch.setattr(fgplugin.serve, "run", lambda model, **kw: seen.update(kw))
    return seen


def test_serve_reads_the_token_from_a_file(tmp_path, captured_serve):
    f = tmp_path / "token"
    f.write_text("zqfile-token\n")
    f.chmod(0o600)
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--token-file", str(f)])
    assert r.exit_code == 0, r.output
    assert captured_serve["config"].token == "zqfile-token"
    assert_clean(r.output)
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)], env={"FGPLUGIN_SERVE_TOKEN_FILE": str(f)})
    assert r.exit_code == 0 and captured_serve["config"].token == "zqfile-token"


def test_serve_token_forms_and_their_errors(tmp_path, captured_serve):
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)], env={"FGPLUGIN_SERVE_TOKEN": "zqenv-token"})
    assert r.exit_code == 0 and captured_serve["config"].token == "zqenv-token"
    assert "ps" not in r.output  # from the environment: nothing to warn about
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--token", "zqcli-token"])
    assert r.exit_code == 0 and captured_serve["config"].token == "zqcli-token"
    assert "warning: --token given on the command line" in r.output and "FGPLUGIN_SERVE_TOKEN" in r.output
    f = tmp_path / "token"
    f.write_text("zqfile-token")
    cases = [(["--token", "zqcli-token", "--token-file", str(f)],
              "give --token (or FGPLUGIN_SERVE_TOKEN) or --token-file, not both"),
             (["--token-file", str(tmp_path / "none")], f"--token-file {tmp_path / 'none'}: no such file"),
             (["--token-file", str(tmp_path)], "is a directory")]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases.append((["--token-file", str(empty)], f"--token-file {empty} is empty"))
    for extra, message in cases:
        r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), *extra])
        assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
        assert_clean(r.output)
    f.chmod(0o644)
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--token-file", str(f)])
    assert r.exit_code == 0 and "readable by other users" in r.output


def test_setup_reads_the_serve_token_from_a_file(tmp_path, monkeypatch, export_and_catalog):
    import fgplugin_cli.opensearch as wiring

    export, _ = export_and_catalog
    seen = {}
    real_plan = wiring.plan
    monkeypatch.setattr(wiring, "plan", lambda card, options, *a, **k: (seen.setdefault("token", options.token),
                                                                         real_plan(card, options, *a, **k))[1])
    f = tmp_path / "token"
    f.write_text("zqsetup-token\n")
    f.chmod(0o600)
    r = CliRunner().invoke(app, ["opensearch", "setup", "--model", str(export), "--serve-url",
                                 "http://fgplugin-serve:8080", "--serve-token-file", str(f)])
    assert r.exit_code == 0, r.output
    assert seen["token"] == "zqsetup-token"
    assert_clean(r.output)


def test_a_password_in_the_store_url_on_the_command_line_is_warned_about():
    r, out = run("query", "--store", f"opensearch:http://u:zqpass@{HOST}", "--like", "a", "--attr", "c")
    assert "--store holds a password" in " ".join(out.split()) and "`ps`" in out
    assert_clean(out)
