"""Import a labelled table of images (CSV) as a catalog + schema + splits, visibly.

``import_table`` reads a CSV with an id column, builds each image path from a template
(``images/{id}.jpg``, any column may appear in braces), takes the named columns as attributes and
metadata, folds groups of yes/no flag columns into one attribute (``pattern`` = the single
``pattern_*`` flag that is yes), and treats rare attribute values as asked:

- ``merge``: values seen fewer than ``min_count`` times become ``other``;
- ``drop``: rows holding such a value are left out;
- ``keep``: kept as they are.

Nothing is silent: the :class:`ImportReport` lists, per attribute, the kept values, the merged or
dropped ones with their counts and the empty cells (an empty cell is a missing / not visible label),
how many rows were ambiguous when folding flags, and every bad row (row number, id, cause).

Image files are checked for existence only (opening 9k images is ``fgplugin data check``'s job).
The catalog refers to them by a path relative to the catalog (default) or an absolute one: the
source data is never copied.

Presets for the two real data sets beside the repo: ``fpi`` (fashion-product-images/styles.csv)
and ``clothing`` (clothing-attributes/labels.csv).
"""

from __future__ import annotations

import csv
import os
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Problem, coerce, infer_type, load_catalog, write_catalog
from .errors import CatalogError, FgpluginError
from .schema import METADATA_TYPES, Attribute, AttributeSchema
from .splits import make_splits

RARE_MODES = ("merge", "drop", "keep")
OTHER = "other"
_YES = {"yes", "true", "1", "y"}
_NO = {"no", "false", "0", "n"}


