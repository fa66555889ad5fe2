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

from .catalog import Problem, _infer_type, coerce, load_catalog, write_catalog
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
    out = Path(out_dir)
    if rare not in RARE_MODES:
        raise FgpluginError(f"--rare {rare!r}: use one of {', '.join(RARE_MODES)}")
    if min_count < 1:
        raise FgpluginError(f"--min-count must be at least 1 (got {min_count})")
    if not table.is_file():
        raise FgpluginError(f"{table}: table not found")
    root = Path(image_root) if image_root is not None else table.parent
    metadata = list(metadata or [])
    folds = dict(folds or {})
    rename = dict(rename or {})

    with table.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        raw_rows = list(reader)
    if not columns:
        raise FgpluginError(f"{table}: empty table (no header row)")

    # -- the column plan: every named column must exist, every output name must be valid and unique.
    def need(col: str, role: str) -> None:
        if col not in columns:
            raise FgpluginError(f"{table}: {role} column {col!r} is not in the table; columns: {', '.join(columns)}")

    need(id_column, "id")
    for fld in _template_fields(image_template):
        need(fld, f"image template {image_template!r}")
    attr_cols = list(attributes)
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

    def out_name(col: str) -> str:
        return rename.get(col) or snake_case(col)

    names: dict[str, str] = {}  # output name -> what it comes from
    for n, src in [(out_name(c), f"column {c!r}") for c in attr_cols] + [(f, f"fold {f!r}") for f in folds] + \
            [(out_name(c), f"metadata column {c!r}") for c, _ in meta_specs]:
        if n in ("id", "image", "labels"):
            raise FgpluginError(f"{src} would be named {n!r}, a reserved catalog column; rename it")
        if n in names:
            raise FgpluginError(f"{src} and {names[n]} would both be named {n!r}; rename one")
        names[n] = src
    if not attr_cols and not folds:
        raise FgpluginError("name at least one attribute column (or a fold)")

    # -- pass 1: read every row, collect problems and raw values ---------------------------------
    problems: list[Problem] = []
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(raw_rows, start=1):
        rid = (row.get(id_column) or "").strip()
        bad: list[str] = []
        if None in row:
            bad.append(f"{len(row[None])} more cell(s) than header columns")  # type: ignore[index]
        if any(v is None for k, v in row.items() if k is not None):
            bad.append("fewer cells than header columns")
        if not rid:
            bad.append(f"empty id ({id_column!r})")
        elif rid in seen:
            bad.append(f"duplicate id (first seen in row {seen[rid]})")
        image = None
        if not bad:
            try:
                rel = image_template.format(**{k: (v or "").strip() for k, v in row.items() if k is not None})
            except (KeyError, IndexError, ValueError) as e:
                rel = None
                bad.append(f"image template {image_template!r} cannot be filled ({e})")
            if rel is not None:
                path = Path(rel) if Path(rel).is_absolute() else root / rel
                if not rel.strip() or not path.is_file():
                    bad.append(f"image file not found: {path}")
                else:
                    image = path
        if bad:
            problems.extend(Problem(n, rid or None, cause, "invalid") for cause in bad)
            continue
        seen[rid] = n
        rec: dict[str, Any] = {"_row": n, "id": rid, "_image": image}
        for c in attr_cols:
            v = (row[c] or "").strip()
            rec[out_name(c)] = v or None
        for fname, cols in fold_cols.items():
            yes = [c[len(folds[fname]):] for c in cols if (row[c] or "").strip().lower() in _YES]
            rec[fname] = yes[0] if len(yes) == 1 else None
            rec["_fold_" + fname] = "folded" if len(yes) == 1 else "ambiguous" if yes else "none_yes"
        for c, _ in meta_specs:
            v = (row[c] or "").strip()
            rec[out_name(c)] = v or None
        rows.append(rec)

    # -- metadata types: declared, else inferred from the cells; bad cells make bad rows, which are
    # left out before the rare-value counts so that the report's counts are the catalog's counts.
    meta_types: dict[str, str] = {}
    for c, t in meta_specs:
        k = out_name(c)
        meta_types[k] = t or _infer_type([r[k] for r in rows])
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
    rows = good
    problems.sort(key=lambda p: p.row or 0)
    if problems and strict:
        raise CatalogError(problems)
    if not rows:
        raise FgpluginError(f"{table}: no valid rows to import")

    rows_in = len(raw_rows)
    fold_stats = {f: Counter(r["_fold_" + f] for r in rows) for f in folds}

    # -- rare values -------------------------------------------------------------------------------
    attr_names = [out_name(c) for c in attr_cols] + list(folds)
    attr_source = {out_name(c): c for c in attr_cols} | {f: f"{folds[f]}*" for f in folds}
    counts = {a: Counter(r[a] for r in rows if r[a] is not None) for a in attr_names}
    rare_values = {a: {v for v, k in counts[a].items() if k < min_count} for a in attr_names}
    dropped_rows = 0
    if rare == "drop":
        keep = [r for r in rows if not any(r[a] in rare_values[a] for a in attr_names)]
        dropped_rows = len(rows) - len(keep)
        rows = keep
    reports: list[AttributeReport] = []
    attrs: list[Attribute] = []
    for a in attr_names:
        rep = AttributeReport(a, attr_source[a], kept={})
        rv = rare_values[a]
        if rare == "merge":
            rep.merged = {v: counts[a][v] for v in sorted(rv, key=lambda v: (-counts[a][v], v)) if v != OTHER}
            for r in rows:
                if r[a] in rv:
                    r[a] = OTHER
        elif rare == "drop":
            rep.dropped = {v: counts[a][v] for v in sorted(rv, key=lambda v: (-counts[a][v], v))}
        else:
            rep.rare_kept = {v: counts[a][v] for v in sorted(rv, key=lambda v: (-counts[a][v], v))}
        final = Counter(r[a] for r in rows if r[a] is not None)
        rep.empty = sum(1 for r in rows if r[a] is None)
        order = sorted((v for v in final if v != OTHER), key=lambda v: (-final[v], v))
        if OTHER in final:
            order.append(OTHER)
        rep.kept = {v: final[v] for v in order}
        reports.append(rep)
        if len(order) < 2:
            raise FgpluginError(
                f"attribute {a!r} ({attr_source[a]}) has {len(order)} value(s) left after --rare {rare} "
                f"--min-count {min_count} ({dict(counts[a])}); an attribute needs two or more"
            )
        attrs.append(Attribute(a, tuple(order), f"imported from {attr_source[a]}"))

    # -- write ------------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    schema = AttributeSchema(tuple(attrs), name=name or snake_case(table.parent.name) or "imported",
                             metadata=meta_types)
    schema_path = schema.save(out / "schema.toml")
    out_abs = out.resolve()

    def image_ref(p: Path) -> str:
        a = p.resolve()
        return str(a) if absolute_paths else os.path.relpath(a, out_abs)

    catalog_rows = []
    for r in rows:
        row = {"id": r["id"], "image": image_ref(r["_image"])}
        row.update({a: r[a] for a in attr_names})
        row.update({k: r[k] for k in meta_types})
        catalog_rows.append(row)
    catalog_path = write_catalog(out / "catalog.jsonl", catalog_rows)
    splits_path = make_splits([r["id"] for r in rows], seed=seed).save(out / "splits.json")
    load_catalog(catalog_path, schema, strict=True)  # what we wrote must load

    return ImportReport(
        source=str(table), catalog=str(catalog_path), schema=str(schema_path), splits=str(splits_path),
        rows_in=rows_in, rows_written=len(rows), rows_dropped_rare=dropped_rows, attributes=reports,
        folds=[FoldReport(f, fold_cols[f], s["folded"], s["ambiguous"], s["none_yes"]) for f, s in fold_stats.items()],
        metadata_types=meta_types, problems=problems, rare=rare, min_count=min_count, seed=seed,
    )


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
