"""Let OpenSearch call the encoder itself: ML Commons connector + model, ingest and search pipelines,
the stored scoring script and a mustache search template, all generated from an export's model card.

What gets registered (names carry the model card version ``v`` = first 12 hex digits, so a new model
gets new objects beside the old ones and nothing is overwritten in place):

==========================  =====================================  ===========================================
object                      name / id                              what it does
==========================  =====================================  ===========================================
stored painless script      ``scripts.SCRIPT_ID``                  weighted cosine (shared with the store)
mustache search template    ``TEMPLATE_ID``                        the exact weighted query, params in
ML connector                ``fgplugin-encoder-<v>``               POST ``<serve-url>/encode`` {"url": ...}
ML model group / model      ``fgplugin-encoder`` / ``...-<v>``     ``function_name: remote`` on the connector
query connector / model     ``fgplugin-encoder-query-<v>``         only for ``posterior = prob`` models (card
                                                                   ``query_slack``): {"url": ..., "form": "query"}
ingest pipeline             ``fgplugin-encode-<v>``                ``image`` URL -> every ``emb_<attr>``,
                                                                   ``emb_all`` and ``model_version``
search pipeline             ``fgplugin-image-query-<v>``           ``{"query": {"term": {"image": URL}}}`` ->
                                                                   the query ``compile.to_opensearch`` builds
==========================  =====================================  ===========================================

How ML Commons moves the data (checked against ml-commons' code; the simulators below do the same so
the tests can run the whole chain against ``fgplugin serve`` without a cluster):

- ``input_map`` ``{"url": "image"}`` makes the document's ``image`` string the model parameter ``url``
  (strings pass as they are, other values as JSON); the connector's ``request_body``
  ``{"url": "${parameters.url}"}`` then gets it JSON-escaped.
- Without a ``post_process_function`` the service's JSON object becomes the model output's
  ``dataAsMap``, and with ``full_response_path: false`` (the default for remote models) each
  ``output_map`` entry reads one top-level field by name. That is why ``fgplugin serve`` answers a
  single-image call flat: ``{"model_version": ..., "<attr>": [...], ..., "emb_all": [...]}``. No
  post-process function is needed, and one that split the answer into several tensors would break
  ``output_map`` (several tensors are read as one list).
- The search request processor reads ``query.term.image.value``, calls the model, and fills the
  ``${emb_<attr>}`` placeholders of its ``query_template`` with each output's Java ``List.toString()``
  (``[0.1, -0.2]``, valid JSON), then replaces the whole request with the result. The template is
  ``to_opensearch`` of a fixed QuerySpec (attributes and weights, k, mode chosen at setup) with the
  vectors swapped for placeholders, so it is exactly the query ``fgplugin query`` sends.
- A ``posterior = prob`` model stores [p, slack] vectors, and a query must drop the slack value
  (``fgplugin.similarity``). ML Commons puts the service's answer into the query as it is, so the
  search pipeline calls a second connector that asks ``/encode`` for ``"form": "query"``: the
  service drops it. Documents are still encoded (ingest pipeline) in the stored form.

Cluster settings it needs are printed with a warning, never applied silently (``--cluster-settings``
applies them): ``plugins.ml_commons.trusted_connector_endpoints_regex`` (this REPLACES the list),
``plugins.ml_commons.connector.private_ip_enabled`` for a private or loopback encoder address, and
``plugins.ml_commons.only_run_on_ml_node: false`` on clusters without ML nodes.

The spec (``../shared/opensearch-api-spec``) has schemas for most bodies here; it has none for the
``ml_inference`` processors, which :func:`check_ml_inference` checks instead.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from ..errors import FgpluginError, StoreError
from ..query.spec import QuerySpec, parse_filter
from ..schema import AttributeSchema
from ..serve import CONCAT_FIELD, DEFAULT_PORT, FORMS, VERSION_KEY
from ..similarity import query_form
from ..stores.base import IndexLayout
from .client import DEFAULT_INDEX, parse_http_url, redact_url
from .compile import to_opensearch
from .mapping import ALL_FIELD, emb_field, versioned_index_name
from .scripts import SCRIPT_ID, stored_script_body

assert CONCAT_FIELD == ALL_FIELD, "the service's concatenated output must be the index's emb_all field"

TEMPLATE_ID = "fgplugin-weighted-query-v1"  # bump with the template's shape
MODEL_GROUP = "fgplugin-encoder"
IMAGE_FIELD = "image"  # the document field holding the image URL (mapping.py)
QUERY_INPUT_PATH = f"query.term.{IMAGE_FIELD}.value"  # where the search pipeline reads the query image URL
DEFAULT_SERVE_URL = f"http://localhost:{DEFAULT_PORT}"
ML = "/_plugins/_ml"
INGEST_KEYS = {"model_id", "input_map", "output_map", "model_config", "max_prediction_tasks", "ignore_missing",
               "function_name", "full_response_path", "model_input", "tag", "description", "if", "on_failure",
               "ignore_failure"}
SEARCH_REQUEST_KEYS = {"model_id", "query_template", "input_map", "output_map", "optional_input_map",
                       "optional_output_map", "model_config", "max_prediction_tasks", "ignore_missing",
                       "function_name", "full_response_path", "model_input", "tag", "description", "ignore_failure"}
_PLACEHOLDER_RE = re.compile(r"\$\{([^}]+)\}")
_MARK = "@@fgplugin:{}@@"


class WiringError(FgpluginError):
    """A generated body breaks a rule ML Commons or OpenSearch depends on, or setup cannot proceed."""


# -- names ---------------------------------------------------------------------------------------
def short_version(version: str) -> str:
    v = re.sub(r"[^a-z0-9]", "", (version or "").lower())[:12]
    if not v:
        raise WiringError("the model card has no version; re-export the model")
    return v


@dataclass(frozen=True)
class Names:
    version: str  # short model version
    connector: str
    model_group: str
    model: str
    ingest_pipeline: str
    search_pipeline: str
    script: str = SCRIPT_ID
    template: str = TEMPLATE_ID

    @property
    def query_connector(self) -> str:
        """Connector and model whose /encode answers in the query form (posterior = prob models)."""
        return f"fgplugin-encoder-query-{self.version}"

    @property
    def query_model(self) -> str:
        return self.query_connector

    def connector_for(self, form: str) -> str:
        return self.query_connector if form == "query" else self.connector

    def model_for(self, form: str) -> str:
        return self.query_model if form == "query" else self.model

    @classmethod
    def for_version(cls, version: str) -> "Names":
        v = short_version(version)
        return cls(v, f"fgplugin-encoder-{v}", MODEL_GROUP, f"fgplugin-encoder-{v}", f"fgplugin-encode-{v}",
                   f"fgplugin-image-query-{v}")


# -- inputs --------------------------------------------------------------------------------------
@dataclass
class WiringOptions:
    """What the generated bodies depend on besides the model card."""

    serve_url: str = DEFAULT_SERVE_URL  # how OpenSearch reaches `fgplugin serve`
    index: str = DEFAULT_INDEX  # the alias; documents go to versioned_index_name(index, version)
    token: str | None = None  # bearer token `fgplugin serve --token` expects
    attributes: dict[str, float] | None = None  # the search pipeline's fixed query (None: all, weight 1)
    filters: list[str] = field(default_factory=list)  # CLI filter syntax, for the search pipeline query
    k: int = 20
    mode: str = "exact"
    metadata_types: dict[str, str] = field(default_factory=dict)  # index metadata fields (returned in _source)
    max_connections: int = 32  # connector -> service connections

    def __post_init__(self) -> None:
        self.serve_url = check_serve_url(self.serve_url)


def check_serve_url(url: str) -> str:
    """The --serve-url, checked; messages show it only through ``redact_url`` (never a password)."""
    shown = redact_url(url)
    if "://" not in str(url):
        raise WiringError(f"--serve-url must be an http(s) URL of `fgplugin serve` (e.g. {DEFAULT_SERVE_URL}); "
                          f"got {shown!r}")
    parts = parse_http_url(url, "--serve-url", WiringError)
    if parts.user is not None or parts.password is not None or parts.query is not None or parts.fragment is not None:
        raise WiringError(f"--serve-url {shown!r}: no credentials, query or fragment (use --serve-token for auth)")
    return str(url).strip().rstrip("/")


def layout_for(card: Mapping[str, Any], metadata_types: Mapping[str, str] | None = None) -> IndexLayout:
    schema = AttributeSchema.from_dict(card["schema"], source="model card")
    return IndexLayout(schema, {a: int(card["dims"][a]) for a in schema.names}, dict(metadata_types or {}),
                       str(card["version"]), query_slack=needs_query_form(card))


def query_spec(card: Mapping[str, Any], options: WiringOptions) -> QuerySpec:
    """The fixed query of the search pipeline (vectors filled later)."""
    names = list(card["attributes"])
    weights = dict(options.attributes) if options.attributes else {a: 1.0 for a in names}
    unknown = [a for a in weights if a not in names]
    if unknown:
        raise WiringError(f"unknown attribute(s) {', '.join(unknown)}; the model has {', '.join(names)}")
    return QuerySpec(attributes=weights, vectors={}, filters=[parse_filter(f) for f in options.filters],
                     k=options.k, mode=options.mode)


# -- ML Commons bodies ---------------------------------------------------------------------------
def needs_query_form(card: Mapping[str, Any]) -> bool:
    """Whether queries need vectors other than the stored ones (posterior = prob: the slack dropped)."""
    return bool(card.get("query_slack", False))  # cards before it: never


def request_body(form: str) -> str:
    """The connector's ``request_body``: the image URL, and for the query connector the form to answer in."""
    if form not in FORMS:
        raise WiringError(f"form must be one of {', '.join(FORMS)} (what /encode answers in), got {form!r}")
    return '{"url": "${parameters.url}"' + (', "form": "query"}' if form == "query" else "}")


