"""Connecting to OpenSearch: URL, TLS, basic auth or API key, from arguments, env vars or a TOML file.

Where settings come from (first found wins, per setting):

1. the store URL (``opensearch:https://user:pass@host:9200/INDEX``; user info and path are optional),
2. environment variables ``FGPLUGIN_OPENSEARCH_URL``, ``FGPLUGIN_OPENSEARCH_USER`` /
   ``FGPLUGIN_OPENSEARCH_PASSWORD``, ``FGPLUGIN_OPENSEARCH_API_KEY`` (sent as
   ``Authorization: ApiKey <key>``), ``FGPLUGIN_OPENSEARCH_CA_CERTS``, ``FGPLUGIN_OPENSEARCH_VERIFY_CERTS``,
   ``FGPLUGIN_OPENSEARCH_INDEX``,
3. a TOML file: the ``config_path`` argument, else ``FGPLUGIN_OPENSEARCH_CONFIG``, else
   ``~/.config/fgplugin/opensearch.toml`` when it exists. Keys (top level or under ``[opensearch]``):
   url, user, password, api_key, ca_certs, verify_certs, index, timeout, connect_timeout, retry_total_s,
   http_compress
   (each also as ``FGPLUGIN_OPENSEARCH_<KEY>``).
4. defaults: ``DEFAULT_URL`` (the port ``docker/compose.yml`` publishes), index ``DEFAULT_INDEX``;
   timeouts and retries from the profile: ``load_config(interactive=True)`` (query, opensearch setup)
   fails within seconds when the cluster is unreachable, the default (the indexer, library use) keeps
   retrying connection errors for ``retry_total_s`` and says what it waits for.

Secrets never appear in reprs, logs or error messages: ``OpenSearchConfig.__repr__`` masks them,
``redact_url`` (``fgplugin.redact``) strips user info from any URL shown, and ``scrub`` removes the
secret strings (and their basic-auth encoding) from any text before it reaches a message.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import logging
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote

import orjson
from opensearchpy import JSONSerializer, OpenSearch
from opensearchpy import exceptions as ex
from urllib3 import Timeout

from ..errors import FgpluginError, StoreError
from ..redact import ScrubFilter, redact_url
from ..redact import scrub as scrub_text

__all__ = ["redact_url"]  # re-exported: callers and tests import it from here

log = logging.getLogger("fgplugin.opensearch")
log.addFilter(ScrubFilter())  # last line of defence: no URL user info in a log line

DEFAULT_PORT = 9200
DEFAULT_URL = f"http://localhost:{DEFAULT_PORT}"
DEFAULT_INDEX = "fgplugin"  # the alias queries read; the concrete index is versioned (mapping.py)
DEFAULT_IMAGE = "opensearchproject/opensearch:3.2.0"  # docker/compose.yml runs this (k-NN bundled)
DEFAULT_CONFIG = Path("~/.config/fgplugin/opensearch.toml")
ENV_PREFIX = "FGPLUGIN_OPENSEARCH_"
CONFIG_KEYS = ("url", "user", "password", "api_key", "ca_certs", "verify_certs", "index", "timeout", "connect_timeout",
               "retry_total_s", "http_compress")
# Interactive commands (query, opensearch setup): someone is waiting, so an unreachable cluster must be
# reported in seconds. Refused connections are retried briefly (a node restarting), timeouts never
# (each retry would cost another timeout). Env vars and the config file still override these.
INTERACTIVE = {"connect_timeout": 3.0, "retry_total_s": 2.0, "retry_timeouts": False}
_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass
class OpenSearchConfig:
    """Everything needed to talk to one cluster. ``url`` never carries credentials."""

    url: str = DEFAULT_URL
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)
    ca_certs: str | None = None
    verify_certs: bool = True
    index: str = DEFAULT_INDEX
    timeout: float = 30.0  # seconds per request (a search over a large index may take a while)
    connect_timeout: float = 5.0  # seconds to connect, and for the first small request to answer
    retry_total_s: float = 60.0  # connection errors / 5xx: retried with backoff up to this total wait
    retry_timeouts: bool = True  # also retry requests that timed out (the indexer under load)
    retry_initial_s: float = 0.5  # first backoff (doubles, capped at 10 s)
    bulk_max_retries: int = 5  # per-document 429 rejections retried this many times
    bulk_initial_backoff: float = 1.0  # seconds before the first 429 retry (doubles each time)
    bulk_chunk_size: int = 500  # documents per _bulk request
    # gzip request bodies: vectors in JSON shrink about 2x, but gzip costs the client ~3 ms of CPU per
    # 8 x 64-d document (measured: 27 % of a bulk load's wall time on loopback), so only for thin links
    http_compress: bool = False

    def __post_init__(self) -> None:
        if "@" in self.url:  # built directly with credentials in the URL: move them out of it
            self.url, user, password, _ = split_url(self.url)
            self.user, self.password = self.user or user, self.password or password
        if self.user and self.api_key:
            raise StoreError(
                f"OpenSearch at {self.url}: both a user/password and an API key are set; give only one"
            )
        if self.password and not self.user:
            raise StoreError(f"OpenSearch at {self.url}: a password is set but no user (FGPLUGIN_OPENSEARCH_USER)")

    def __repr__(self) -> str:
        auth = "api_key=***" if self.api_key else (f"user={self.user!r}, password=***" if self.user else "no auth")
        return (f"OpenSearchConfig(url={redact_url(self.url)!r}, {auth}, index={self.index!r}, "
                f"verify_certs={self.verify_certs})")

    @property
    def secrets(self) -> list[str]:
        out = [s for s in (self.password, self.api_key) if s]
        if self.user and self.password:
            out.append(base64.b64encode(f"{self.user}:{self.password}".encode()).decode())
        return out

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***`` and any URL user info removed (``fgplugin.redact``)."""
    return scrub_text(text, secrets)