def snake_case(name: str) -> str:
    """``subCategory`` -> ``sub_category``, ``baseColour`` -> ``base_colour``, ``Article Type`` -> ``article_type``."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    s = re.sub(r"[^0-9a-zA-Z]+", "_", s).strip("_").lower()
    if s and s[0].isdigit():
        s = "f_" + s
    return s


@dataclass
class AttributeReport:
    name: str
    column: str
    kept: dict[str, int]  # value -> rows, after rare handling (including "other" when merged)
    merged: dict[str, int] = field(default_factory=dict)  # rare value -> rows (now "other")
    dropped: dict[str, int] = field(default_factory=dict)  # rare value -> rows (rows left out)
    rare_kept: dict[str, int] = field(default_factory=dict)  # rare value -> rows (kept as is)
    empty: int = 0  # empty cells: missing / not visible


@dataclass
class FoldReport:
    name: str
    columns: list[str]
    folded: int  # rows with exactly one flag yes
    ambiguous: int  # rows with several flags yes -> missing
    none_yes: int  # rows with no flag yes (all no or empty) -> missing


@dataclass
class ImportReport:
    source: str
    catalog: str
    schema: str
    splits: str
    rows_in: int
    rows_written: int
    rows_dropped_rare: int
    attributes: list[AttributeReport]
    folds: list[FoldReport]
    metadata_types: dict[str, str]
    problems: list[Problem]  # bad rows left out (only when strict=False; strict raises)
    rare: str
    min_count: int
    seed: int

    def attribute(self, name: str) -> AttributeReport:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(name)

    def fold(self, name: str) -> FoldReport:
        for f in self.folds:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = [str(p) for p in self.problems]
        return d


@dataclass(frozen=True)
class Preset:
    name: str
    table: str  # relative to the source folder
    id_column: str
    image_template: str
    attributes: tuple[str, ...]
    metadata: tuple[str, ...]  # "column" or "column:type"
    folds: tuple[tuple[str, str], ...] = ()  # (attribute name, flag column prefix)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "fpi": Preset(
        name="fashion-product-images",
        table="styles.csv",
        id_column="id",
        image_template="images/{id}.jpg",
        attributes=("gender", "subCategory", "articleType", "baseColour", "season", "usage"),
        metadata=("masterCategory", "productDisplayName:text", "colorgroup"),
        description="Fashion Product Images (small): 9,261 product photos, styles.csv",
    ),
    "clothing": Preset(
        name="clothing-attributes",
        table="labels.csv",
        id_column="id",
        image_template="{image}",
        attributes=("sleeve_length", "neckline", "collar", "placket", "category", "gender"),
        metadata=("skin_exposure", "necktie:boolean", "scarf:boolean"),
        folds=(("pattern", "pattern_"), ("colour", "colour_")),
        description="Clothing Attribute Dataset (Chen et al., ECCV 2012): 1,856 photos, labels.csv",
    ),
}


def _split_typed(spec: str) -> tuple[str, str | None]:
    if ":" in spec:
        col, t = spec.rsplit(":", 1)
        if t not in METADATA_TYPES:
            raise FgpluginError(f"metadata {spec!r}: unknown type {t!r}; use one of {', '.join(METADATA_TYPES)}")
        return col, t
    return spec, None


def _template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise FgpluginError(f"image template {template!r} is malformed ({e})") from None


@dataclass
class _ColumnPlan:
    """Which table columns become what, checked against the header before any row is read."""

    table: Path
    id_column: str
    image_template: str
    attr_cols: list[str]
    meta_specs: list[tuple[str, str | None]]  # (column, declared type or None)
    folds: dict[str, str]  # attribute name -> flag column prefix
    fold_cols: dict[str, list[str]]  # attribute name -> its flag columns
    rename: dict[str, str]

    def out_name(self, col: str) -> str:
        return self.rename.get(col) or snake_case(col)

    @property
    def attr_names(self) -> list[str]:
        return [self.out_name(c) for c in self.attr_cols] + list(self.folds)

    @property
    def attr_source(self) -> dict[str, str]:
        """Attribute name -> where it comes from (a column, or ``prefix*`` for a fold)."""
        return {self.out_name(c): c for c in self.attr_cols} | {f: f"{self.folds[f]}*" for f in self.folds}


def import_table(
    table_csv: str | Path,
    out_dir: str | Path,
    *,
    id_column: str = "id",
    image_template: str = "images/{id}.jpg",
    image_root: str | Path | None = None,
    attributes: list[str],
    metadata: list[str] | None = None,
    folds: dict[str, str] | None = None,
    rename: dict[str, str] | None = None,
    rare: str = "merge",
    min_count: int = 20,
    seed: int = 0,
    name: str | None = None,
    strict: bool = True,
    absolute_paths: bool = False,
) -> ImportReport:
    """Turn ``table_csv`` into ``out_dir/{catalog.jsonl, schema.toml, splits.json}``.

    ``attributes``: columns to use as attributes (names become lower-case identifiers, e.g.
    ``subCategory`` -> ``sub_category``, unless ``rename`` says otherwise). ``metadata``: columns to
    keep as metadata, each ``"column"`` (type inferred) or ``"column:type"``. ``folds``: attribute
    name -> prefix of yes/no flag columns to fold into it. ``image_template``: formatted with the
    row's columns, relative to ``image_root`` (default: the table's folder) unless absolute.
    ``strict``: any bad row (missing or duplicate id, missing image file, too many cells) raises a
    :class:`CatalogError` listing them all and writes nothing; ``strict=False`` leaves them out and
    lists them in the report.
    """
    table = Path(table_csv)
    if rare not in RARE_MODES:
        raise FgpluginError(f"--rare {rare!r}: use one of {', '.join(RARE_MODES)}")
    if min_count < 1:
        raise FgpluginError(f"--min-count must be at least 1 (got {min_count})")
    if not table.is_file():
        raise FgpluginError(f"{table}: table not found")
    root = Path(image_root) if image_root is not None else table.parent
    columns, raw_rows = _read_table(table)
    plan = _plan_columns(table, columns, id_column, image_template, list(attributes), list(metadata or []),
                         dict(folds or {}), dict(rename or {}))

    rows, problems = _read_records(plan, raw_rows, root)
    # Bad metadata cells make bad rows, left out before the rare-value counts so that the report's
    # counts are the catalog's counts.
    meta_types = _metadata_types(plan, rows)
    rows = _coerce_metadata(rows, meta_types, problems)
    problems.sort(key=lambda p: p.row or 0)
    if problems and strict:
        raise CatalogError(problems)
    if not rows:
        raise FgpluginError(f"{table}: no valid rows to import")
    fold_stats = {f: Counter(r["_fold_" + f] for r in rows) for f in plan.folds}

    rows, dropped_rows, reports, attrs = _apply_rare(plan, rows, rare, min_count)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = AttributeSchema(tuple(attrs), name=name or snake_case(table.parent.name) or "imported",
                             metadata=meta_types)
    schema_path = schema.save(out / "schema.toml")
    catalog_path = write_catalog(out / "catalog.jsonl", _catalog_rows(plan, rows, meta_types, out, absolute_paths))
    splits_path = make_splits([r["id"] for r in rows], seed=seed).save(out / "splits.json")
    load_catalog(catalog_path, schema, strict=True)  # what we wrote must load

    return ImportReport(
        source=str(table), catalog=str(catalog_path), schema=str(schema_path), splits=str(splits_path),
        rows_in=len(raw_rows), rows_written=len(rows), rows_dropped_rare=dropped_rows, attributes=reports,
        folds=[FoldReport(f, plan.fold_cols[f], s["folded"], s["ambiguous"], s["none_yes"])
               for f, s in fold_stats.items()],
        metadata_types=meta_types, problems=problems, rare=rare, min_count=min_count, seed=seed,
    )


def _read_table(table: Path) -> tuple[list[str], list[dict[str | None, Any]]]:
    with table.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        raw_rows = list(reader)
    if not columns:
        raise FgpluginError(f"{table}: empty table (no header row)")
    return columns, raw_rows  # type: ignore[return-value]


def _plan_columns(table: Path, columns: list[str], id_column: str, image_template: str, attr_cols: list[str],
                  metadata: list[str], folds: dict[str, str], rename: dict[str, str]) -> _ColumnPlan:
    """Every named column must exist, every output name must be valid and unique."""

    def need(col: str, role: str) -> None:
        if col not in columns:
            raise FgpluginError(f"{table}: {role} column {col!r} is not in the table; columns: {', '.join(columns)}")

    need(id_column, "id")
    for fld in _template_fields(image_template):
        need(fld, f"image template {image_template!r}")
    for c in attr_cols:
        need(c, "attribute")
    meta_specs = [_split_typed(m) for m in metadata]
    for c, _ in meta_specs:
        need(c, "metadata")
    fold_cols: dict[str, list[str]] = {}
    for fname, prefix in folds.items():
        cols = [c for c in columns if c.startswith(prefix)]
        if len(cols) < 2:
            raise FgpluginError(f"{table}: fold {fname!r} needs two or more columns starting with {prefix!r}; found {cols}")
        fold_cols[fname] = cols
    plan = _ColumnPlan(table, id_column, image_template, attr_cols, meta_specs, folds, fold_cols, rename)

    names: dict[str, str] = {}  # output name -> what it comes from
    for n, src in [(plan.out_name(c), f"column {c!r}") for c in attr_cols] + [(f, f"fold {f!r}") for f in folds] + \
            [(plan.out_name(c), f"metadata column {c!r}") for c, _ in meta_specs]:
        if n in ("id", "image", "labels"):
            raise FgpluginError(f"{src} would be named {n!r}, a reserved catalog column; rename it")
        if n in names:
            raise FgpluginError(f"{src} and {names[n]} would both be named {n!r}; rename one")
        names[n] = src
    if not attr_cols and not folds:
        raise FgpluginError("name at least one attribute column (or a fold)")
    return plan


def _read_records(plan: _ColumnPlan, raw_rows: list[dict[str | None, Any]],
                  root: Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Pass 1: every row as a record of raw values (``_row``, ``_image`` and ``_fold_*`` for the
    bookkeeping), and every bad row's problems."""
    problems: list[Problem] = []
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(raw_rows, start=1):
        rid = (row.get(plan.id_column) or "").strip()
        bad = _cell_problems(plan, row, rid, seen)
        image = None
        if not bad:
            image = _image_path(plan, row, root, bad)
        if bad:
            problems.extend(Problem(n, rid or None, cause, "invalid") for cause in bad)
            continue
        seen[rid] = n
        rows.append(_record(plan, row, n, rid, image))
    return rows, problems


