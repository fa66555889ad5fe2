"""Index mapping for a layout, versioned index names behind an alias, and the alias swap.

One document per catalog item:
- ``emb_<attribute>``: one ``knn_vector`` per attribute (unit vectors, ``innerproduct`` space, HNSW,
  engine named explicitly), scored exactly by the painless script and usable for per-attribute knn;
- ``emb_all``: the concatenation of every attribute's vector (a zero block where one is missing), for
  the ANN query: against ``concat(w_a * q_a)`` its inner product is exactly ``sum w_a cos``;
- the metadata fields, typed from ``layout.metadata_types``: keyword, text, float -> ``double`` (the
  same precision as the embedded store, so range boundaries agree), integer -> ``long``, boolean,
  date (ISO 8601; values are sent in UTC);
- ``model_version`` (keyword) and ``image`` (keyword, not indexed: display and re-encoding only);
- ``image_key`` and ``meta_key`` (keywords, not indexed): the document's fingerprint, read back by the
  index worker to tell current documents from ones whose image or metadata changed in the catalog
  (``fgplugin.search.store.Fingerprint``). An index created before these fields existed gets them added
  to its mapping by ``OpenSearchStore.ensure_index``.

``dynamic: strict`` makes the server refuse any field not in the mapping instead of guessing a type.
The layout (schema, dims, metadata types, model version, codec and int8 scales) rides in the mapping's
``_meta.fgplugin``, so a store can be reopened from the cluster alone.

Codecs (``fgplugin.codecs``; ``vector_property``): ``float32`` float fields; ``int8`` Lucene byte vectors
(``data_type: byte``, the same int8 codes as the embedded store, scored by the script's cosine on them;
lucene and faiss); ``float16`` float fields whose graph is faiss's fp16 scalar quantiser (``encoder: sq``,
``type: fp16``; the documents carry the fp16-rounded values, so the script scores the decoded values) -
faiss only: the lucene engine of k-NN 2.19 has no 16-bit storage (its ``sq`` encoder is 7-bit, its
``on_disk`` mode 4x only). ``binary`` is refused here (see ``BINARY_REFUSAL``).

Attributes added in place (``OpenSearchStore.add_attributes``, a model made by ``fgplugin train --extend``):
each new attribute's ``emb_<a>`` field is put into the live index's mapping (the alias and the index name
stay; queries answer throughout) and documents get it by partial ``_update``. ``emb_all`` cannot grow (a
knn_vector field's dimension is fixed), so it keeps covering the attributes the index was created with,
recorded as ``combined`` in ``_meta.fgplugin.extension``; a query weighting an attribute outside it runs
through the weighted attributes' own graphs and is rescored exactly (``compile.plan_query``). A dropped
attribute (``drop_attribute``) leaves its field in the mapping (fields cannot be removed) and its block in
``emb_all`` (queries never weight it, so that block meets zeros); its vectors leave every ``_source``.

Index names carry the model version: ``<alias>-<version[:12]>``. Queries read the alias; re-encoding
with a new model writes a new index and then swaps the alias atomically (one ``_aliases`` request:
remove from the old index, add to the new one), so readers never see a half-built index.

Regenerate the checked-in demo mapping with ``python -m fgplugin.opensearch.mapping --demo > mappings/demo.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from ..errors import StoreError
from ..schema import AttributeSchema
from ..search.store import IndexLayout, codec_from_meta, extension_from_meta
from ..synth import synth_schema
from .checks import ENGINES, RequestCheckError, check_request

FORMAT_VERSION = 1
SPACE_TYPE = "innerproduct"  # vectors are unit length: inner product == cosine, no re-normalisation
FINGERPRINT_FIELDS = ("image_key", "meta_key")
RESERVED_FIELDS = ("model_version", "image", *FINGERPRINT_FIELDS, "emb_all")
FIELD_TYPES: dict[str, dict[str, Any]] = {
    "keyword": {"type": "keyword"},
    "text": {"type": "text"},
    "float": {"type": "double"},
    "integer": {"type": "long"},
    "boolean": {"type": "boolean"},
    "date": {"type": "date", "format": "strict_date_optional_time||epoch_millis"},
}
DEMO_DIM = 64
DEMO_METADATA_TYPES = {"brand": "keyword", "category": "keyword", "price": "float", "in_stock": "boolean"}
_INDEX_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def emb_field(attribute: str) -> str:
    return f"emb_{attribute}"


ALL_FIELD = "emb_all"


def check_index_name(name: str) -> str:
    """OpenSearch index/alias naming rules (lower case, no special characters, <= 255 bytes)."""
    if not name or not _INDEX_NAME_RE.match(name) or name in (".", "..") or len(name.encode()) > 255:
        raise StoreError(
            f"{name!r} is not a valid OpenSearch index name: use lower-case letters, digits, '-', '_' and '.', "
            "starting with a letter or digit"
        )
    return name


def versioned_index_name(alias: str, model_version: str, codec: str = "float32") -> str:
    """``<alias>-<version[:12]>``: the concrete index for one model version (behind ``alias``); another codec
    than float32 adds ``-<codec>``, so changing the codec builds a new index behind the alias too."""
    check_index_name(alias)
    v = re.sub(r"[^a-z0-9]", "", (model_version or "").lower())[:12] or "unversioned"
    return check_index_name(f"{alias}-{v}" + (f"-{codec}" if codec != "float32" else ""))


def alias_swap_body(alias: str, new_index: str, old_indices: Iterable[str] = ()) -> dict[str, Any]:
    """One atomic ``POST _aliases``: drop the alias from the old indices, add it to the new one."""
    actions: list[dict[str, Any]] = [{"remove": {"index": i, "alias": alias}} for i in old_indices if i != new_index]
    actions.append({"add": {"index": new_index, "alias": alias}})
    return check_request("indices.update_aliases", {"actions": actions})


def layout_meta(layout: IndexLayout) -> dict[str, Any]:
    """What ``_meta.fgplugin`` records (read back by ``layout_from_meta``)."""
    return {
        "format_version": FORMAT_VERSION,
        "schema": layout.schema.to_dict(),
        "schema_fingerprint": layout.schema.fingerprint(),
        "attributes": list(layout.attributes),  # the order: a put_mapping may reorder _meta's objects
        "dims": {a: int(layout.dims[a]) for a in layout.attributes},
        "metadata_types": dict(layout.metadata_types),
        "model_version": layout.model_version,
        "query_slack": layout.query_slack,
        "codec": layout.codec_meta(),
        "extension": layout.extension_meta(),
    }


def layout_from_meta(meta: Any, where: str) -> IndexLayout:
    if not isinstance(meta, dict) or "schema" not in meta:
        raise StoreError(f"{where} was not created by fgplugin (its mapping has no _meta.fgplugin layout)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{where} has fgplugin index format {meta.get('format_version')}; this fgplugin reads {FORMAT_VERSION}")
    schema = AttributeSchema.from_dict(meta["schema"], source=where)
    order = meta.get("attributes")
    if isinstance(order, list) and sorted(order) == sorted(schema.names):
        schema = dataclasses.replace(schema, attributes=tuple(schema[a] for a in order))
    return IndexLayout(
        schema=schema,
        dims={k: int(v) for k, v in meta["dims"].items()},
        metadata_types=dict(meta["metadata_types"]),
        model_version=str(meta.get("model_version", "")),
        query_slack=bool(meta.get("query_slack", False)),  # indexes created before it: never
        **codec_from_meta(meta.get("codec")),  # indexes created before codecs: float32
        **extension_from_meta(meta.get("extension")),  # attributes added or dropped in place
    )


def combined_blocks(layout: IndexLayout) -> list[tuple[str, int]]:
    """The (attribute, size) blocks of ``emb_all``, in order: the layout's attributes, or, on an index that
    attributes were added to in place, those it was created with (a knn_vector field's dimension cannot
    change; see "Attributes added in place")."""
    return list(layout.combined) or [(a, int(layout.dims[a])) for a in layout.attributes]


def metadata_property(type_: str) -> dict[str, Any]:
    try:
        return dict(FIELD_TYPES[type_])
    except KeyError:
        raise StoreError(f"metadata type {type_!r} has no OpenSearch mapping; use one of {', '.join(FIELD_TYPES)}") from None


BINARY_REFUSAL = (
    "codec binary is not available on OpenSearch: k-NN 2.19's binary fields (data_type binary, hamming space) rank "
    "by the Hamming distance of sign bits and hold nothing to rescore from, and its 32x on_disk mode is faiss "
    "only; use --codec int8 (Lucene byte vectors: the same codes a binary embedded store rescores with)")
FP16_LUCENE_REFUSAL = (
    "codec float16 needs the faiss engine on OpenSearch (HNSW with the sq fp16 encoder): the lucene engine of "
    "k-NN 2.19 has no 16-bit vectors (its sq encoder is 7-bit, its on_disk mode 4x); use --engine faiss, or "
    "--codec int8 (Lucene byte vectors, both engines)")


def vector_property(dim: int, engine: str, m: int, ef_construction: int, codec: str = "float32") -> dict[str, Any]:
    """One ``knn_vector`` field of ``codec`` (see the module docstring); StoreError where the engine cannot hold it."""
    params: dict[str, Any] = {"m": int(m), "ef_construction": int(ef_construction)}
    data_type = "float"
    if codec == "binary":
        raise StoreError(BINARY_REFUSAL)
    if codec == "int8":
        data_type = "byte"
    elif codec == "float16":
        if engine != "faiss":
            raise StoreError(FP16_LUCENE_REFUSAL)
        params["encoder"] = {"name": "sq", "parameters": {"type": "fp16"}}
    return {
        "type": "knn_vector",
        "dimension": int(dim),
        "data_type": data_type,
        "method": {"name": "hnsw", "engine": engine, "space_type": SPACE_TYPE, "parameters": params},
    }


def fingerprint_properties() -> dict[str, Any]:
    """The fingerprint fields: stored in ``_source`` only (read back by id or scroll, never searched)."""
    return {f: {"type": "keyword", "index": False, "doc_values": False} for f in FINGERPRINT_FIELDS}


def build_properties(layout: IndexLayout, *, engine: str = "faiss", m: int = 16, ef_construction: int = 128) -> dict[str, Any]:
    props: dict[str, Any] = {
        "model_version": {"type": "keyword"},
        "image": {"type": "keyword", "index": False, "doc_values": False},
        **fingerprint_properties(),
    }
    for a in layout.attributes:
        props[emb_field(a)] = vector_property(layout.dims[a], engine, m, ef_construction, layout.codec)
    props[ALL_FIELD] = vector_property(sum(d for _, d in combined_blocks(layout)), engine, m, ef_construction,
                                       layout.codec)
    for f, t in layout.metadata_types.items():
        if f in RESERVED_FIELDS or f.startswith("emb_"):
            raise StoreError(f"metadata field {f!r} clashes with an fgplugin index field; rename it in the catalog")
        props[f] = metadata_property(t)
    return props


def build_index_body(
    layout: IndexLayout,
    *,
    engine: str = "faiss",
    m: int = 16,
    ef_construction: int = 128,
    ef_search: int = 100,
    shards: int = 1,
    replicas: int = 0,
) -> dict[str, Any]:
    """The ``PUT <index>`` body (settings + mappings) for ``layout``; checked by ``check_request``."""
    if engine not in ENGINES:
        hint = " (nmslib is deprecated and cannot create new fields on OpenSearch 3.x)" if engine == "nmslib" else ""
        raise StoreError(f"engine {engine!r} is not supported; use one of {', '.join(ENGINES)}{hint}")
    if sorted(layout.dims) != sorted(layout.attributes):
        raise StoreError(f"layout dims cover {sorted(layout.dims)} but the schema's attributes are {layout.attributes}")
    for name, v, lo in (("shards", shards, 1), ("replicas", replicas, 0)):
        if not isinstance(v, int) or v < lo:
            raise StoreError(f"{name} must be an integer >= {lo}, got {v!r}")
    body = {
        "settings": {"index": {
            "number_of_shards": shards,
            "number_of_replicas": replicas,
            "knn": True,
            "knn.algo_param.ef_search": int(ef_search),
        }},
        "mappings": {
            "dynamic": "strict",
            "_meta": {"fgplugin": layout_meta(layout)},
            "properties": build_properties(layout, engine=engine, m=m, ef_construction=ef_construction),
        },
    }
    try:
        return check_request("indices.create", body)
    except RequestCheckError as e:
        raise StoreError(str(e)) from None


# -- the demo schema's mapping (checked in under mappings/) --------------------------------------------
def demo_layout() -> IndexLayout:
    """The demo catalog's layout: ``fgplugin.synth.synth_schema()``, 64-d vectors per attribute."""
    schema = synth_schema()
    types = dict(schema.metadata) or dict(DEMO_METADATA_TYPES)  # the synth catalog declares its types
    return IndexLayout(schema, {a: DEMO_DIM for a in schema.names}, types, model_version="demo")


def demo_mapping_json() -> str:
    return json.dumps(build_index_body(demo_layout()), indent=2) + "\n"


def write_demo_mapping(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(demo_mapping_json(), encoding="utf-8")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fgplugin.opensearch.mapping", description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="print the index body for the demo schema")
    ap.add_argument("--out", help="write it to this file instead of stdout")
    args = ap.parse_args(argv)
    if not args.demo:
        ap.error("nothing to do: pass --demo")
    if args.out:
        write_demo_mapping(args.out)
    else:
        sys.stdout.write(demo_mapping_json())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
