"""Property test of the catalog reader against damaged files: random bytes inserted, replaced or cut,
random CSV shapes (quotes, separators, line breaks, cell counts), other encodings. Whatever the damage:
no exception but a whole-file CatalogError, every row either read or reported with its row number, and
``--prune``'s plan never removes a document whose id still appears in the file."""

from __future__ import annotations

import csv
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgplugin.catalog import load_catalog
from fgplugin.errors import CatalogError
from fgplugin.indexer import plan_removals
from fgplugin.schema import AttributeSchema

SCHEMA = AttributeSchema.from_dict({"name": "fuzz", "attributes": {"colour": ["red", "blue", "green"]},
                                    "metadata": {"price": "float", "brand": "keyword"}})
# Ids no one of which is a part of another, so "the id appears in the file" is a plain byte search.
IDS = [f"<sku{i:04d}>" for i in range(40)]
NASTY = [b"\r", b"\x1c", b"\xff", b"\xc3", b"\xe9", b"\x00", b'"', b",", b"\n", b"\r\n", b"{", b"}", b"\\", b"\xef\xbb\xbf", b"'", b"\t"]


def rows_strategy():
    row = st.fixed_dictionaries({
        "colour": st.sampled_from(["red", "blue", "green", "", "purple"]),
        "price": st.one_of(st.floats(0, 500, allow_nan=False).map(lambda f: round(f, 2)), st.just("n/a"), st.just("")),
        "brand": st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
    })
    return st.lists(row, min_size=0, max_size=25)


def serialise(rows: list[dict], fmt: str) -> bytes:
    full = [{"id": IDS[i], "image": f"img/{i}.jpg", **r} for i, r in enumerate(rows)]
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in full).encode()
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=["id", "image", "colour", "price", "brand"])
    w.writeheader()
    w.writerows(full)
    return out.getvalue().encode()


damage_strategy = st.lists(
    st.tuples(st.sampled_from(["insert", "replace", "cut", "truncate"]), st.floats(0, 1), st.sampled_from(NASTY),
              st.integers(1, 30)),
    max_size=4,
)


def damage(data: bytes, edits) -> bytes:
    for op, where, piece, length in edits:
        at = int(where * len(data))
        if op == "insert":
            data = data[:at] + piece + data[at:]
        elif op == "replace":
            data = data[:at] + piece + data[at + len(piece):]
        elif op == "cut":
            data = data[:at] + data[at + length:]
        else:
            data = data[:at]
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy(), fmt=st.sampled_from(["jsonl", "csv"]), edits=damage_strategy,
       encoding=st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1", "utf-16", "cp1252"]))
def test_damaged_catalogs_are_read_or_reported_by_row_and_prune_spares_every_row_in_the_file(
        tmp_path_factory, rows, fmt, edits, encoding):
    data = serialise(rows, fmt)
    if encoding != "utf-8":
        data = data.decode("utf-8").encode(encoding, errors="replace")
    data = damage(data, edits)
    path = tmp_path_factory.mktemp("fuzz") / f"catalog.{fmt}"
    path.write_bytes(data)
    try:
        cat = load_catalog(path, SCHEMA, strict=False)
    except CatalogError as e:  # refused as a whole (another encoding, an unreadable header): said so, by file
        assert all(p.row is None for p in e.problems) and str(e)
        return
    rows_read = {it.row for it in cat.items}
    rows_reported = {p.row for p in cat.problems}
    assert None not in rows_reported  # every problem names its row
    assert not rows_read & rows_reported
    n = max(rows_read | rows_reported, default=0)
    assert rows_read | rows_reported == set(range(1, n + 1))  # no row silently dropped
    if fmt == "jsonl":
        body = data.removeprefix(b"\xef\xbb\xbf")  # a leading byte-order mark is dropped, not a row
        assert n == sum(1 for line in body.split(b"\n") if line.decode("utf-8", "replace").strip())
    for it in cat.items:
        assert it.id.encode() in data
    plan = plan_removals(cat, IDS[:len(rows)], [], prune=True, max_removal=1.0)
    read_ids = [it.id for it in cat.items] + [p.item_id for p in cat.problems if p.item_id]
    for gone in plan.prune:
        # Still in the file, it may only be part of another, clean id the damage made ("'<sku0001>").
        renamed = any(gone in other and gone != other for other in read_ids)
        assert gone.encode() not in data or renamed, f"prune would remove {gone}, whose row is still in the file"