def _cell_problems(plan: _ColumnPlan, row: dict[str | None, Any], rid: str, seen: dict[str, int]) -> list[str]:
    bad: list[str] = []
    if None in row:
        bad.append(f"{len(row[None])} more cell(s) than header columns")
    if any(v is None for k, v in row.items() if k is not None):
        bad.append("fewer cells than header columns")
    if not rid:
        bad.append(f"empty id ({plan.id_column!r})")
    elif rid in seen:
        bad.append(f"duplicate id (first seen in row {seen[rid]})")
    return bad


def _image_path(plan: _ColumnPlan, row: dict[str | None, Any], root: Path, bad: list[str]) -> Path | None:
    """The row's image file from the template; a cause is added to ``bad`` when there is none."""
    try:
        rel = plan.image_template.format(**{k: (v or "").strip() for k, v in row.items() if k is not None})
    except (KeyError, IndexError, ValueError) as e:
        bad.append(f"image template {plan.image_template!r} cannot be filled ({e})")
        return None
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    if not rel.strip() or not path.is_file():
        bad.append(f"image file not found: {path}")
        return None
    return path


def _record(plan: _ColumnPlan, row: dict[str | None, Any], n: int, rid: str, image: Path | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"_row": n, "id": rid, "_image": image}
    for c in plan.attr_cols:
        v = (row[c] or "").strip()
        rec[plan.out_name(c)] = v or None
    for fname, cols in plan.fold_cols.items():
        yes = [c[len(plan.folds[fname]):] for c in cols if (row[c] or "").strip().lower() in _YES]
        rec[fname] = yes[0] if len(yes) == 1 else None
        rec["_fold_" + fname] = "folded" if len(yes) == 1 else "ambiguous" if yes else "none_yes"
    for c, _ in plan.meta_specs:
        v = (row[c] or "").strip()
        rec[plan.out_name(c)] = v or None
    return rec


