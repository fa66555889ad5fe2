"""Catalog manifests (JSONL or CSV): one row per item with ``id``, ``image``, attribute labels and metadata.

- ``image`` is a path relative to the manifest's folder, an absolute path, or an http(s) URL.
- A column named after a schema attribute holds that attribute's label (a value, or empty/missing).
  JSONL rows may instead nest labels under ``"labels": {...}``.
- Every other column is free metadata (brand, price, in_stock, ...). Its type comes from the schema's
  ``[metadata]`` table or is inferred from the values; it later becomes a filterable index field.

Loading checks every row and reports every problem (row number, id, cause), not only the first.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from . import images
from .errors import CatalogError, FgpluginError, ImageError
from .schema import METADATA_TYPES, AttributeSchema

RESERVED = ("id", "image", "labels")
_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ][0-9:.]+(Z|[+-]\d{2}:?\d{2})?)?$")
_TRUE = {"true", "yes", "1"}
UNREADABLE = "unreadable"  # Problem.kind of a row that could not be read as a record at all
_FALSE = {"false", "no", "0"}


@dataclass(frozen=True)
class Problem:
    row: int | None  # 1-based data row (JSONL line / CSV record); None for whole-file problems
    item_id: str | None
    cause: str
    kind: str = "invalid"

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row is not None else "catalog"
        if self.item_id is not None:
            where += f" (id {self.item_id!r})"
        return f"{where}: {self.cause}"


@dataclass
class CatalogItem:
    id: str
    image: str
    labels: dict[str, str | None]
    metadata: dict[str, Any]
    row: int = 0

    def to_row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "image": self.image}
        out.update({k: v for k, v in self.labels.items()})
        out.update(self.metadata)
        return out


@dataclass
class Catalog:
    path: Path
    schema: AttributeSchema
    items: list[CatalogItem]
    metadata_types: dict[str, str]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings that invalidate no row (e.g. a type inferred as text)

    @property
    def complete(self) -> bool:
        """Every row of the file was read and identified: no row is unreadable or without an id. Only
        then does "not in the catalog" mean "gone from the catalog" (what ``--prune`` acts on)."""
        return not any(p.kind == UNREADABLE or p.item_id is None for p in self.problems)

    def unidentified(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == UNREADABLE or p.item_id is None]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[CatalogItem]:
        return iter(self.items)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def by_id(self) -> dict[str, CatalogItem]:
        return {it.id: it for it in self.items}

    def image_source(self, item: CatalogItem) -> str:
        return images.resolve(item.image, self.base_dir)

    def label_matrix(self) -> np.ndarray:
        """int64 [N, A]: class index among each attribute's visible values, -1 if missing/not visible."""
        out = np.full((len(self.items), len(self.schema)), -1, dtype=np.int64)
        for i, it in enumerate(self.items):
            for j, a in enumerate(self.schema):
                out[i, j] = a.class_index(it.labels.get(a.name))
        return out

    def subset(self, ids: Iterable[str]) -> "Catalog":
        lookup = self.by_id()
        return Catalog(self.path, self.schema, [lookup[i] for i in ids], dict(self.metadata_types), notes=list(self.notes))

    def summary(self) -> dict[str, Any]:
        """Counts per attribute value (plus missing / not visible) and problems, for ``data check``."""
        counts: dict[str, dict[str, int]] = {}
        for a in self.schema:
            c = Counter(it.labels.get(a.name) for it in self.items)
            counts[a.name] = {v: c.get(v, 0) for v in a.values}
            counts[a.name]["(missing)"] = c.get(None, 0)
        return {
            "catalog": str(self.path),
            "rows": len(self.items),
            "attributes": counts,
            "metadata_types": dict(self.metadata_types),
            "problems": [str(p) for p in self.problems],
            "notes": list(self.notes),
        }


# -- reading --------------------------------------------------------------------------------------
_BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16", b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32"}
_ID_HINT = re.compile(r'"id"\s*:\s*"?([^",}\s]+)')  # names the item of a line that is not valid JSON


def _lines(path: Path) -> Iterator[tuple[int, str, int | None]]:
    """(byte offset of the line, the line decoded, offset of its first non-UTF-8 byte or None).

    Lines are decoded one by one so that a bad byte costs its row, not the file; a UTF-8 byte-order
    mark is dropped (spreadsheets write one, and it would rename the first column to "\\ufeffid"),
    and a UTF-16/32 file is refused as a whole: every line of it would be garbage."""
    with path.open("rb") as f:
        offset = 0
        for n, raw in enumerate(f):
            if n == 0:
                for bom, name in sorted(_BOMS.items(), key=lambda kv: -len(kv[0])):
                    if raw.startswith(bom):
                        raise CatalogError([Problem(None, None, f"{path}: the file is {name} encoded; save it as "
                                                    "UTF-8", kind=UNREADABLE)])
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw, offset = raw[3:], 3
            try:
                yield offset, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield offset, raw.decode("utf-8", errors="replace"), offset + e.start
            offset += len(raw)


