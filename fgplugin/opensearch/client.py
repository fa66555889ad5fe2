"""Connecting to OpenSearch: URL, TLS, basic auth or API key, from arguments, env vars or a TOML file.

Where settings come from (first found wins, per setting):

1. the store URL (``opensearch:https://user:pass@host:9200/INDEX``; user info and path are optional),
2. environment variables ``FGPLUGIN_OPENSEARCH_URL``, ``FGPLUGIN_OPENSEARCH_USER`` /
   ``FGPLUGIN_OPENSEARCH_PASSWORD``, ``FGPLUGIN_OPENSEARCH_API_KEY`` (sent as
   ``Authorization: ApiKey <key>``), ``FGPLUGIN_OPENSEARCH_CA_CERTS``, ``FGPLUGIN_OPENSEARCH_VERIFY_CERTS``,
   ``FGPLUGIN_OPENSEARCH_INDEX``,
3. a TOML file: the ``config_path`` argument, else ``FGPLUGIN_OPENSEARCH_CONFIG``, else
   ``~/.config/fgplugin/opensearch.toml`` when it exists. Keys (top level or under ``[opensearch]``):
   url, user, password, api_key, ca_certs, verify_certs, index, timeout, retry_total_s.
4. defaults: ``DEFAULT_URL`` (the port ``docker/compose.yml`` publishes), index ``DEFAULT_INDEX``.

Secrets never appear in reprs, logs or error messages: ``OpenSearchConfig.__repr__`` masks them,
``redact_url`` strips user info, and ``scrub`` removes the secret strings (and their basic-auth
encoding) from any text before it reaches a message.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import StoreError

log = logging.getLogger("fgplugin.opensearch")

DEFAULT_PORT = 9200
DEFAULT_URL = f"http://localhost:{DEFAULT_PORT}"
DEFAULT_INDEX = "fgplugin"  # the alias queries read; the concrete index is versioned (mapping.py)
DEFAULT_IMAGE = "opensearchproject/opensearch:3.2.0"  # docker/compose.yml runs this (k-NN bundled)
DEFAULT_CONFIG = Path("~/.config/fgplugin/opensearch.toml")
ENV_PREFIX = "FGPLUGIN_OPENSEARCH_"
CONFIG_KEYS = ("url", "user", "password", "api_key", "ca_certs", "verify_certs", "index", "timeout", "retry_total_s")
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
    timeout: float = 30.0  # seconds per request
    retry_total_s: float = 60.0  # connection errors / 5xx: retried with backoff up to this total wait
    retry_initial_s: float = 0.5  # first backoff (doubles, capped at 10 s)
    bulk_max_retries: int = 5  # per-document 429 rejections retried this many times
    bulk_initial_backoff: float = 1.0  # seconds before the first 429 retry (doubles each time)
    bulk_chunk_size: int = 500  # documents per _bulk request
    http_compress: bool = True  # gzip request bodies (vectors in JSON compress about 2x)

    def __post_init__(self) -> None:
        if self.user and self.api_key:
            raise StoreError(
                f"OpenSearch at {self.url}: both a user/password and an API key are set; give only one"
            )
        if self.password and not self.user:
            raise StoreError(f"OpenSearch at {self.url}: a password is set but no user (FGPLUGIN_OPENSEARCH_USER)")

    def __repr__(self) -> str:
        auth = "api_key=***" if self.api_key else (f"user={self.user!r}, password=***" if self.user else "no auth")
        return f"OpenSearchConfig(url={self.url!r}, {auth}, index={self.index!r}, verify_certs={self.verify_certs})"

    @property
    def secrets(self) -> list[str]:
        out = [s for s in (self.password, self.api_key) if s]
        if self.user and self.password:
            out.append(base64.b64encode(f"{self.user}:{self.password}".encode()).decode())
        return out

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret (longest first) replaced by ``***``."""
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            text = text.replace(s, "***")
    return text


def split_url(url: str) -> tuple[str, str | None, str | None, str | None]:
    """``https://u:p@h:9200/idx`` -> ("https://h:9200", "u", "p", "idx"). Adds http:// when no scheme."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise StoreError(f"OpenSearch URL must start with http:// or https://, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise StoreError(f"OpenSearch URL {redact_url(text)!r} names no host")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    try:
        port = parts.port
    except ValueError:
        raise StoreError(f"OpenSearch URL {redact_url(text)!r} has a bad port") from None
    netloc = host + (f":{port}" if port else "")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    path = parts.path.strip("/") or None
    return urlunsplit((parts.scheme, netloc, "", "", "")), user, password, path


def redact_url(url: str) -> str:
    """The URL without user info (for messages)."""
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


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
    **overrides: Any,
) -> OpenSearchConfig:
    """Resolve the settings (URL > env > file > defaults, per setting); see the module docstring."""
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
        index=index or url_index or pick("index") or DEFAULT_INDEX,
    )
    for key, conv in (("timeout", float), ("retry_total_s", float)):
        v = pick(key)
        if v is not None:
            try:
                kw[key] = conv(v)
            except (TypeError, ValueError):
                raise StoreError(f"{where}: {key} must be a number, got {v!r}") from None
    kw.update(overrides)
    return OpenSearchConfig(**kw)


def make_client(cfg: OpenSearchConfig) -> Any:
    """An ``opensearchpy.OpenSearch`` for ``cfg``. Transport retries are off: the store retries itself
    with backoff and a bounded total wait (``OpenSearchStore.call``)."""
    from opensearchpy import OpenSearch

    headers = {"Authorization": f"ApiKey {cfg.api_key}"} if cfg.api_key else None
    kwargs: dict[str, Any] = dict(
        hosts=[cfg.url],
        http_auth=(cfg.user, cfg.password or "") if cfg.user else None,
        headers=headers,
        timeout=cfg.timeout,
        max_retries=0,
        retry_on_timeout=False,
        http_compress=cfg.http_compress,
    )
    if cfg.url.startswith("https://"):
        kwargs.update(use_ssl=True, verify_certs=cfg.verify_certs, ssl_show_warn=cfg.verify_certs)
        if cfg.ca_certs:
            kwargs["ca_certs"] = cfg.ca_certs
    return OpenSearch(**kwargs)


def describe_cause(exc: BaseException, cfg: OpenSearchConfig | None = None) -> str:
    """A short, secret-free cause for an opensearch-py exception."""
    from opensearchpy import exceptions as ex

    if isinstance(exc, ex.ConnectionTimeout):
        text = "timed out"
    elif isinstance(exc, ex.SSLError):
        text = "TLS error (check FGPLUGIN_OPENSEARCH_CA_CERTS / VERIFY_CERTS)"
    elif isinstance(exc, ex.ConnectionError):
        m = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", str(exc.info) if exc.info is not None else str(exc))
        text = f"cannot connect ({m.group(1).strip()})" if m else "cannot connect"
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
