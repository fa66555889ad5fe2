"""Weighted multi-attribute similarity queries: the spec, its CLI syntax, and compilers."""

from .spec import (Bool, Exists, Filter, Hit, QuerySpec, Range, SearchResult, Term, Terms, combined_query_vector,
                   coerce_filters, parse_attribute, parse_attributes, parse_filter)

__all__ = [
    "Bool", "Exists", "Filter", "Hit", "QuerySpec", "Range", "SearchResult", "Term", "Terms",
    "combined_query_vector", "coerce_filters", "parse_attribute", "parse_attributes", "parse_filter",
]
