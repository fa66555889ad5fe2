"""Weighted multi-attribute similarity queries: the spec, its CLI syntax, and compilers."""

from .spec import (Bool, Exists, Filter, Hit, QuerySpec, Range, SearchResult, Term, Terms, combined_query_vector,
                   coerce_filters, parse_attribute, parse_attributes, parse_filter)

__all__ = [
    "Bool", "Exists", "Filter", "Hit", "QuerySpec", "Range", "SearchResult", "Term", "Terms",
    "combined_query_vector", "coerce_filters", "parse_attribute", "parse_attributes", "parse_filter",
]


def __getattr__(name: str):
    # to_opensearch lives with the OpenSearch code; imported lazily so fgplugin.opensearch.compile (which
    # imports this package's spec module) and this package never import each other half-initialised.
    if name == "to_opensearch":
        from ..opensearch.compile import to_opensearch

        return to_opensearch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__.append("to_opensearch")
