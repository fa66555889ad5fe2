"""What the generated bodies are built from besides the model card (``WiringOptions``), and what they
derive from the card: the index layout, the search pipeline's fixed query, the service's outputs and
whether queries need the query form of the vectors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ...schema import AttributeSchema
from ...search.spec import QuerySpec, parse_filter
from ...search.store import IndexLayout
from ...serve_api import CONCAT_FIELD, DEFAULT_PORT, VERSION_KEY
from ..client import DEFAULT_INDEX, parse_http_url, redact_url
from .names import WiringError

DEFAULT_SERVE_URL = f"http://localhost:{DEFAULT_PORT}"


def check_serve_url(url: str) -> str:
    """The --serve-url, checked; messages show it only through ``redact_url`` (never a password)."""
    shown = redact_url(url)
    if "://" not in str(url):
        raise WiringError(f"--serve-url must be an http(s) URL of `fgplugin serve` (e.g. {DEFAULT_SERVE_URL}); "
                          f"got {shown!r}")
    parts = parse_http_url(url, "--serve-url", WiringError)
    if parts.user is not None or parts.password is not None or parts.query is not None or parts.fragment is not None:
        raise WiringError(f"--serve-url {shown!r}: no credentials, query or fragment (use --serve-token for auth)")
    return str(url).strip().rstrip("/")


@dataclass
class WiringOptions:
    """What the generated bodies depend on besides the model card."""

    serve_url: str = DEFAULT_SERVE_URL  # how OpenSearch reaches `fgplugin serve`
    index: str = DEFAULT_INDEX  # the alias; documents go to versioned_index_name(index, version)
    token: str | None = None  # bearer token `fgplugin serve --token` expects
    attributes: dict[str, float] | None = None  # the search pipeline's fixed query (None: all, weight 1)
    filters: list[str] = field(default_factory=list)  # CLI filter syntax, for the search pipeline query
    k: int = 20
    mode: str = "exact"
    metadata_types: dict[str, str] = field(default_factory=dict)  # index metadata fields (returned in _source)
    max_connections: int = 32  # connector -> service connections

    def __post_init__(self) -> None:
        self.serve_url = check_serve_url(self.serve_url)


def needs_query_form(card: Mapping[str, Any]) -> bool:
    """Whether queries need vectors other than the stored ones (posterior = prob: the slack dropped)."""
    return bool(card.get("query_slack", False))  # cards before it: never


def query_form_of(card: Mapping[str, Any]) -> str:
    """The /encode form the search pipeline's model answers in."""
    return "query" if needs_query_form(card) else "stored"


def output_names(card: Mapping[str, Any]) -> list[str]:
    """The fields a single-image ``/encode`` answer carries (what output_map may read)."""
    return [VERSION_KEY, *card["attributes"], CONCAT_FIELD]


def layout_for(card: Mapping[str, Any], metadata_types: Mapping[str, str] | None = None) -> IndexLayout:
    schema = AttributeSchema.from_dict(card["schema"], source="model card")
    return IndexLayout(schema, {a: int(card["dims"][a]) for a in schema.names}, dict(metadata_types or {}),
                       str(card["version"]), query_slack=needs_query_form(card))


def query_spec(card: Mapping[str, Any], options: WiringOptions) -> QuerySpec:
    """The fixed query of the search pipeline (vectors filled later)."""
    names = list(card["attributes"])
    weights = dict(options.attributes) if options.attributes else {a: 1.0 for a in names}
    unknown = [a for a in weights if a not in names]
    if unknown:
        raise WiringError(f"unknown attribute(s) {', '.join(unknown)}; the model has {', '.join(names)}")
    return QuerySpec(attributes=weights, vectors={}, filters=[parse_filter(f) for f in options.filters],
                     k=options.k, mode=options.mode)


__all__ = ["DEFAULT_SERVE_URL", "WiringOptions", "check_serve_url", "needs_query_form", "query_form_of",
           "output_names", "layout_for", "query_spec"]