def _not_utf8(at: int, path: Path) -> str:
    with path.open("rb") as f:
        f.seek(at)
        byte = f.read(1)
    return f"byte 0x{byte.hex()} at file offset {at} is not UTF-8 (save the catalog as UTF-8)"


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    n = 0
    for _, line, bad_at in _lines(path):
        if not line.strip():
            continue
        n += 1
        hint = _ID_HINT.search(line)
        guess = hint.group(1) if hint else None
        if bad_at is not None:
            yield n, Problem(n, guess, _not_utf8(bad_at, path), kind=UNREADABLE)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, Problem(n, guess, f"not valid JSON ({e.msg} at column {e.colno})", kind=UNREADABLE)
            continue
        if not isinstance(row, dict):
            yield n, Problem(n, None, f"a JSONL row must be an object, not {type(row).__name__}", kind=UNREADABLE)
            continue
        yield n, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    physical: list[tuple[int, int | None]] = []  # per line read so far: (byte offset, first bad byte)

    def feed() -> Iterator[str]:
        for offset, line, bad_at in _lines(path):
            physical.append((offset, bad_at))
            yield line

    # strict: a stray or unclosed quote is an error at its row, instead of silently swallowing the
    # rows after it into one cell (which would read the file as fewer rows than it has).
    reader = csv.reader(feed(), strict=True)
    header: list[str] | None = None
    id_at: int | None = None
    n, last_line = 0, 0
    while True:
        first_line = last_line + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if header is None:
                raise CatalogError([Problem(None, None, f"{path}: the header line cannot be read as CSV ({e})",
                                            kind=UNREADABLE)]) from None
            n += 1
            last_line = reader.line_num
            cause = f"not valid CSV at line {first_line}" + (f"-{last_line}" if last_line > first_line else "")
            yield n, Problem(n, None, f"{cause} ({e}; a quote inside a cell must be doubled)", kind=UNREADABLE)
            continue
        last_line = reader.line_num
        bad = next((b for _, b in physical[first_line - 1:last_line] if b is not None), None)
        if header is None:
            if bad is not None:
                raise CatalogError([Problem(None, None, f"{path}: header: {_not_utf8(bad, path)}", kind=UNREADABLE)])
            header = cells
            dup = sorted({c for c in header if header.count(c) > 1})
            if dup:
                raise CatalogError([Problem(None, None, f"{path}: duplicate header column(s) {', '.join(map(repr, dup))}",
                                            kind=UNREADABLE)])
            missing = [c for c in ("id", "image") if c not in header]
            if missing:  # e.g. a damaged header that swallowed the first row: every row would look gone
                raise CatalogError([Problem(None, None, f"{path}: the header has no {' or '.join(map(repr, missing))} "
                                            f"column (it reads {', '.join(map(repr, header[:8]))})", kind=UNREADABLE)])
            id_at = header.index("id")
            continue
        if not cells:  # a blank line
            continue
        n += 1
        rid = cells[id_at] if id_at is not None and id_at < len(cells) else None
        if bad is not None:
            yield n, Problem(n, rid or None, _not_utf8(bad, path), kind=UNREADABLE)
            continue
        if len(cells) != len(header):
            more_or_fewer = "more" if len(cells) > len(header) else "fewer"
            yield n, Problem(n, rid or None, f"{len(cells)} cells, {more_or_fewer} than the header's {len(header)} "
                             f"columns (line {first_line})", kind=UNREADABLE)
            continue
        yield n, {k: (v if v != "" else None) for k, v in zip(header, cells)}


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise CatalogError([Problem(None, None, f"{path}: unsupported catalog format {suffix!r} (use .jsonl or .csv)")])


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(_INT_RE.match(v)))


def _is_float(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, str) and bool(_FLOAT_RE.match(v)))


