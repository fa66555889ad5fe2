"""Queries as templates: the search pipeline's ML Commons ``query_template`` (``${emb_<attr>}``
placeholders) and the mustache search template (``PUT _scripts/<TEMPLATE_ID>``), both made from what
``compile.to_opensearch`` builds, so a templated query is exactly the one ``fgplugin query`` sends.

The compiler is run on recognisable sentinel vectors, which are then swapped for markers and the
markers for the template syntax.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from ...search.spec import QuerySpec
from ...search.store import IndexLayout
from ...similarity import query_form
from ..compile import to_opensearch
from ..mapping import ALL_FIELD, emb_field
from ..scripts import SCRIPT_ID
from .inputs import WiringOptions, layout_for, needs_query_form, query_spec
from .names import TEMPLATE_ID, WiringError

_MARK = "@@fgplugin:{}@@"


def _sentinels(card: Mapping[str, Any], seed: int = 7) -> dict[str, np.ndarray]:
    """Random unit vectors per attribute: recognisable wherever the compiler puts them. Already in the
    query form (slack zeroed, for posterior = prob cards), which the compiler then leaves as it is."""
    rng = np.random.default_rng(seed)
    slack = needs_query_form(card)
    return {a: query_form(rng.normal(size=int(card["dims"][a])), slack).astype(np.float32) for a in card["attributes"]}


def _is_vector(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)


def _matches(x: list[float], ref: np.ndarray) -> bool:
    a = np.asarray(x, dtype=np.float64)
    return a.shape == ref.shape and np.allclose(a, ref, atol=1e-6)


def _replace_vectors(node: Any, refs: Mapping[str, np.ndarray], used: list[str], stray: list[str], path: str,
                     key: str = "") -> Any:
    """Swap every query vector (a knn ``vector`` or an item of script ``vectors``) for its marker."""
    if key in ("vector", "vectors[]") and _is_vector(node):
        for name, ref in refs.items():
            if _matches(node, ref):
                used.append(name)
                return _MARK.format(name)
        stray.append(path)
        return node
    if isinstance(node, dict):
        return {k: _replace_vectors(v, refs, used, stray, f"{path}.{k}", k) for k, v in node.items()}
    if isinstance(node, list):
        item_key = "vectors[]" if key == "vectors" else ""
        return [_replace_vectors(v, refs, used, stray, f"{path}[{i}]", item_key) for i, v in enumerate(node)]
    return node


# -- the search pipeline's query_template -----------------------------------------------------------
def query_template(card: Mapping[str, Any], options: WiringOptions) -> tuple[str, list[str]]:
    """(template text, placeholder names): ``to_opensearch`` of the pipeline's QuerySpec with each
    query vector replaced by ``${emb_<attr>}`` (or ``${emb_all}``), ready for ML Commons' substitution."""
    spec = query_spec(card, options)
    layout = layout_for(card, options.metadata_types)
    sent = _sentinels(card)
    body = to_opensearch(spec, layout, query_vectors={a: sent[a] for a in spec.attributes})
    refs = {emb_field(a): sent[a] for a in spec.attributes}
    # ann modes send concat(w_a * q_a) (zero blocks for attributes left out): the service's emb_all is
    # exactly that only when every attribute is chosen with weight 1 (unit blocks, schema order).
    if all(spec.attributes.get(a) == 1.0 for a in card["attributes"]):
        refs[ALL_FIELD] = np.concatenate([sent[a] for a in card["attributes"]])
    used: list[str] = []
    stray: list[str] = []
    marked = _replace_vectors(body, refs, used, stray, "body")
    if stray:
        raise WiringError(
            f"mode {spec.mode!r} with weights {spec.attributes} sends a vector the encoder does not return "
            f"({', '.join(stray)}): modes ann and ann+rescore search emb_all with concat(w_a * q_a), which the "
            "encoder's emb_all equals only when every attribute is chosen at weight 1; use mode exact otherwise"
        )
    text = json.dumps(marked, separators=(",", ":"))
    names = list(dict.fromkeys(used))
    for n in names:
        text = text.replace(json.dumps(_MARK.format(n)), "${" + n + "}")
    return text, names


# -- the mustache search template -------------------------------------------------------------------
def _exact_parts(body: dict[str, Any]) -> dict[str, Any]:
    """The variable parts of an exact-mode body (the template's params)."""
    try:
        ss = body["query"]["script_score"]
        script = ss["script"]
        assert script.get("id") == SCRIPT_ID
        return {"size": body["size"], "source": body["_source"]["includes"], "filter": ss["query"],
                "fields": script["params"]["fields"], "weights": script["params"]["weights"],
                "vectors": script["params"]["vectors"]}
    except (KeyError, TypeError, AssertionError):
        raise WiringError("the exact query no longer has the shape the search template expects "
                          "(size, _source.includes, script_score with the stored script); update TEMPLATE_ID") from None


def search_template_source(card: Mapping[str, Any]) -> str:
    """Mustache source of the exact weighted query; params: size, source, filter, fields, weights, vectors."""
    layout = layout_for(card)
    spec = QuerySpec(attributes={a: 1.0 for a in card["attributes"]}, vectors={}, k=10, mode="exact")
    body = to_opensearch(spec, layout, query_vectors=_sentinels(card))
    _exact_parts(body)
    body["size"] = _MARK.format("size")
    body["_source"]["includes"] = _MARK.format("source")
    body["query"]["script_score"]["query"] = _MARK.format("filter")
    for p in ("fields", "weights", "vectors"):
        body["query"]["script_score"]["script"]["params"][p] = _MARK.format(p)
    text = json.dumps(body, separators=(",", ":"))
    text = text.replace(json.dumps(_MARK.format("size")), "{{size}}")
    for p in ("source", "filter", "fields", "weights", "vectors"):
        text = text.replace(json.dumps(_MARK.format(p)), "{{#toJson}}" + p + "{{/toJson}}")
    return text


def search_template_body(card: Mapping[str, Any]) -> dict[str, Any]:
    """``PUT _scripts/<TEMPLATE_ID>``."""
    return {"script": {"lang": "mustache", "source": search_template_source(card)}}


def search_template_request(spec: QuerySpec, layout: IndexLayout, query_vectors: Mapping[str, Any]) -> dict[str, Any]:
    """``GET <index>/_search/template`` body for an exact ``spec``: renders to ``to_opensearch(spec)``."""
    if spec.mode != "exact":
        raise WiringError(f"the search template runs the exact query; spec.mode is {spec.mode!r}")
    return {"id": TEMPLATE_ID, "params": _exact_parts(to_opensearch(spec, layout, query_vectors=dict(query_vectors)))}


def render_mustache(source: str, params: Mapping[str, Any]) -> Any:
    """Render the two mustache forms our template uses (``{{x}}``, ``{{#toJson}}x{{/toJson}}``) and parse."""
    missing = [p for p in re.findall(r"\{\{#toJson\}\}(\w+)\{\{/toJson\}\}|\{\{(\w+)\}\}", source)
               for p in p if p and p not in params]
    if missing:
        raise WiringError(f"search template params lack {', '.join(sorted(set(missing)))}")
    text = re.sub(r"\{\{#toJson\}\}(\w+)\{\{/toJson\}\}", lambda m: json.dumps(params[m.group(1)]), source)
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: str(params[m.group(1)]), text)
    return json.loads(text)


__all__ = ["query_template", "search_template_source", "search_template_body", "search_template_request",
           "render_mustache"]