def connector_body(card: Mapping[str, Any], options: WiringOptions, *, redact: bool = False,
                   form: str = "stored") -> dict[str, Any]:
    """``POST /_plugins/_ml/connectors/_create``: POST {"url": ...} to ``<serve-url>/encode``
    (``form="query"``: {"url": ..., "form": "query"}, the query connector of posterior = prob models).

    ML Commons refuses a connector without a non-empty ``credential``; with no token the service runs
    open and the placeholder is sent but never checked. ``redact`` hides a real token (files, output).
    """
    names = Names.for_version(card["version"])
    token = options.token or "none"
    if options.token and redact:
        token = "<set FGPLUGIN_SERVE_TOKEN>"
    what = "query vectors (slack value dropped)" if form == "query" else "encoder"
    return {
        "name": names.connector_for(form),
        "description": (f"fgplugin {what} {names.version} ({len(card['attributes'])} attributes: "
                        f"{', '.join(card['attributes'])}) served by `fgplugin serve`"),
        "version": 1,
        "protocol": "http",
        "parameters": {"endpoint": options.serve_url, "model_version": str(card["version"])},
        "credential": {"token": token},
        "client_config": {"max_connection": int(options.max_connections)},
        "actions": [{
            "action_type": "predict",
            "method": "POST",
            "url": f"{options.serve_url}/encode",
            "headers": {"Content-Type": "application/json", "Authorization": "Bearer ${credential.token}"},
            "request_body": request_body(form),
        }],
    }


