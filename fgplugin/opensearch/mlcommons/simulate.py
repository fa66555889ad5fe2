"""What ML Commons does with the generated bodies, offline: the JSON a connector POSTs, and what the
ingest and search pipelines' ``ml_inference`` processors make of a document or a request (remote
model, no pre/post-process function; see ``bodies`` for how the data moves). ``post`` does the HTTP
call, so the tests run the chain against a real ``fgplugin serve`` without a cluster."""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .names import WiringError

PLACEHOLDER_RE = re.compile(r"\$\{([^}]+)\}")  # ${parameters.x}, ${credential.x}, a query_template's ${emb_a}

Post = Callable[[str, dict[str, Any], dict[str, str]], dict[str, Any]]  # (url, json body, headers) -> answer


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

    text = PLACEHOLDER_RE.sub(fill, action["request_body"])
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WiringError(f"connector request_body is not JSON once filled ({e}): {text[:200]}") from None


def _predict(connector: Mapping[str, Any], parameters: Mapping[str, Any], post: Post) -> dict[str, Any]:
    action = connector["actions"][0]
    headers = {k: PLACEHOLDER_RE.sub(lambda m: str(connector.get("credential", {}).get(
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
        text = PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), proc["query_template"])
        body = json.loads(text)
    return body


__all__ = ["PLACEHOLDER_RE", "Post", "java_list_string", "connector_payload", "simulate_ingest", "simulate_search"]