def split_url(url: str) -> tuple[str, str | None, str | None, str | None]:
    """``https://u:p@h:9200/idx`` -> ("https://h:9200", "u", "p", "idx"). Adds http:// when no scheme."""
    text = str(url).strip()
    u = parse_http_url(text if "://" in text or not text else "http://" + text, "OpenSearch URL", StoreError)
    if u.query is not None or u.fragment is not None:
        raise StoreError(f"OpenSearch URL {redact_url(url)!r}: a query string or fragment ('?', '#') is not supported; "
                         "credentials go in the user info or FGPLUGIN_OPENSEARCH_USER/PASSWORD/API_KEY")
    if u.password is not None and not u.user:
        raise StoreError(f"OpenSearch URL {redact_url(url)!r} has a password but no user name")
    return u.base, u.user, u.password, u.path.strip("/") or None


@dataclass(frozen=True)
class HttpURL:
    scheme: str
    host: str  # IPv6 in brackets
    port: int | None
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    path: str = ""
    query: str | None = field(default=None, repr=False)
    fragment: str | None = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port is not None else "")


_BAD_HOST_CHARS = re.compile(r"[\s\x00-\x1f\x7f<>\"'{}|\\^`%/?#@\[\]:]")


def parse_http_url(url: str, what: str, error: type[FgpluginError] = StoreError) -> HttpURL:
    """Split an http(s) URL, refusing malformed ones with a one-line ``error`` that names the problem and
    shows the URL only through ``redact_url``. The user info ends at the LAST '@' (so an '@' in a
    password works, as in urlsplit); '/', '?' or '#' before that '@' must be percent-encoded."""
    text = str(url).strip()
    shown = redact_url(text)
    if not text:
        raise error(f"{what} is empty")
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise error(f"{what} {shown!r} must start with http:// or https://")
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise error(f"{what} must start with http:// or https://, got scheme {scheme!r}")
    at = rest.rfind("@")
    end = re.search(r"[/?#]", rest)
    if at >= 0 and end is not None and end.start() < at:
        raise error(f"{what} {shown!r}: the user name or password holds a '/', '?' or '#'; percent-encode it "
                    "(/ as %2F, ? as %3F, # as %23, @ as %40)")
    authority, rest = (rest[:end.start()], rest[end.start():]) if end else (rest, "")
    userinfo, _, hostport = authority.rpartition("@")
    user = password = None
    if at >= 0:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user)
        password = unquote(raw_password) if colon and raw_password else None
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise error(f"{what} {shown!r}: unclosed '[' in the host (write an IPv6 host as [::1]:9200)")
        ip, port_text = hostport[1:close], hostport[close + 1:]
        try:
            ipaddress.IPv6Address(ip.split("%", 1)[0])
        except ValueError:
            raise error(f"{what} {shown!r}: [{ip}] is not an IPv6 address") from None
        if port_text and not port_text.startswith(":"):
            raise error(f"{what} {shown!r}: unexpected text after the IPv6 host [{ip}]")
        host, port_text = f"[{ip.lower()}]", port_text[1:]
        has_port = bool(port_text) or hostport.endswith(":")
    else:
        host, colon, port_text = hostport.partition(":")
        has_port = bool(colon)
        if not host:
            raise error(f"{what} {shown!r} names no host")
        if _BAD_HOST_CHARS.search(host):
            raise error(f"{what} {shown!r}: the host {host!r} holds characters a host name cannot have")
        host = host.lower()
    port = None
    if has_port:
        # The port text is not echoed: in 'http://admin:secret' (host forgotten) it is a password.
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
            raise error(f"{what} {scheme}://{host}: the port must be a number from 1 to 65535")
        port = int(port_text)
    rest, hashmark, fragment = rest.partition("#")
    path, qmark, query = rest.partition("?")
    return HttpURL(scheme, host, port, user, password, path, query if qmark else None,
                   fragment if hashmark else None)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise StoreError(f"{where}: {value!r} is not a boolean (use true or false)")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML config file; unknown keys are refused (named, values never shown)."""
    p = Path(path).expanduser()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"OpenSearch config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"cannot read OpenSearch config file {p}: {e.__class__.__name__}") from None
    except tomllib.TOMLDecodeError as e:
        # The decoder's message names a line/column, never the secret's text.
        raise StoreError(f"OpenSearch config file {p} is not valid TOML: {e}") from None
    if isinstance(data.get("opensearch"), dict):
        data = data["opensearch"]
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise StoreError(f"OpenSearch config file {p}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    if (data.get("password") or data.get("api_key")) and os.name == "posix":
        mode = p.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("OpenSearch config file %s holds a secret and is readable by others; chmod 600 it", p)
    return dict(data)


def load_config(
    url: str | None = None,
    *,
    index: str | None = None,
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    interactive: bool = False,
    **overrides: Any,
) -> OpenSearchConfig:
    """Resolve the settings (URL > env > file > profile > defaults, per setting; ``overrides`` win over
    all); ``interactive``: the fail-fast timeouts and retries of ``INTERACTIVE``. See the module docstring."""
    env = os.environ if env is None else env
    path = config_path or env.get(ENV_PREFIX + "CONFIG")
    if path is None and DEFAULT_CONFIG.expanduser().is_file():
        path = DEFAULT_CONFIG
    file_cfg = read_config_file(path) if path else {}
    where = f"OpenSearch config file {path}" if path else "OpenSearch settings"

    def pick(key: str) -> Any:
        v = env.get(ENV_PREFIX + key.upper())
        if v is not None and v != "":
            return v
        return file_cfg.get(key)

    raw_url = url or pick("url") or DEFAULT_URL
    base, url_user, url_password, url_index = split_url(str(raw_url))
    user = url_user if url_user is not None else pick("user")
    password = url_password if url_user is not None else pick("password")
    api_key = None if url_user is not None else pick("api_key")
    verify = pick("verify_certs")
    kw: dict[str, Any] = dict(
        url=base,
        user=str(user) if user else None,
        password=str(password) if password else None,
        api_key=str(api_key) if api_key else None,
        ca_certs=str(pick("ca_certs")) if pick("ca_certs") else None,
        verify_certs=True if verify is None else _bool(verify, where + " verify_certs"),
        http_compress=False if pick("http_compress") is None else _bool(pick("http_compress"), where + " http_compress"),
        index=index or url_index or pick("index") or DEFAULT_INDEX,
    )
    if interactive:
        kw.update(INTERACTIVE)
    for key in ("timeout", "connect_timeout", "retry_total_s"):
        v = pick(key)
        if v is not None:
            try:
                kw[key] = float(v)
            except (TypeError, ValueError):
                kw[key] = float("nan")
            if not kw[key] >= (0 if key == "retry_total_s" else 0.001):  # NaN fails this too
                raise StoreError(f"{where}: {key} must be a positive number of seconds, got {v!r}")
    kw.update(overrides)
    return OpenSearchConfig(**kw)


class FastJSONSerializer(JSONSerializer):
    """opensearch-py's serializer with orjson doing the work: a bulk body of vectors is mostly floats,
    whose repr the standard json module builds in Python. Anything orjson refuses (e.g. an integer over
    64 bits) goes the standard way, so the output's meaning never changes."""

    def dumps(self, data: Any) -> str:
        if isinstance(data, str):
            return data
        try:
            return orjson.dumps(data, default=self.default, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        except (TypeError, orjson.JSONEncodeError):
            return super().dumps(data)


def make_client(cfg: OpenSearchConfig) -> Any:
    """An ``opensearchpy.OpenSearch`` for ``cfg``. Transport retries are off: the store retries itself
    with backoff and a bounded total wait (``OpenSearchStore.call``)."""
    headers = None
    if cfg.api_key:
        headers = {"Authorization": f"ApiKey {cfg.api_key}"}
    elif cfg.user:  # built here, UTF-8 (as OpenSearch decodes it): urllib3 would refuse non-latin-1 passwords
        basic = base64.b64encode(f"{cfg.user}:{cfg.password or ''}".encode()).decode()
        headers = {"Authorization": f"Basic {basic}"}
    kwargs: dict[str, Any] = dict(
        hosts=[cfg.url],
        headers=headers,
        # A short connect timeout: a blackholed address is reported in seconds, not after `timeout`.
        timeout=Timeout(connect=min(cfg.connect_timeout, cfg.timeout), read=cfg.timeout),
        max_retries=0,
        retry_on_timeout=False,
        http_compress=cfg.http_compress,
        serializer=FastJSONSerializer(),
    )
    if cfg.url.startswith("https://"):
        kwargs.update(use_ssl=True, verify_certs=cfg.verify_certs, ssl_show_warn=cfg.verify_certs)
        if cfg.ca_certs:
            kwargs["ca_certs"] = cfg.ca_certs
    try:
        return OpenSearch(**kwargs)
    except (ValueError, TypeError) as e:  # e.g. urllib3 refusing the host
        raise StoreError(f"OpenSearch at {redact_url(cfg.url)}: cannot set up a client: "
                         f"{cfg.scrub(f'{e.__class__.__name__}: {e}')}") from None


def is_timeout(exc: BaseException) -> bool:
    """A request that timed out (connecting or waiting for the answer), as opposed to one refused."""
    if isinstance(exc, ex.ConnectionTimeout):
        return True
    return isinstance(exc, ex.ConnectionError) and not isinstance(exc, ex.SSLError) and "timed out" in str(exc.info)


def describe_cause(exc: BaseException, cfg: OpenSearchConfig | None = None, *, timeout: float | None = None) -> str:
    """A short, secret-free cause for an opensearch-py exception (``timeout``: the read timeout that applied)."""
    if isinstance(exc, ex.ConnectionTimeout):
        limit = timeout or (cfg.timeout if cfg is not None else None)
        text = "timed out: no answer" + (f" within {limit:g} s" if limit else "")
    elif isinstance(exc, ex.SSLError):
        text = "TLS error (check FGPLUGIN_OPENSEARCH_CA_CERTS / VERIFY_CERTS)"
    elif isinstance(exc, ex.ConnectionError):
        info = str(exc.info) if exc.info is not None else str(exc)
        m = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", info)
        if m:
            text = f"cannot connect ({m.group(1).strip()})"
        elif "timed out" in info:
            limit = f" within {cfg.connect_timeout:g} s" if cfg is not None else ""
            text = f"cannot connect (no answer{limit}; FGPLUGIN_OPENSEARCH_CONNECT_TIMEOUT)"
        else:
            text = "cannot connect"
    elif isinstance(exc, ex.TransportError):
        info = exc.info if isinstance(exc.info, dict) else {}
        err = info.get("error") if isinstance(info, dict) else None
        if isinstance(err, dict):
            root = (err.get("root_cause") or [err])[0]
            reason = f"{root.get('type', err.get('type', 'error'))}: {root.get('reason', err.get('reason', ''))}"
        else:
            reason = str(err or exc.error or "")
        text = f"HTTP {exc.status_code}" + (f" {reason}" if reason else "")
        if exc.status_code == 401:
            text += " (check FGPLUGIN_OPENSEARCH_USER/PASSWORD or FGPLUGIN_OPENSEARCH_API_KEY)"
        elif exc.status_code == 403:
            text += " (the credentials lack a permission for this request)"
    else:
        text = f"{exc.__class__.__name__}: {exc}"
    text = " ".join(text.split())[:500]
    return cfg.scrub(text) if cfg is not None else text


def with_overrides(cfg: OpenSearchConfig, **kw: Any) -> OpenSearchConfig:
    return dataclasses.replace(cfg, **kw)