def model_group_body() -> dict[str, Any]:
    return {"name": MODEL_GROUP, "description": "fgplugin attribute encoders (one model per export version)"}


def register_model_body(card: Mapping[str, Any], connector_id: str, model_group_id: str,
                        form: str = "stored") -> dict[str, Any]:
    names = Names.for_version(card["version"])
    what = "query vectors" if form == "query" else "encoder"
    return {
        "name": names.model_for(form),
        "function_name": "remote",
        "model_group_id": model_group_id,
        "connector_id": connector_id,
        "description": f"fgplugin {what}, model card version {card['version']}",
    }


def output_names(card: Mapping[str, Any]) -> list[str]:
    """The fields a single-image ``/encode`` answer carries (what output_map may read)."""
    return [VERSION_KEY, *card["attributes"], CONCAT_FIELD]


def ingest_pipeline_body(card: Mapping[str, Any], model_id: str, options: WiringOptions) -> dict[str, Any]:
    # No "_meta": the API spec allows it (Elasticsearch's), but OpenSearch 2.19 refuses the pipeline
    # (found on the real node); the description names the model version instead.
    names = Names.for_version(card["version"])
    out = {emb_field(a): a for a in card["attributes"]}
    out[ALL_FIELD] = CONCAT_FIELD
    out["model_version"] = VERSION_KEY
    return {
        "description": (f"fgplugin {names.version}: encode the '{IMAGE_FIELD}' URL with {names.model} "
                        f"(fgplugin serve at {options.serve_url}); fills {', '.join(out)}"),
        "processors": [{"ml_inference": {
            "tag": "fgplugin-encode",
            "description": "image URL -> one vector per attribute + emb_all",
            "model_id": model_id,
            "input_map": [{"url": IMAGE_FIELD}],
            "output_map": [out],
            "ignore_missing": False,
        }}],
    }


# -- templating a compiled query -----------------------------------------------------------------
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


def search_pipeline_body(card: Mapping[str, Any], model_id: str, options: WiringOptions) -> dict[str, Any]:
    """``model_id``: the model whose vectors a query scores with, i.e. the query model where
    :func:`needs_query_form` (ML Commons puts the answer into the query as it is)."""
    names = Names.for_version(card["version"])
    template, placeholders = query_template(card, options)
    out_of = {emb_field(a): a for a in card["attributes"]}
    out_of[ALL_FIELD] = CONCAT_FIELD
    spec = query_spec(card, options)
    return {
        "description": (f"fgplugin {names.version}: {{\"query\": {{\"term\": {{\"{IMAGE_FIELD}\": URL}}}}}} -> "
                        f"{spec.mode} weighted query over {', '.join(f'{a}={w:g}' for a, w in spec.attributes.items())}, "
                        f"k={spec.k}, encoded by {names.model_for(query_form_of(card))}"),
        "request_processors": [{"ml_inference": {
            "tag": "fgplugin-image-query",
            "description": "query image URL -> per-attribute vectors -> the fgplugin query",
            "model_id": model_id,
            "input_map": [{"url": QUERY_INPUT_PATH}],
            "output_map": [{p: out_of[p] for p in placeholders}],
            "query_template": template,
            "ignore_missing": False,
        }}],
    }


def query_form_of(card: Mapping[str, Any]) -> str:
    """The /encode form the search pipeline's model answers in."""
    return "query" if needs_query_form(card) else "stored"


def image_query(url: str) -> dict[str, Any]:
    """The request to send through the search pipeline (``?search_pipeline=<name>``)."""
    return {"query": {"term": {IMAGE_FIELD: {"value": url}}}}


# -- the mustache search template ----------------------------------------------------------------
_TEMPLATE_PARAMS = ("size", "source", "filter", "fields", "weights", "vectors")


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


# -- what ML Commons does (offline simulators) ---------------------------------------------------
def java_list_string(values: Sequence[float]) -> str:
    """Java's ``List<Double>.toString()`` (how ML Commons fills a query_template placeholder):
    ``[0.25, -1.0E-4]``: plain decimals in [1e-3, 1e7), else ``d.dddE-n``; shortest round-trip digits."""

    def d(x: float) -> str:
        x = float(x)
        if x == 0 or 1e-3 <= abs(x) < 1e7:
            r = repr(x)
            return r if "." in r else r + ".0"
        mant, exp = np.format_float_scientific(x, unique=True, trim="0").split("e")
        return f"{mant}E{int(exp)}"

    return "[" + ", ".join(d(v) for v in values) + "]"


def _escape_json_string(s: str) -> str:
    return json.dumps(s)[1:-1]


def _read_path(obj: Any, path: str) -> Any:
    cur = obj
    for part in path.removeprefix("$.").split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise WiringError(f"cannot find field {path} in {json.dumps(obj)[:200]}")
        cur = cur[part]
    return cur