def infer_type(values: list[Any]) -> str:
    """The metadata type a column's cells suggest (None cells ignored; no cells: keyword)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "keyword"
    if all(isinstance(v, bool) or (isinstance(v, str) and v.lower() in ("true", "false")) for v in vals):
        return "boolean"
    if all(map(_is_int, vals)):
        return "integer"
    if all(map(_is_float, vals)):
        return "float"
    if all(isinstance(v, str) and _DATE_RE.match(v) for v in vals):
        return "date"
    return "keyword"


def _mostly_numbers_note(name: str, cells: list[tuple[int, str | None, Any]]) -> str | None:
    """A column inferred as text although most of its values are numbers ("n/a" among ratings): say so,
    naming the rows that made it text, since range filters on it are then refused (text would compare
    "5" > "10")."""
    vals = [c for c in cells if c[2] is not None]
    odd = [c for c in vals if not _is_float(c[2])]
    if not vals or len(odd) > 0.2 * len(vals) or len(odd) == len(vals):
        return None
    shown = ", ".join(f"row {n} {v!r}" for n, _, v in odd[:3]) + (f" (+{len(odd) - 3} more)" if len(odd) > 3 else "")
    return (f"metadata {name!r} is stored as text: {len(vals) - len(odd)} of its {len(vals)} values are numbers, "
            f"but {shown} {'is' if len(odd) == 1 else 'are'} not; range filters on it are refused. Declare "
            f"{name} = \"float\" under [metadata] in the schema to store numbers (those rows are then reported "
            "as invalid), or blank the odd values")


def coerce(value: Any, type_: str) -> Any:
    """Convert a raw cell to the metadata type; raises ValueError with a readable cause."""
    if value is None:
        return None
    if type_ in ("keyword", "text"):
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a single {type_} value, got {type(value).__name__}")
        return str(value)
    if type_ == "boolean":
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if type_ == "integer":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INT_RE.match(value.strip()):
            return int(value)
        raise ValueError(f"{value!r} is not an integer")
    if type_ == "float":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if not math.isfinite(f):  # NaN/inf would break JSON output and range filters
            raise ValueError(f"{value!r} is not a finite number")
        return f
    if type_ == "date":
        s = str(value)
        try:
            dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO date") from None
        return s
    raise ValueError(f"unknown metadata type {type_!r}")


def load_catalog(
    path: str | Path,
    schema: AttributeSchema,
    *,
    strict: bool = True,
    check_images: bool = False,
    limits: images.ImageLimits = images.DEFAULT_LIMITS,
) -> Catalog:
    """Load and validate a manifest.

    strict=True raises :class:`CatalogError` listing every problem; strict=False keeps the valid rows
    and returns the problems on ``catalog.problems`` (what ``data check`` and the index worker use).
    check_images=True also opens every local image (URLs are only checked for their scheme).
    """
    # Absolute, so that relative image paths resolve against the catalog's folder whatever the working
    # directory of the run (stored image sources and fingerprints must not depend on it).
    p = Path(os.path.abspath(Path(path).expanduser()))  # abspath also folds "..", unlike Path.absolute
    if not p.is_file():
        raise CatalogError([Problem(None, None, f"{path}: catalog file not found", kind="missing")])
    problems: list[Problem] = []
    raw: list[tuple[int, dict[str, Any]]] = []
    for n, row in _read_rows(p):
        if isinstance(row, Problem):
            problems.append(row)
        else:
            raw.append((n, row))

    meta_types, notes = _metadata_types(schema, raw)
    reader = _RowReader(schema, meta_types, p.parent, check_images, limits)
    items: list[CatalogItem] = []
    for n, row in raw:
        got = reader.read(n, row)
        if isinstance(got, CatalogItem):
            items.append(got)
        else:
            problems.extend(got)

    if strict and problems:
        raise CatalogError(problems)
    return Catalog(p, schema, items, meta_types, problems, notes)


def _metadata_types(schema: AttributeSchema, raw: list[tuple[int, dict[str, Any]]]) -> tuple[dict[str, str], list[str]]:
    """Every non-attribute column's type (declared in the schema, else inferred from its cells), and
    notes on the inferred ones that look like numbers spoilt by a few odd cells."""
    attr_names = set(schema.names)
    meta_values: dict[str, list[tuple[int, str | None, Any]]] = {}
    for n, row in raw:
        for k, v in row.items():
            if k not in RESERVED and k not in attr_names:
                meta_values.setdefault(k, []).append((n, row.get("id"), v))
    meta_types: dict[str, str] = {}
    notes: list[str] = []
    for k, cells in meta_values.items():
        meta_types[k] = schema.metadata.get(k) or infer_type([v for _, _, v in cells])
        if k not in schema.metadata and meta_types[k] == "keyword":
            note = _mostly_numbers_note(k, cells)
            if note:
                notes.append(note)
    for k, t in schema.metadata.items():
        meta_types.setdefault(k, t)
    return meta_types, notes


@dataclass
class _RowCheck:
    """One row being checked: every problem it has is kept, not only the first."""

    n: int
    item_id: str | None
    problems: list[Problem] = field(default_factory=list)

    def bad(self, cause: str, kind: str = "invalid") -> None:
        self.problems.append(Problem(self.n, self.item_id, cause, kind))


@dataclass
class _RowReader:
    """Turns the raw rows of one catalog, in order, into items or their problems."""

    schema: AttributeSchema
    meta_types: dict[str, str]
    base_dir: Path
    check_images: bool
    limits: images.ImageLimits
    seen: dict[str, int] = field(default_factory=dict)  # id -> the row it was first seen in

    def read(self, n: int, row: dict[str, Any]) -> CatalogItem | list[Problem]:
        rid = row.get("id")
        check = _RowCheck(n, None if rid is None else str(rid))
        self._check_id(check)
        image = row.get("image")
        if not image:
            check.bad("missing image")
        else:
            try:
                images.check_source(str(image))
            except ImageError as e:
                check.bad(e.cause, "bad_url")
        labels = self._labels(check, row)
        metadata = self._metadata(check, row)
        if image and self.check_images and not check.problems:
            try:
                images.load_image(str(image), base_dir=self.base_dir, limits=self.limits)
            except ImageError as e:
                check.bad(f"image {image!r}: {e.cause}", e.kind)
        if check.problems:
            return check.problems
        assert check.item_id is not None
        self.seen[check.item_id] = n
        return CatalogItem(check.item_id, str(image), labels, metadata, n)

    def _check_id(self, check: _RowCheck) -> None:
        item_id = check.item_id
        if item_id is None or item_id.strip() == "":
            check.bad("missing id")
        elif item_id != item_id.strip() or not item_id.isprintable():
            # Most likely damage or a spreadsheet's stray space rather than a new item: "unreadable", so
            # that prune does not take the clean id's document for gone.
            check.bad("the id has surrounding spaces or control characters", UNREADABLE)
        elif item_id in self.seen:
            check.bad(f"duplicate id (first seen in row {self.seen[item_id]})", "duplicate")

    def _labels(self, check: _RowCheck, row: dict[str, Any]) -> dict[str, str | None]:
        """Labels from the row's attribute columns and its nested ``labels`` object (which wins)."""
        schema = self.schema
        attr_names = set(schema.names)
        given = row.get("labels")
        labels_in: dict[str, Any] = dict(given) if isinstance(given, dict) else {}
        if given is not None and not isinstance(given, dict):  # e.g. a string or list: this row's problem
            check.bad("'labels' must be an object")
        for k in schema.names:  # schema order: the same problems in the same order on every run
            if k in row:
                labels_in.setdefault(k, row[k])
        labels: dict[str, str | None] = {}
        for k, v in labels_in.items():
            if k not in attr_names:
                check.bad(f"unknown attribute {k!r} (schema has: {', '.join(schema.names)})")
                continue
            if v is None or v == "":
                labels[k] = None
                continue
            v = str(v)
            if v not in schema[k].values:
                check.bad(f"attribute {k!r} has unknown value {v!r} (allowed: {', '.join(schema[k].values)})")
                continue
            labels[k] = v
        for k in schema.names:
            labels.setdefault(k, None)
        return labels

    def _metadata(self, check: _RowCheck, row: dict[str, Any]) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for k, t in self.meta_types.items():
            if k not in row:
                continue
            try:
                metadata[k] = coerce(row[k], t)
            except ValueError as e:
                check.bad(f"metadata {k!r}: {e} (declared/inferred type {t})")
        return metadata


def write_catalog(path: str | Path, items: Iterable[CatalogItem | dict[str, Any]]) -> Path:
    """Write a JSONL manifest (labels as top-level columns)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for it in items:
            row = it.to_row() if isinstance(it, CatalogItem) else it
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def find_schema(catalog_path: str | Path) -> Path:
    """The schema that travels with a catalog: ``schema.toml`` or ``schema.json`` beside it."""
    base = Path(catalog_path).parent
    for name in ("schema.toml", "schema.json"):
        if (base / name).is_file():
            return base / name
    raise FgpluginError(f"no schema.toml or schema.json next to {catalog_path}; pass --schema")


__all__ = [
    "Catalog", "CatalogItem", "Problem", "load_catalog", "write_catalog", "find_schema", "coerce", "infer_type",
    "METADATA_TYPES",
]