def _metadata_types(plan: _ColumnPlan, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Declared, else inferred from the cells."""
    meta_types: dict[str, str] = {}
    for c, t in plan.meta_specs:
        k = plan.out_name(c)
        meta_types[k] = t or infer_type([r[k] for r in rows])
    return meta_types


def _coerce_metadata(rows: list[dict[str, Any]], meta_types: dict[str, str],
                     problems: list[Problem]) -> list[dict[str, Any]]:
    """The rows whose metadata cells all convert (converted in place); the others' causes go to ``problems``."""
    good: list[dict[str, Any]] = []
    for r in rows:
        bad = []
        for k, t in meta_types.items():
            try:
                r[k] = coerce(r[k], t)
            except ValueError as e:
                bad.append(f"metadata {k!r}: {e} (type {t})")
        if bad:
            problems.extend(Problem(r["_row"], r["id"], cause) for cause in bad)
        else:
            good.append(r)
    return good


def _apply_rare(plan: _ColumnPlan, rows: list[dict[str, Any]], rare: str, min_count: int
                ) -> tuple[list[dict[str, Any]], int, list[AttributeReport], list[Attribute]]:
    """Values seen fewer than ``min_count`` times merged, their rows dropped, or kept (``rare``):
    (rows, rows dropped, per-attribute reports, the schema's attributes)."""
    counts = {a: Counter(r[a] for r in rows if r[a] is not None) for a in plan.attr_names}
    rare_values = {a: {v for v, k in counts[a].items() if k < min_count} for a in plan.attr_names}
    dropped_rows = 0
    if rare == "drop":
        keep = [r for r in rows if not any(r[a] in rare_values[a] for a in plan.attr_names)]
        dropped_rows = len(rows) - len(keep)
        rows = keep
    source = plan.attr_source
    reports: list[AttributeReport] = []
    attrs: list[Attribute] = []
    for a in plan.attr_names:
        rep = _attribute_report(a, source[a], rows, counts[a], rare_values[a], rare)
        reports.append(rep)
        if len(rep.kept) < 2:
            raise FgpluginError(
                f"attribute {a!r} ({source[a]}) has {len(rep.kept)} value(s) left after --rare {rare} "
                f"--min-count {min_count} ({dict(counts[a])}); an attribute needs two or more"
            )
        attrs.append(Attribute(a, tuple(rep.kept), f"imported from {source[a]}"))
    return rows, dropped_rows, reports, attrs


def _attribute_report(a: str, source: str, rows: list[dict[str, Any]], counts: Counter, rv: set[str],
                      rare: str) -> AttributeReport:
    """Attribute ``a``'s report (merging its rare values ``rv`` into ``other`` in ``rows`` when asked);
    ``kept`` lists the values by falling count, ``other`` last: the schema's value order."""
    rep = AttributeReport(a, source, kept={})
    by_count = sorted(rv, key=lambda v: (-counts[v], v))
    if rare == "merge":
        rep.merged = {v: counts[v] for v in by_count if v != OTHER}
        for r in rows:
            if r[a] in rv:
                r[a] = OTHER
    elif rare == "drop":
        rep.dropped = {v: counts[v] for v in by_count}
    else:
        rep.rare_kept = {v: counts[v] for v in by_count}
    final = Counter(r[a] for r in rows if r[a] is not None)
    rep.empty = sum(1 for r in rows if r[a] is None)
    order = sorted((v for v in final if v != OTHER), key=lambda v: (-final[v], v))
    if OTHER in final:
        order.append(OTHER)
    rep.kept = {v: final[v] for v in order}
    return rep


def _catalog_rows(plan: _ColumnPlan, rows: list[dict[str, Any]], meta_types: dict[str, str], out: Path,
                  absolute_paths: bool) -> list[dict[str, Any]]:
    out_abs = out.resolve()

    def image_ref(p: Path) -> str:
        a = p.resolve()
        return str(a) if absolute_paths else os.path.relpath(a, out_abs)

    catalog_rows = []
    for r in rows:
        row = {"id": r["id"], "image": image_ref(r["_image"])}
        row.update({a: r[a] for a in plan.attr_names})
        row.update({k: r[k] for k in meta_types})
        catalog_rows.append(row)
    return catalog_rows


def import_preset(
    preset: str,
    source: str | Path,
    out_dir: str | Path,
    *,
    rare: str = "merge",
    min_count: int = 20,
    seed: int = 0,
    strict: bool = True,
    absolute_paths: bool = False,
) -> ImportReport:
    """Import one of the real data sets (``fpi`` or ``clothing``) from its folder ``source``."""
    if preset not in PRESETS:
        raise FgpluginError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    src = Path(source)
    if not (src / p.table).is_file():
        raise FgpluginError(f"{src}: no {p.table} here; --source must be the {p.name} folder")
    return import_table(
        src / p.table, out_dir, id_column=p.id_column, image_template=p.image_template, image_root=src,
        attributes=list(p.attributes), metadata=list(p.metadata), folds=dict(p.folds), rare=rare,
        min_count=min_count, seed=seed, name=p.name, strict=strict, absolute_paths=absolute_paths,
    )


__all__ = ["import_table", "import_preset", "ImportReport", "AttributeReport", "FoldReport", "PRESETS",
           "snake_case", "RARE_MODES"]