def connector_payload(connector: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON the connector POSTs: ``request_body`` with ``${parameters.x}`` filled (strings
    JSON-escaped, as ML Commons does for non-JSON values)."""
    action = connector["actions"][0]
    params = {**connector.get("parameters", {}), **parameters}

    def fill(m: re.Match) -> str:
        key = m.group(1)
        if not key.startswith("parameters."):
            return m.group(0)
        v = params.get(key.removeprefix("parameters."))
        if v is None:
            raise WiringError(f"connector request_body needs {key}, which nothing supplies")
        return _escape_json_string(v) if isinstance(v, str) else json.dumps(v)

    text = _PLACEHOLDER_RE.sub(fill, action["request_body"])
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WiringError(f"connector request_body is not JSON once filled ({e}): {text[:200]}") from None


Post = Callable[[str, dict[str, Any], dict[str, str]], dict[str, Any]]


def _predict(connector: Mapping[str, Any], parameters: Mapping[str, Any], post: Post) -> dict[str, Any]:
    action = connector["actions"][0]
    headers = {k: _PLACEHOLDER_RE.sub(lambda m: str(connector.get("credential", {}).get(
        m.group(1).removeprefix("credential."), m.group(0))), v) for k, v in action.get("headers", {}).items()}
    out = post(action["url"], connector_payload(connector, parameters), headers)
    if not isinstance(out, dict):
        raise WiringError("the service answered with a non-object; ML Commons needs a JSON object to map fields")
    return out  # the model output's dataAsMap


def _model_params(proc: Mapping[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    params = {}
    for model_field, path in proc["input_map"][0].items():
        v = _read_path(source, path)
        params[model_field] = v if isinstance(v, str) else json.dumps(v)
    return params


def simulate_ingest(pipeline: Mapping[str, Any], doc: Mapping[str, Any], connector: Mapping[str, Any],
                    post: Post) -> dict[str, Any]:
    """What the ingest pipeline's ml_inference processors make of ``doc`` (remote model, no post-process)."""
    out = dict(doc)
    for p in pipeline["processors"]:
        proc = p["ml_inference"]
        data = _predict(connector, _model_params(proc, out), post)
        for doc_field, model_field in proc["output_map"][0].items():
            if doc_field in out:
                raise WiringError(f"document already has field {doc_field}; ml_inference refuses to overwrite it")
            if model_field not in data:
                raise WiringError(f"model output has no field {model_field!r} (it has {', '.join(data)})")
            out[doc_field] = data[model_field]
    return out


def simulate_search(pipeline: Mapping[str, Any], request: Mapping[str, Any], connector: Mapping[str, Any],
                    post: Post) -> dict[str, Any]:
    """The search body the pipeline's ml_inference request processor produces from ``request``."""
    body: Any = dict(request)
    for p in pipeline["request_processors"]:
        proc = p["ml_inference"]
        data = _predict(connector, _model_params(proc, body), post)
        values = {}
        for name, model_field in proc["output_map"][0].items():
            if model_field not in data:
                raise WiringError(f"model output has no field {model_field!r} (it has {', '.join(data)})")
            v = data[model_field]
            values[name] = java_list_string(v) if isinstance(v, list) else (json.dumps(v) if isinstance(v, dict) else str(v))
        text = _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), proc["query_template"])
        body = json.loads(text)
    return body


# -- checks for what the spec does not cover -----------------------------------------------------
def _string_maps(v: Any) -> bool:
    return (isinstance(v, list) and bool(v) and all(
        isinstance(m, dict) and m and all(isinstance(k, str) and k and isinstance(x, str) and x for k, x in m.items())
        for m in v))


def check_ml_inference(proc: Any, where: str, *, kind: str, outputs: Sequence[str],
                       fields: Mapping[str, int] | None = None) -> list[str]:
    """Problems with one ``ml_inference`` processor config (empty list: fine).

    kind: ``ingest`` or ``search_request``. ``outputs``: the fields the model answers with; ``fields``:
    index field -> vector size (ingest output_map targets must be index fields).
    """
    p: list[str] = []
    if not isinstance(proc, dict):
        return [f"{where} must be an object"]
    allowed = INGEST_KEYS if kind == "ingest" else SEARCH_REQUEST_KEYS
    unknown = sorted(set(proc) - allowed)
    if unknown:
        p.append(f"{where}: unknown key(s) {', '.join(unknown)} (the processor factory refuses them)")
    if not isinstance(proc.get("model_id"), str) or not proc.get("model_id"):
        p.append(f"{where}.model_id must be a non-empty string")
    ins, outs = proc.get("input_map"), proc.get("output_map")
    if not _string_maps(ins):
        p.append(f"{where}.input_map must be a non-empty list of non-empty {{model_input: field}} string maps")
    if not _string_maps(outs):
        p.append(f"{where}.output_map must be a non-empty list of non-empty {{field: model_output}} string maps")
    if _string_maps(ins) and _string_maps(outs):
        if len(ins) != len(outs):
            p.append(f"{where}: input_map has {len(ins)} entries, output_map {len(outs)}; they must match")
        mpt = proc.get("max_prediction_tasks", 10)
        if not (isinstance(mpt, int) and not isinstance(mpt, bool) and mpt >= len(ins)):
            p.append(f"{where}.max_prediction_tasks must be an integer >= {len(ins)} (one task per input_map entry)")
        for i, m in enumerate(outs):
            for target, source in m.items():
                if source not in outputs:
                    p.append(f"{where}.output_map[{i}].{target}: the model has no output {source!r} "
                             f"(it returns {', '.join(outputs)})")
                if kind == "ingest" and fields is not None and target not in fields:
                    p.append(f"{where}.output_map[{i}]: {target!r} is not a field of the index")
    for key in ("ignore_missing", "ignore_failure", "full_response_path"):
        if key in proc and not isinstance(proc[key], bool):
            p.append(f"{where}.{key} must be true or false")
    if proc.get("function_name", "remote").lower() != "remote":
        p.append(f"{where}.function_name must be remote (the encoder is an ML Commons remote model)")
    if kind == "search_request" and "query_template" in proc:
        t = proc["query_template"]
        if not isinstance(t, str):
            p.append(f"{where}.query_template must be a string")
        elif _string_maps(outs):
            names = set(_PLACEHOLDER_RE.findall(t))
            keys = {k for m in outs for k in m}
            if names - keys:
                p.append(f"{where}.query_template uses ${{{', '.join(sorted(names - keys))}}}, which no output_map fills")
            if keys - names:
                p.append(f"{where}.output_map fills {', '.join(sorted(keys - names))}, which the query_template never uses")
            try:
                json.loads(_PLACEHOLDER_RE.sub("[0.5, 0.5]", t))
            except json.JSONDecodeError as e:
                p.append(f"{where}.query_template is not JSON once its placeholders are filled ({e})")
    return p


