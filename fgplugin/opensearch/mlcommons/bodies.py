"""The ML Commons request bodies: connector(s), model group and remote model(s), ingest and search
pipelines, and the request a client sends through the search pipeline.

How ML Commons moves the data (checked against ml-commons' code; ``simulate`` does the same so the
tests can run the whole chain against ``fgplugin serve`` without a cluster):

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
  vectors swapped for placeholders (``templates.query_template``), so it is exactly the query
  ``fgplugin query`` sends.
- A ``posterior = prob`` model stores [p, slack] vectors, and a query must drop the slack value
  (``fgplugin.similarity``). ML Commons puts the service's answer into the query as it is, so the
  search pipeline calls a second connector that asks ``/encode`` for ``"form": "query"``: the
  service drops it. Documents are still encoded (ingest pipeline) in the stored form.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...serve_api import CONCAT_FIELD, FORMS, VERSION_KEY
from ..mapping import ALL_FIELD, emb_field
from .inputs import WiringOptions, query_form_of, query_spec
from .names import IMAGE_FIELD, MODEL_GROUP, QUERY_INPUT_PATH, Names, WiringError
from .templates import query_template

assert CONCAT_FIELD == ALL_FIELD, "the service's concatenated output must be the index's emb_all field"


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


def search_pipeline_body(card: Mapping[str, Any], model_id: str, options: WiringOptions) -> dict[str, Any]:
    """``model_id``: the model whose vectors a query scores with, i.e. the query model where
    ``inputs.needs_query_form`` (ML Commons puts the answer into the query as it is)."""
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


def image_query(url: str) -> dict[str, Any]:
    """The request to send through the search pipeline (``?search_pipeline=<name>``)."""
    return {"query": {"term": {IMAGE_FIELD: {"value": url}}}}


__all__ = ["request_body", "connector_body", "model_group_body", "register_model_body", "ingest_pipeline_body",
           "search_pipeline_body", "image_query"]
