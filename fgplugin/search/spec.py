"""QuerySpec: one weighted multi-attribute similarity query with metadata filters.

Score = sum over chosen attributes a of w_a * cos(q_a, x_a). Every store executes the same spec with
the same semantics (filters, score, tie-break on id ascending), and ``fgplugin.query.opensearch``
compiles it to an OpenSearch request body.

Filters are a small tree: Term, Terms, Range, Exists, and Bool(must, should, must_not). A list of
filters at the top level means "all of them" (AND). ``parse_filter`` reads the CLI syntax:

    category=dress          Term
    category=dress,skirt    Terms (any of)
    brand!=acme             Bool(must_not=[Term])
    price<100  price<=100  price>20  price>=20     Range
    has:brand               Exists
    !has:brand              Bool(must_not=[Exists])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ..catalog import coerce
from ..errors import QueryError
from ..schema import AttributeSchema

MODES = ("exact", "ann", "ann+rescore")
# Weights are relative; past this a weighted sum can overflow float32 scores (and inf is not JSON).
MAX_WEIGHT = 1e6


@dataclass(frozen=True)
class Term:
    field: str
    value: Any


@dataclass(frozen=True)
class Terms:
    field: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    field: str
    gt: Any = None
    gte: Any = None
    lt: Any = None
    lte: Any = None

    def __post_init__(self) -> None:
        if all(v is None for v in (self.gt, self.gte, self.lt, self.lte)):
            raise QueryError(f"range filter on {self.field!r} has no bound")


@dataclass(frozen=True)
class Exists:
    field: str


@dataclass(frozen=True)
class Bool:
    """must: all match; should: at least one matches (if any given); must_not: none matches."""

    must: tuple["Filter", ...] = ()
    should: tuple["Filter", ...] = ()
    must_not: tuple["Filter", ...] = ()


Filter = Union[Term, Terms, Range, Exists, Bool]


@dataclass
class QuerySpec:
    """What to search for. Exactly one reference: ``like_id``, ``image`` or ``vectors``."""

    attributes: dict[str, float]
    like_id: str | None = None
    image: str | bytes | None = None
    vectors: dict[str, np.ndarray] | None = None
    filters: list[Filter] = field(default_factory=list)
    k: int = 20
    mode: str = "exact"
    ef_search: int | None = None
    rescore_window: int | None = None  # ann+rescore: candidates rescored exactly (default 5*k)
    exclude_self: bool = True  # drop like_id from its own results

    def validate(self, schema: AttributeSchema, dims: Mapping[str, int] | None = None) -> "QuerySpec":
        """Check the spec against a schema (and vector sizes); raises QueryError / UnknownAttributeError."""
        if not self.attributes:
            raise QueryError(f"no attribute chosen; pick one or more of: {', '.join(schema.names)}")
        schema.check_names(self.attributes)
        for a, w in self.attributes.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= MAX_WEIGHT:
                raise QueryError(f"weight of {a!r} is {w!r}; weights must be numbers from 0 to {MAX_WEIGHT:g}")
        if sum(self.attributes.values()) <= 0:
            raise QueryError("at least one weight must be > 0")
        refs = [self.like_id is not None, self.image is not None, self.vectors is not None]
        if sum(refs) != 1:
            raise QueryError("give exactly one reference: a catalog id, an image, or raw vectors")
        if self.vectors is not None:
            missing = [a for a in self.attributes if a not in self.vectors]
            if missing:
                raise QueryError(f"raw vectors missing for attribute(s): {', '.join(missing)}")
            for a in self.attributes:
                v = np.asarray(self.vectors[a], dtype=np.float32)
                if v.ndim != 1 or not np.all(np.isfinite(v)):
                    raise QueryError(f"vector for {a!r} must be a finite 1-D list of numbers")
                if dims is not None and v.shape[0] != dims[a]:
                    raise QueryError(f"vector for {a!r} has {v.shape[0]} numbers; the model gives {dims[a]}")
                if not np.any(v):
                    raise QueryError(f"vector for {a!r} is all zeros; cosine similarity is undefined")
        if not isinstance(self.k, int) or not 1 <= self.k <= 10_000:
            raise QueryError(f"k must be an integer in 1..10000, got {self.k!r}")
        if self.mode not in MODES:
            raise QueryError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        return self


@dataclass
class Hit:
    id: str
    score: float  # sum of w_a * cos_a
    cosines: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    image: str | None = None  # the document's image source, where the store keeps it (for display)


@dataclass
class SearchResult:
    hits: list[Hit]
    mode: str  # the mode actually executed (a store without ANN says "exact")
    total_candidates: int | None = None  # documents that passed the filters, where known
    note: str = ""
    plan: str = ""  # how the store ran the query (candidate generation, re-scoring), for --explain


# -- CLI syntax ---------------------------------------------------------------------------------
_ATTR_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=\s*(.+?))?\s*$")
_FILTER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|!=|=|<|>)\s*(.*?)\s*$")


def parse_attribute(text: str) -> tuple[str, float]:
    """``sleeve_length`` -> (sleeve_length, 1.0); ``neckline=0.5`` -> (neckline, 0.5)."""
    m = _ATTR_RE.match(text)
    if not m:
        raise QueryError(f"cannot read attribute {text!r}; write NAME or NAME=WEIGHT")
    name, w = m.group(1), m.group(2)
    if w is None:
        return name, 1.0
    try:
        weight = float(w)
    except ValueError:
        raise QueryError(f"weight in {text!r} is not a number") from None
    if not 0 <= weight <= MAX_WEIGHT:  # NaN fails too; inf would make every score infinite
        raise QueryError(f"weight in {text!r} must be a number from 0 to {MAX_WEIGHT:g}")
    return name, weight


def parse_attributes(texts: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in texts:
        name, w = parse_attribute(t)
        if name in out:
            raise QueryError(f"attribute {name!r} given twice")
        out[name] = w
    return out


def parse_filter(text: str) -> Filter:
    s = text.strip()
    if s.startswith("!has:"):
        return Bool(must_not=(Exists(_field(s[5:], text)),))
    if s.startswith("has:"):
        return Exists(_field(s[4:], text))
    m = _FILTER_RE.match(s)
    if not m:
        raise QueryError(
            f"cannot read filter {text!r}; write FIELD=VALUE, FIELD=A,B, FIELD!=VALUE, "
            "FIELD<N, FIELD<=N, FIELD>N, FIELD>=N, has:FIELD or !has:FIELD"
        )
    f, op, raw = m.groups()
    if raw == "":
        raise QueryError(f"filter {text!r} has no value")
    if op in ("<", "<=", ">", ">="):
        key = {"<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}[op]
        return Range(f, **{key: raw})
    if op == "=":
        parts = [p.strip() for p in raw.split(",")]
        if len(parts) > 1:
            if any(p == "" for p in parts):
                raise QueryError(f"filter {text!r} has an empty value in its list")
            return Terms(f, tuple(parts))
        return Term(f, raw)
    return Bool(must_not=(Term(f, raw),))


def _field(name: str, text: str) -> str:
    name = name.strip()
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", name):
        raise QueryError(f"bad field name in filter {text!r}")
    return name


def filter_fields(filters: Sequence[Filter]) -> set[str]:
    out: set[str] = set()
    for f in filters:
        if isinstance(f, Bool):
            out |= filter_fields(f.must) | filter_fields(f.should) | filter_fields(f.must_not)
        else:
            out.add(f.field)
    return out


def coerce_filters(filters: Sequence[Filter], types: Mapping[str, str]) -> list[Filter]:
    """Type the filter values by the metadata field types (price<100 -> 100.0); unknown field -> error."""
    def one(f: Filter) -> Filter:
        if isinstance(f, Bool):
            return Bool(tuple(map(one, f.must)), tuple(map(one, f.should)), tuple(map(one, f.must_not)))
        if f.field not in types:
            known = ", ".join(sorted(types)) or "(none)"
            raise QueryError(f"filter on unknown field {f.field!r}; filterable fields: {known}")
        t = types[f.field]

        def c(v: Any) -> Any:
            try:
                return coerce(v, t)
            except ValueError as e:
                raise QueryError(f"filter on {f.field!r}: {e} (field type {t})") from None

        if isinstance(f, Term):
            return Term(f.field, c(f.value))
        if isinstance(f, Terms):
            return Terms(f.field, tuple(c(v) for v in f.values))
        if isinstance(f, Range):
            if t in ("keyword", "text"):
                # As text "5" > "10": a range on a column of numbers read as text would answer wrongly.
                raise QueryError(
                    f"range filter on {f.field!r} needs a number or date field, but {f.field!r} is stored as text "
                    f"({t}), which compares \"5\" > \"10\"; declare it under [metadata] in the schema (e.g. "
                    f"{f.field} = \"float\") and index again")
            if t not in ("integer", "float", "date"):
                raise QueryError(f"range filter on {f.field!r} needs a number or date field (it is {t})")
            return Range(f.field, *(None if v is None else c(v) for v in (f.gt, f.gte, f.lt, f.lte)))
        return f

    return [one(f) for f in filters]


def combined_query_vector(spec: QuerySpec, order: Sequence[str], vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    """concat over ``order`` of w_a * q_a (unit q_a), zeros for attributes not asked for.

    Scored by inner product against concat(x_a) of unit vectors this is exactly sum w_a cos(q_a, x_a):
    the ANN query vector for the concatenated ``emb_all`` field.
    """
    parts = []
    for a in order:
        v = np.asarray(vectors[a], dtype=np.float32)
        if a in spec.attributes:
            n = float(np.linalg.norm(v))
            parts.append(spec.attributes[a] * v / n if n > 0 else np.zeros_like(v))
        else:
            parts.append(np.zeros_like(v))
    return np.concatenate(parts)
