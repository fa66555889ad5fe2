"""Running a QuerySpec against any store: resolve the reference to vectors, search, format the result.

The reference is one of
- ``like_id``: a catalog id already in the store (the store reads its vectors; the id is left out of
  its own results unless ``exclude_self`` is off);
- ``image``: a path, URL or bytes, encoded here with the exported encoder (``fgplugin.export``);
- ``vectors``: raw per-attribute vectors (normalised before scoring).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..encoding import AttentionModel, DeployedEncoder
from ..errors import QueryError
from ..images import decode, load_image
from ..opensearch.compile import to_opensearch
from ..search.spec import QuerySpec, SearchResult, filter_fields
from ..search.store import IndexLayout, Store


@dataclass
class QueryRun:
    """A search and what was needed to run it (the HTML report and --explain use the extras)."""

    spec: QuerySpec  # as given
    resolved: QuerySpec  # with an image reference replaced by its vectors
    result: SearchResult
    layout: IndexLayout
    query_image: Any = None  # PIL image of an image query
    encoder: DeployedEncoder | None = None  # the exported encoder of an image query
    notes: list[str] = field(default_factory=list)
    reference_image: str | None = None  # image source of a like-id reference, where the store knows it
    query_vectors: dict[str, np.ndarray] | None = None  # the reference's vectors (fetched for a like-id query)
    explainer: AttentionModel | None = None  # a training model whose attention the HTML page draws (--explain)


def load_encoder(model: str | None, store: Store, layout: IndexLayout) -> DeployedEncoder:
    """The exported encoder named by ``model``, else the one the index command recorded in the store."""
    path = model or store.get_meta("model_path")
    if not path:
        raise QueryError("an image query needs the exported encoder: pass --model EXPORT_DIR")
    # Imported here: the export needs torch, which a client querying by id or vectors does without.
    from ..export import ExportedEncoder

    return ExportedEncoder.load(path, schema=layout.schema, device="auto")


def resolve_reference(
    spec: QuerySpec, store: Store, *, model: str | None = None, encoder: DeployedEncoder | None = None
) -> tuple[QuerySpec, Any, DeployedEncoder | None, list[str]]:
    """Replace an image reference by its encoded vectors. Returns (spec, image, encoder, notes)."""
    if spec.image is None:
        return spec, None, encoder, []
    layout = store.require_layout()
    if encoder is None:
        encoder = load_encoder(model, store, layout)
    if isinstance(spec.image, (bytes, bytearray)):
        image = decode(bytes(spec.image), "<query image>")
    else:
        image = load_image(spec.image)
    out = encoder.encode_images([image])
    vectors = {a: np.asarray(out[a][0], dtype=np.float32) for a in spec.attributes if a in out}
    notes = []
    version = encoder.version
    if layout.model_version and version != layout.model_version:
        notes.append(
            f"the encoder (version {version[:12]}) is not the model the store was last indexed with "
            f"({layout.model_version[:12]}): scores compare vectors of different models"
        )
    resolved = dataclasses.replace(spec, image=None, vectors=vectors)
    return resolved, image, encoder, notes


def run_query(store: Store, spec: QuerySpec, *, model: str | None = None,
              encoder: DeployedEncoder | None = None) -> QueryRun:
    """Validate, resolve and execute ``spec`` on ``store``."""
    layout = store.require_layout()
    spec.validate(layout.schema, layout.dims)
    resolved, image, encoder, notes = resolve_reference(spec, store, model=model, encoder=encoder)
    result = store.search(resolved)
    if result.note:
        notes.append(result.note)
    ref_image, vectors = None, resolved.vectors
    if spec.like_id is not None:
        ref_image = store.image_of(spec.like_id)
        vectors = store.get_vectors([spec.like_id], list(spec.attributes)).get(spec.like_id)
    return QueryRun(spec, resolved, result, layout, image, encoder, notes, ref_image, vectors)


def opensearch_body(run: QueryRun) -> dict[str, Any]:
    """The OpenSearch request body the same query compiles to (for --explain)."""
    return to_opensearch(run.resolved, run.layout, query_vectors=run.query_vectors)


# -- formatting ---------------------------------------------------------------------------------
def reference_label(spec: QuerySpec) -> str:
    if spec.like_id is not None:
        return f"like {spec.like_id}"
    if spec.image is not None:
        return "image " + (spec.image if isinstance(spec.image, str) else f"({len(spec.image)} bytes)")
    return "raw vectors"


def spec_to_dict(spec: QuerySpec) -> dict[str, Any]:
    return {
        "reference": reference_label(spec),
        "attributes": dict(spec.attributes),
        "filters": [filter_to_dict(f) for f in spec.filters],
        "k": spec.k,
        "mode": spec.mode,
    }


def filter_to_dict(f: Any) -> Any:
    d = dataclasses.asdict(f) if dataclasses.is_dataclass(f) else f
    return {type(f).__name__.lower(): {k: v for k, v in d.items() if v not in (None, ())}}


def result_to_dict(run: QueryRun) -> dict[str, Any]:
    r = run.result
    return {
        "query": spec_to_dict(run.spec),
        "mode": r.mode,
        "plan": r.plan,
        "total_candidates": r.total_candidates,
        "notes": list(run.notes),
        "hits": [
            {"rank": i, "id": h.id, "score": h.score, "cosines": h.cosines, "metadata": h.metadata, "image": h.image}
            for i, h in enumerate(r.hits, start=1)
        ],
    }


def key_fields(spec: QuerySpec, metadata_types: Mapping[str, str], limit: int = 4) -> list[str]:
    """Metadata columns worth showing: the filtered fields first, then the first others (no long text)."""
    out = [f for f in metadata_types if f in filter_fields(spec.filters)]
    for f, t in metadata_types.items():
        if len(out) >= limit:
            break
        if f not in out and t != "text":
            out.append(f)
    return out