def check_connector(body: Mapping[str, Any], serve_url: str, form: str = "stored") -> list[str]:
    p: list[str] = []
    if not body.get("credential"):
        p.append("credential must be a non-empty object (ML Commons refuses an empty one)")
    actions = body.get("actions") or []
    predict = [a for a in actions if a.get("action_type") == "predict"]
    if len(predict) != 1:
        p.append("exactly one predict action is needed")
        return p
    a = predict[0]
    if a.get("url") != f"{serve_url}/encode" or a.get("method") != "POST":
        p.append(f"the predict action must POST {serve_url}/encode")
    try:
        url = 'http://img.example/a "quoted" \\ name.jpg'
        payload = connector_payload(body, {"url": url})
        want = {"url": url, "form": "query"} if form == "query" else {"url": url}
        if payload != want:
            p.append(f"request_body must send exactly {sorted(want)} ({form} form), sends {payload}")
    except WiringError as e:
        p.append(str(e))
    if a.get("post_process_function") or a.get("pre_process_function"):
        p.append("no pre/post-process function: the service's flat answer is what output_map reads")
    return p


def check_plan_bodies(card: Mapping[str, Any], options: WiringOptions, bodies: Mapping[str, Any],
                      index_fields: Mapping[str, int] | None = None) -> None:
    """Run the project's checks over the generated bodies; raise WiringError listing every problem."""
    outs = output_names(card)
    problems = [f"connector: {x}" for x in check_connector(bodies["connector"], options.serve_url)]
    if "query_connector" in bodies:
        problems += [f"query connector: {x}" for x in check_connector(bodies["query_connector"], options.serve_url, "query")]
    elif needs_query_form(card):
        problems.append("a posterior = prob model needs the query connector for the search pipeline")
    for i, proc in enumerate(bodies["ingest_pipeline"]["processors"]):
        problems += check_ml_inference(proc.get("ml_inference"), f"ingest.processors[{i}].ml_inference",
                                       kind="ingest", outputs=outs, fields=index_fields)
    for i, proc in enumerate(bodies["search_pipeline"]["request_processors"]):
        problems += check_ml_inference(proc.get("ml_inference"), f"search.request_processors[{i}].ml_inference",
                                       kind="search_request", outputs=outs)
    if problems:
        raise WiringError("generated wiring refused: " + "; ".join(problems))


# -- cluster settings ----------------------------------------------------------------------------
def endpoint_regex(serve_url: str) -> str:
    """A trusted-endpoint regex (Java syntax; also valid Python) matching exactly this service's URLs."""
    return "^" + re.escape(serve_url) + "/.*$"


def is_private_host(host: str) -> bool:
    """Loopback, private, link-local or a bare/docker-style name (ML Commons' SSRF guard refuses those)."""
    try:
        addrs = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        if "." not in host or host.endswith((".local", ".internal", ".lan", ".localhost")):
            return True
        try:
            addrs = [ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, None)[:4]]
        except OSError:
            return True  # unresolvable here: likely a private DNS name
    return any(a.is_private or a.is_loopback or a.is_link_local for a in addrs)


def cluster_settings_body(options: WiringOptions) -> dict[str, Any]:
    s: dict[str, Any] = {
        "plugins.ml_commons.trusted_connector_endpoints_regex": [endpoint_regex(options.serve_url)],
        "plugins.ml_commons.only_run_on_ml_node": False,
    }
    if is_private_host(urlsplit(options.serve_url).hostname or ""):
        s["plugins.ml_commons.connector.private_ip_enabled"] = True
    return {"persistent": s}


def cluster_settings_warnings(options: WiringOptions) -> list[str]:
    body = cluster_settings_body(options)["persistent"]
    out = [
        "plugins.ml_commons.trusted_connector_endpoints_regex REPLACES the cluster's list (the defaults allow "
        "well-known hosted model APIs); merge it with the entries you still need",
        "plugins.ml_commons.only_run_on_ml_node=false lets remote models run on data nodes (clusters without ML nodes)",
    ]
    if "plugins.ml_commons.connector.private_ip_enabled" in body:
        out.append(f"{urlsplit(options.serve_url).hostname} is a private/loopback address: "
                   "plugins.ml_commons.connector.private_ip_enabled=true turns off ML Commons' SSRF guard for "
                   "private addresses on every connector")
    return out


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class Step:
    key: str  # file stem and report name
    method: str
    path: str
    body: Any
    spec: tuple[str, str] | None  # (namespace file, requestBodies name) in the OpenSearch API spec
    note: str = ""


