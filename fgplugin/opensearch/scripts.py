"""The painless script that scores a document by its weighted cosines (exact and rescore modes).

    score = sum_i  w_i * max(0, 1 + cosineSimilarity(q_i, doc[f_i]))     over fields f_i the doc has

- ``cosineSimilarity`` (k-NN painless extension) is the raw cosine in [-1, 1]; on a byte-vector field
  (``--codec int8``) the plugin takes the query as bytes, so ``compile`` sends the query's int8 codes
  (``fgplugin.codecs.query_codes``) and the script computes ``cos(q8, c)``, as the embedded store does; 1 + cos keeps every
  term >= 0, because script_score fails the shard on a negative score ("Must be a non-negative
  score!"); the ``max(0, ...)`` only absorbs float rounding just below -1.
- A document without the field (``doc[f].size() == 0``) adds 0 for it: ``doc[f].getValue()`` would
  throw ("One of the document doesn't have a value for field").
- The source is constant and all data travels in ``params`` (``fields``, ``weights``, ``vectors``), so
  the compiled script is cached and never counts against the compile rate limit. It is stored once
  (``PUT _scripts/<SCRIPT_ID>``, done by ``OpenSearchStore.ensure_index``) and referenced by id; the
  inline form is the fallback (``stored_script_id=None``).

Back on the client the raw weighted cosine is ``score - sum(w)`` (``script_to_weighted_cosine``): a
present field contributes ``w * cos``, a MISSING field contributes ``-w`` (as if its cosine were -1,
the lowest possible), exactly what the embedded DuckDB store computes. Scores arrive as float32
(Lucene scores are floats), so expect about 1e-7 relative rounding.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

SCRIPT_ID = "fgplugin-weighted-cosine-v1"  # bump the suffix whenever SCRIPT_SOURCE changes
MISSING_COSINE = -1.0  # what a missing attribute vector counts as in exact and rescore modes

SCRIPT_SOURCE = (
    "double s = 0.0; "
    "for (int i = 0; i < params.fields.size(); ++i) { "
    "String f = params.fields[i]; "
    "if (doc[f].size() != 0) { "
    "s += params.weights[i] * Math.max(0.0, 1.0 + cosineSimilarity(params.vectors[i], doc[f])); "
    "} "
    "} "
    "return s;"
)


def stored_script_body() -> dict[str, Any]:
    """Body of ``PUT _scripts/<SCRIPT_ID>``."""
    return {"script": {"lang": "painless", "source": SCRIPT_SOURCE}}


def script_params(fields: Sequence[str], weights: Sequence[float], vectors: Sequence[Sequence[float]]) -> dict[str, Any]:
    return {"fields": list(fields), "weights": [float(w) for w in weights], "vectors": [list(v) for v in vectors]}


def weighted_cosine_script(params: Mapping[str, Any], stored_script_id: str | None = SCRIPT_ID) -> dict[str, Any]:
    """The ``script`` object of a script_score query: by stored id, or inline when the id is None."""
    if stored_script_id:
        return {"id": stored_script_id, "params": dict(params)}
    return {"lang": "painless", "source": SCRIPT_SOURCE, "params": dict(params)}


def script_score(cosines: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
    """What the script returns for a document (None cosine = field missing); the reference semantics."""
    s = 0.0
    for a, w in weights.items():
        c = cosines.get(a)
        if c is not None:
            s += w * max(0.0, 1.0 + c)
    return s


def script_to_weighted_cosine(score: float, weights: Mapping[str, float] | Sequence[float]) -> float:
    """Invert the script's shift: sum w*cos (missing fields count -w)."""
    ws = weights.values() if isinstance(weights, Mapping) else weights
    return float(score) - float(sum(ws))
