"""The ML Commons cluster settings the connector needs, and which of them a cluster still lacks.

They are printed with a warning, never applied silently (``--cluster-settings`` applies them):
``plugins.ml_commons.trusted_connector_endpoints_regex`` (this REPLACES the list),
``plugins.ml_commons.connector.private_ip_enabled`` for a private or loopback encoder address, and
``plugins.ml_commons.only_run_on_ml_node: false`` on clusters without ML nodes.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..store import OpenSearchStore
from .inputs import WiringOptions

TRUSTED_REGEX = "plugins.ml_commons.trusted_connector_endpoints_regex"
PRIVATE_IP = "plugins.ml_commons.connector.private_ip_enabled"
ONLY_ML_NODE = "plugins.ml_commons.only_run_on_ml_node"


def endpoint_regex(serve_url: str) -> str:
    """A trusted-endpoint regex (Java syntax; also valid Python) matching exactly this service's URLs."""
    return "^" + re.escape(serve_url) + "/.*$"


def is_private_host(host: str) -> bool:
    """Loopback, private, link-local or a bare/docker-style name (ML Commons' SSRF guard refuses those)."""
    try:
        addrs = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        if "." not in host or host.endswith((".local", ".internal", ".lan", ".localhost")):
            return True
        try:
            addrs = [ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, None)[:4]]
        except OSError:
            return True  # unresolvable here: likely a private DNS name
    return any(a.is_private or a.is_loopback or a.is_link_local for a in addrs)


def cluster_settings_body(options: WiringOptions) -> dict[str, Any]:
    s: dict[str, Any] = {
        TRUSTED_REGEX: [endpoint_regex(options.serve_url)],
        ONLY_ML_NODE: False,
    }
    if is_private_host(urlsplit(options.serve_url).hostname or ""):
        s[PRIVATE_IP] = True
    return {"persistent": s}


def cluster_settings_warnings(options: WiringOptions) -> list[str]:
    body = cluster_settings_body(options)["persistent"]
    out = [
        f"{TRUSTED_REGEX} REPLACES the cluster's list (the defaults allow "
        "well-known hosted model APIs); merge it with the entries you still need",
        f"{ONLY_ML_NODE}=false lets remote models run on data nodes (clusters without ML nodes)",
    ]
    if PRIVATE_IP in body:
        out.append(f"{urlsplit(options.serve_url).hostname} is a private/loopback address: "
                   f"{PRIVATE_IP}=true turns off ML Commons' SSRF guard for "
                   "private addresses on every connector")
    return out


def _trusted(regexes: Any, url: str) -> bool:
    if isinstance(regexes, str):
        regexes = [regexes]
    for r in regexes or []:
        try:
            if re.fullmatch(r, url):
                return True
        except re.error:
            continue
    return False


def current_cluster_settings(store: OpenSearchStore) -> dict[str, Any]:
    res = store.call("reading cluster settings", store.client.cluster.get_settings, include_defaults=True,
                     flat_settings=True)
    merged: dict[str, Any] = {}
    for scope in ("defaults", "persistent", "transient"):  # later scopes win, as on the server
        merged.update(res.get(scope) or {})
    return merged


def missing_cluster_settings(current: Mapping[str, Any], options: WiringOptions) -> list[str]:
    want = cluster_settings_body(options)["persistent"]
    out = []
    regexes = current.get(TRUSTED_REGEX)
    if regexes is None:  # flat settings list arrays as key.0, key.1, ...
        regexes = [v for k, v in current.items() if k.startswith(TRUSTED_REGEX + ".")]
    if not _trusted(regexes, f"{options.serve_url}/encode"):
        out.append(TRUSTED_REGEX)
    for k, v in want.items():
        if k == TRUSTED_REGEX:
            continue
        if str(current.get(k, "")).lower() != str(v).lower():
            out.append(k)
    return out


__all__ = ["TRUSTED_REGEX", "PRIVATE_IP", "ONLY_ML_NODE", "endpoint_regex", "is_private_host",
           "cluster_settings_body", "cluster_settings_warnings", "current_cluster_settings", "missing_cluster_settings"]
