"""The attribute schema: which attributes exist, their values, and which value means "not visible".

Everything downstream (model heads, index fields, query validation) is driven by a schema; no
attribute name is hard-coded anywhere else. A schema file is TOML or JSON::

    name = "my-catalog"
    [attributes.sleeve_length]
    values = ["sleeveless", "short", "elbow", "long", "invisible"]
    not_visible = "invisible"
    description = "Length of the sleeves"
    region = "arms"            # optional hint, used by the generator and reports

    [metadata]                 # optional declared metadata types (else inferred from the catalog)
    price = "float"
    in_stock = "boolean"
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import FgpluginError, SchemaError, UnknownAttributeError

METADATA_TYPES = ("keyword", "text", "float", "integer", "boolean", "date")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    description: str = ""
    not_visible: str | None = None
    region: str | None = None

    @property
    def visible_values(self) -> tuple[str, ...]:
        return tuple(v for v in self.values if v != self.not_visible)

    @property
    def num_classes(self) -> int:
        """Number of visible values: the size of a classification head."""
        return len(self.visible_values)

    def class_index(self, value: str | None) -> int:
        """Index among visible values, or -1 for missing / not visible."""
        if value is None or value == self.not_visible:
            return -1
        try:
            return self.visible_values.index(value)
        except ValueError:
            raise SchemaError(
                f"attribute {self.name!r} has no value {value!r}; values: {', '.join(self.values)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"values": list(self.values)}
        if self.description:
            d["description"] = self.description
        if self.not_visible is not None:
            d["not_visible"] = self.not_visible
        if self.region:
            d["region"] = self.region
        return d


@dataclass(frozen=True)
class AttributeSchema:
    attributes: tuple[Attribute, ...]
    name: str = "fgplugin"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.attributes:
            raise SchemaError("a schema needs at least one attribute")
        seen: set[str] = set()
        for a in self.attributes:
            if not _NAME_RE.match(a.name):
                raise SchemaError(
                    f"attribute name {a.name!r} must be lower-case letters, digits and _ "
                    "(it becomes an index field name)"
                )
            if a.name in seen:
                raise SchemaError(f"attribute {a.name!r} is declared twice")
            seen.add(a.name)
            if len(set(a.values)) != len(a.values):
                raise SchemaError(f"attribute {a.name!r} lists a value twice")
            if a.not_visible is not None and a.not_visible not in a.values:
                raise SchemaError(
                    f"attribute {a.name!r}: not_visible value {a.not_visible!r} is not among its values"
                )
            if len(a.visible_values) < 2:
                raise SchemaError(f"attribute {a.name!r} needs at least two visible values")
        for k, t in self.metadata.items():
            if t not in METADATA_TYPES:
                raise SchemaError(
                    f"metadata field {k!r} has type {t!r}; use one of {', '.join(METADATA_TYPES)}"
                )
            if k in seen:
                raise SchemaError(f"{k!r} is both an attribute and a metadata field")

    # -- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def __len__(self) -> int:
        return len(self.attributes)

    def __iter__(self):
        return iter(self.attributes)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise UnknownAttributeError(name, self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownAttributeError(name, self.names) from None

    def check_names(self, names: Iterable[str]) -> list[str]:
        """Validate attribute names (raises UnknownAttributeError) and return them as a list."""
        out = list(names)
        for n in out:
            self.index(n)
        return out

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "attributes": {a.name: a.to_dict() for a in self}}
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "schema") -> "AttributeSchema":
        if not isinstance(d, dict) or "attributes" not in d:
            raise SchemaError(f"{source}: missing [attributes] table")
        raw = d["attributes"]
        if not isinstance(raw, dict):
            raise SchemaError(f"{source}: [attributes] must map attribute names to tables")
        attrs = []
        for name, spec in raw.items():
            if isinstance(spec, list):  # short form: name = ["a", "b"]
                spec = {"values": spec}
            if not isinstance(spec, dict) or not isinstance(spec.get("values"), list):
                raise SchemaError(f"{source}: attribute {name!r} needs a list of values")
            unknown = set(spec) - {"values", "description", "not_visible", "region"}
            if unknown:
                raise SchemaError(f"{source}: attribute {name!r} has unknown keys {sorted(unknown)}")
            attrs.append(
                Attribute(
                    name=name,
                    values=tuple(str(v) for v in spec["values"]),
                    description=str(spec.get("description", "")),
                    not_visible=spec.get("not_visible"),
                    region=spec.get("region"),
                )
            )
        meta = d.get("metadata", {}) or {}
        if not isinstance(meta, dict):
            raise SchemaError(f"{source}: [metadata] must map field names to types")
        return cls(attributes=tuple(attrs), name=str(d.get("name", "fgplugin")), metadata=dict(meta))

    @classmethod
    def load(cls, path: str | Path) -> "AttributeSchema":
        p = Path(path)
        if not p.is_file():
            raise SchemaError(f"{p}: schema file not found")
        text = p.read_text(encoding="utf-8")
        try:
            d = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise SchemaError(f"{p}: cannot parse: {e}") from None
        return cls.from_dict(d, source=str(p))

    def save(self, path: str | Path) -> Path:
        """Write as JSON (.json) or TOML (any other suffix)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() == ".json":
            p.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        else:
            p.write_text(_to_toml(self.to_dict()), encoding="utf-8")
        return p

    def fingerprint(self) -> str:
        """Stable short hash of the schema: exports and indices record it to refuse mismatches."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]


# -- the one schema-compatibility rule ---------------------------------------------------------------
# Models, exports, checkpoints, catalogs and indices each record the schema they were built for; every
# place that joins two of them asks here, so the refusal reads the same everywhere.
def schema_difference(have: AttributeSchema, want: AttributeSchema) -> str | None:
    """What differs between two schemas (attributes only in one, changed values), None when they are the
    same schema (equal fingerprints)."""
    if have.fingerprint() == want.fingerprint():
        return None
    a, b = set(have.names), set(want.names)
    parts = []
    if a - b:
        parts.append(f"only in the first: {', '.join(sorted(a - b))}")
    if b - a:
        parts.append(f"only in the second: {', '.join(sorted(b - a))}")
    changed = [n for n in sorted(a & b) if have[n].to_dict() != want[n].to_dict()]
    if changed:
        parts.append(f"values differ for: {', '.join(changed)}")
    if not parts:
        parts.append("attribute order, schema name or metadata fields differ")
    return "; ".join(parts)


def _described(schema: AttributeSchema) -> str:
    return f"schema {schema.name!r} (fingerprint {schema.fingerprint()}, attributes {', '.join(schema.names)})"


def require_same_schema(have: AttributeSchema, want: AttributeSchema, *, have_is: str, want_is: str,
                        error: type[FgpluginError] = SchemaError, hint: str = "") -> None:
    """Refuse (``error``) joining ``have_is`` (built for ``have``) with ``want_is`` (which uses ``want``)
    unless both use the same schema; the message names both schemas and what differs.

    e.g. ``require_same_schema(encoder.schema, catalog.schema, have_is=f"the model {path}",
    want_is=f"the catalog {catalog.path}", error=ModelCardError)``."""
    diff = schema_difference(have, want)
    if diff is None:
        return
    diff = diff.replace("the first", "the former").replace("the second", "the latter")
    raise error(f"{have_is} was built for {_described(have)}, but {want_is} uses {_described(want)}: {diff}"
                + (f"; {hint}" if hint else ""))


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    # Metadata field names come from catalog columns and may hold spaces or dots: quote those.
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _to_toml(d: dict[str, Any]) -> str:
    lines = [f"name = {_toml_value(d['name'])}", ""]
    for name, spec in d["attributes"].items():
        lines.append(f"[attributes.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
        lines.append("")
    if d.get("metadata"):
        lines.append("[metadata]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d["metadata"].items()]
        lines.append("")
    return "\n".join(lines)