def plan(card: Mapping[str, Any], options: WiringOptions, ids: Mapping[str, str] | None = None,
         *, redact: bool = True) -> list[Step]:
    """Every request of the setup, in order; ids not known yet appear as ``<connector_id>`` etc."""
    ids = dict(ids or {})
    names = Names.for_version(card["version"])
    connector_id = ids.get("connector", "<connector_id>")
    group_id = ids.get("model_group", "<model_group_id>")
    model_id = ids.get("model", "<model_id>")
    query = needs_query_form(card)
    query_connector_id = ids.get("query_connector", "<query_connector_id>")
    query_model_id = ids.get("query_model", "<query_model_id>") if query else model_id
    bodies = {
        "connector": connector_body(card, options, redact=redact),
        "ingest_pipeline": ingest_pipeline_body(card, model_id, options),
        "search_pipeline": search_pipeline_body(card, query_model_id, options),
    }
    if query:
        bodies["query_connector"] = connector_body(card, options, redact=redact, form="query")
    layout = layout_for(card, options.metadata_types)
    fields = {emb_field(a): layout.dims[a] for a in layout.attributes}
    fields[ALL_FIELD] = layout.total_dim
    fields["model_version"] = 0
    check_plan_bodies(card, options, bodies, fields)
    query_steps = [
        Step("query-connector", "POST", f"{ML}/connectors/_create", bodies["query_connector"],
             ("ml.yaml", "ml.create_connector"), f"name {names.query_connector}: queries drop the slack value"),
        Step("query-model", "POST", f"{ML}/models/_register",
             register_model_body(card, query_connector_id, group_id, form="query"), ("ml.yaml", "ml.register_model"),
             f"name {names.query_model}"),
        Step("query-model-deploy", "POST", f"{ML}/models/{query_model_id}/_deploy", None, None),
    ] if query else []
    return [
        Step("cluster-settings", "PUT", "/_cluster/settings", cluster_settings_body(options),
             ("cluster.yaml", "cluster.put_settings"), "printed, applied only with --cluster-settings"),
        Step("stored-script", "PUT", f"/_scripts/{names.script}", stored_script_body(), ("_core.yaml", "put_script")),
        Step("search-template", "PUT", f"/_scripts/{names.template}", search_template_body(card),
             ("_core.yaml", "put_script")),
        Step("connector", "POST", f"{ML}/connectors/_create", bodies["connector"], ("ml.yaml", "ml.create_connector"),
             f"name {names.connector}"),
        Step("model-group", "POST", f"{ML}/model_groups/_register", model_group_body(),
             ("ml.yaml", "ml.register_model_group"), f"name {MODEL_GROUP}"),
        Step("model", "POST", f"{ML}/models/_register", register_model_body(card, connector_id, group_id),
             ("ml.yaml", "ml.register_model"), f"name {names.model}"),
        Step("model-deploy", "POST", f"{ML}/models/{model_id}/_deploy", None, None),
        *query_steps,
        Step("ingest-pipeline", "PUT", f"/_ingest/pipeline/{names.ingest_pipeline}", bodies["ingest_pipeline"],
             ("ingest.yaml", "ingest.put_pipeline")),
        Step("search-pipeline", "PUT", f"/_search/pipeline/{names.search_pipeline}", bodies["search_pipeline"],
             ("search_pipeline.yaml", "search_pipeline.put")),
    ]


def write_plan(steps: Sequence[Step], out_dir: str | Path) -> list[Path]:
    """One JSON file per request (``NN-key.json`` with method, path and body) plus ``plan.json``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for i, s in enumerate(steps):
        p = d / f"{i:02d}-{s.key}.json"
        p.write_text(json.dumps({"method": s.method, "path": s.path, "body": s.body, "note": s.note}, indent=2) + "\n",
                     encoding="utf-8")
        written.append(p)
    (d / "plan.json").write_text(json.dumps([{"method": s.method, "path": s.path, "body": s.body} for s in steps],
                                            indent=2) + "\n", encoding="utf-8")
    return written + [d / "plan.json"]


# -- applying ------------------------------------------------------------------------------------
@dataclass
class Applied:
    key: str
    name: str
    id: str
    action: str  # created | reused | updated | unchanged | deployed | skipped


@dataclass
class SetupResult:
    names: Names
    index: str  # the versioned index documents should be written to
    ids: dict[str, str]
    rows: list[Applied]
    warnings: list[str]


def _search_by_name(store: Any, path: str, name: str, what: str) -> list[dict[str, Any]]:
    body = {"query": {"match_phrase": {"name": name}}, "size": 20}
    try:
        res = store.call(f"looking up {what} {name!r}", store.client.transport.perform_request, "POST", path, body=body)
    except StoreError as e:
        if "index_not_found" in str(e) or "HTTP 404" in str(e):
            return []  # ML Commons creates its system indices on first use
        raise
    hits = (res or {}).get("hits", {}).get("hits", [])
    return [h for h in hits if (h.get("_source") or {}).get("name") == name]


def _put_if_changed(store: Any, key: str, name: str, path: str, body: Any, current: Callable[[], Any]) -> Applied:
    try:
        have = current()
    except StoreError as e:
        if "HTTP 404" not in str(e):
            raise
        have = None
    if have == body:
        return Applied(key, name, name, "unchanged")
    store.call(f"writing {key} {name!r}", store.client.transport.perform_request, "PUT", path, body=body)
    return Applied(key, name, name, "created" if have is None else "updated")


def _trusted(regexes: Any, url: str) -> bool:
    if isinstance(regexes, str):
        regexes = [regexes]
    for r in regexes or []:
        try:
            if re.fullmatch(r, url):
                return True
        except re.error:
            continue
    return False


def current_cluster_settings(store: Any) -> dict[str, Any]:
    res = store.call("reading cluster settings", store.client.cluster.get_settings, include_defaults=True,
                     flat_settings=True)
    merged: dict[str, Any] = {}
    for scope in ("defaults", "persistent", "transient"):  # later scopes win, as on the server
        merged.update(res.get(scope) or {})
    return merged


def missing_cluster_settings(current: Mapping[str, Any], options: WiringOptions) -> list[str]:
    want = cluster_settings_body(options)["persistent"]
    out = []
    regexes = current.get("plugins.ml_commons.trusted_connector_endpoints_regex")
    if regexes is None:  # flat settings list arrays as key.0, key.1, ...
        regexes = [v for k, v in current.items() if k.startswith("plugins.ml_commons.trusted_connector_endpoints_regex.")]
    if not _trusted(regexes, f"{options.serve_url}/encode"):
        out.append("plugins.ml_commons.trusted_connector_endpoints_regex")
    for k, v in want.items():
        if k.endswith("trusted_connector_endpoints_regex"):
            continue
        if str(current.get(k, "")).lower() != str(v).lower():
            out.append(k)
    return out


def apply(card: Mapping[str, Any], options: WiringOptions, store: Any, *, cluster_settings: bool = False,
          deploy_timeout_s: float = 120.0, log: Callable[[str], None] = lambda s: None) -> SetupResult:
    """Register everything on the cluster behind ``store`` (an ``OpenSearchStore``), idempotently."""
    names = Names.for_version(card["version"])
    t = store.client.transport
    rows: list[Applied] = []
    warnings: list[str] = []

    # 0. cluster settings: the connector cannot be created until its URL is trusted.
    missing = missing_cluster_settings(current_cluster_settings(store), options)
    if missing and cluster_settings:
        store.call("updating cluster settings", store.client.cluster.put_settings, body=cluster_settings_body(options))
        rows.append(Applied("cluster-settings", ", ".join(missing), "-", "updated"))
        warnings += cluster_settings_warnings(options)
    elif missing:
        raise WiringError(
            f"the cluster does not allow the encoder yet: {', '.join(missing)}. Review and run\n"
            f"PUT _cluster/settings {json.dumps(cluster_settings_body(options))}\n"
            "(or rerun with --cluster-settings). " + " ".join(cluster_settings_warnings(options)))
    else:
        rows.append(Applied("cluster-settings", "all present", "-", "unchanged"))

    # 1. the index for this model version (mapping fields the pipeline fills), and the stored script.
    layout = layout_for(card, options.metadata_types)
    store.ensure_index(layout)  # also stores the painless script
    index = versioned_index_name(store.alias, card["version"])
    read = store.get_layout()
    if read is not None and read.model_version != layout.model_version:
        warnings.append(f"alias {store.alias!r} still reads model {read.model_version[:12]}; documents indexed through "
                        f"the pipeline go to {index!r} (fgplugin index ... then promote swaps the alias)")
    rows.append(Applied("index", index, index, "ready"))
    rows.append(Applied("stored-script", names.script, names.script, "stored"))

    # 2. search template (mustache stored script).
    tmpl = search_template_body(card)
    rows.append(_put_if_changed(
        store, "search-template", names.template, f"/_scripts/{names.template}", tmpl,
        lambda: {"script": {k: v for k, v in (store.call("reading search template", t.perform_request, "GET",
                                                          f"/_scripts/{names.template}").get("script") or {}).items()
                            if k in ("lang", "source")}}))

    # 3. model group, then connector + model (looked up by name first): one pair, and for posterior = prob
    # models a second that answers in the query form, for the search pipeline.
    ids: dict[str, str] = {}
    found = _search_by_name(store, f"{ML}/model_groups/_search", MODEL_GROUP, "model group")
    if found:
        ids["model_group"] = found[0]["_id"]
        rows.append(Applied("model-group", MODEL_GROUP, ids["model_group"], "reused"))
    else:
        res = store.call("registering the model group", t.perform_request, "POST", f"{ML}/model_groups/_register",
                         body=model_group_body())
        ids["model_group"] = res["model_group_id"]
        rows.append(Applied("model-group", MODEL_GROUP, ids["model_group"], "created"))
    for form in ("stored", "query") if needs_query_form(card) else ("stored",):
        ids.update(_ensure_model(store, card, options, form, ids["model_group"], deploy_timeout_s, rows))

    # 4. pipelines (PUT by id; unchanged ones are left alone).
    steps = {s.key: s for s in plan(card, options, ids, redact=False)}
    for key, get_path in (("ingest-pipeline", f"/_ingest/pipeline/{names.ingest_pipeline}"),
                          ("search-pipeline", f"/_search/pipeline/{names.search_pipeline}")):
        s = steps[key]
        name = s.path.rsplit("/", 1)[-1]
        rows.append(_put_if_changed(store, key, name, s.path, s.body,
                                    lambda p=get_path, n=name: (store.call(f"reading {n}", t.perform_request, "GET", p)
                                                                or {}).get(n)))
        log(f"{key} {name}: {rows[-1].action}")
    return SetupResult(names, index, ids, rows, warnings)


def _ensure_model(store: Any, card: Mapping[str, Any], options: WiringOptions, form: str, group_id: str,
                  deploy_timeout_s: float, rows: list[Applied]) -> dict[str, str]:
    """The connector and deployed remote model for one /encode form: ``{"connector": id, "model": id}``
    (keys prefixed ``query_`` for the query form); reused when one of the name exists."""
    names = Names.for_version(card["version"])
    t = store.client.transport
    prefix = "query_" if form == "query" else ""
    key = prefix.replace("_", "-")
    cname, mname = names.connector_for(form), names.model_for(form)
    found = _search_by_name(store, f"{ML}/connectors/_search", cname, "connector")
    if found:
        connector_id = found[0]["_id"]
        rows.append(Applied(f"{key}connector", cname, connector_id, "reused"))
    else:
        res = store.call(f"creating the connector {cname}", t.perform_request, "POST", f"{ML}/connectors/_create",
                         body=connector_body(card, options, form=form))
        connector_id = res["connector_id"]
        rows.append(Applied(f"{key}connector", cname, connector_id, "created"))
    found = [h for h in _search_by_name(store, f"{ML}/models/_search", mname, "model")
             if (h.get("_source") or {}).get("connector_id") in (None, connector_id)]
    if found:
        model_id = found[0]["_id"]
        rows.append(Applied(f"{key}model", mname, model_id, "reused"))
    else:
        res = store.call(f"registering the model {mname}", t.perform_request, "POST", f"{ML}/models/_register",
                         body=register_model_body(card, connector_id, group_id, form=form))
        model_id = res.get("model_id") or _wait_task(store, res["task_id"], deploy_timeout_s)["model_id"]
        rows.append(Applied(f"{key}model", mname, model_id, "created"))
    state = store.call("reading the model", t.perform_request, "GET", f"{ML}/models/{model_id}").get("model_state")
    if state != "DEPLOYED":
        store.call(f"deploying the model {mname}", t.perform_request, "POST", f"{ML}/models/{model_id}/_deploy")
        deadline = time.monotonic() + deploy_timeout_s
        while state != "DEPLOYED":
            if time.monotonic() > deadline:
                raise WiringError(f"model {model_id} is {state} after {deploy_timeout_s:g} s of deploying; "
                                  "check GET _plugins/_ml/profile/models")
            time.sleep(1.0)
            state = store.call("reading the model", t.perform_request, "GET", f"{ML}/models/{model_id}").get("model_state")
        rows.append(Applied(f"{key}model-deploy", mname, model_id, "deployed"))
    else:
        rows.append(Applied(f"{key}model-deploy", mname, model_id, "unchanged"))
    return {f"{prefix}connector": connector_id, f"{prefix}model": model_id}


def _wait_task(store: Any, task_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        task = store.call("reading an ML task", store.client.transport.perform_request, "GET", f"{ML}/tasks/{task_id}")
        if task.get("state") == "COMPLETED":
            return task
        if task.get("state") in ("FAILED", "CANCELLED") or time.monotonic() > deadline:
            raise WiringError(f"ML task {task_id} ended {task.get('state')}: {task.get('error', '')}")
        time.sleep(1.0)


def teardown(card: Mapping[str, Any], store: Any, ids: Mapping[str, str]) -> None:
    """Remove what ``apply`` registered for this model version (the live test's cleanup)."""
    names = Names.for_version(card["version"])
    t = store.client.transport
    calls = [("DELETE", f"/_search/pipeline/{names.search_pipeline}"),
             ("DELETE", f"/_ingest/pipeline/{names.ingest_pipeline}")]
    for prefix in ("", "query_"):
        calls += [("POST", f"{ML}/models/{ids.get(prefix + 'model')}/_undeploy"),
                  ("DELETE", f"{ML}/models/{ids.get(prefix + 'model')}"),
                  ("DELETE", f"{ML}/connectors/{ids.get(prefix + 'connector')}")]
    for method, path in calls:
        if "None" in path:
            continue
        try:
            store.call(f"{method} {path}", t.perform_request, method, path)
        except StoreError:
            pass


__all__ = [
    "TEMPLATE_ID", "MODEL_GROUP", "IMAGE_FIELD", "QUERY_INPUT_PATH", "DEFAULT_SERVE_URL", "WiringError", "Names",
    "WiringOptions", "Step", "Applied", "SetupResult", "connector_body", "model_group_body", "register_model_body",
    "ingest_pipeline_body", "search_pipeline_body", "query_template", "image_query", "search_template_body",
    "search_template_source", "search_template_request", "render_mustache", "simulate_ingest", "simulate_search",
    "java_list_string", "connector_payload", "check_ml_inference", "check_connector", "check_plan_bodies",
    "cluster_settings_body", "cluster_settings_warnings", "endpoint_regex", "is_private_host", "plan", "write_plan",
    "apply", "teardown", "output_names", "layout_for", "query_spec", "missing_cluster_settings", "needs_query_form",
    "query_form_of", "request_body",
]
