"""The project's checks of the generated ML Commons bodies where the OpenSearch API spec
(``../shared/opensearch-api-spec``) has no schema (the ``ml_inference`` processors) or does not say
what ML Commons needs of a connector. ``check_plan_bodies`` runs them all before anything is sent."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .inputs import WiringOptions, needs_query_form, output_names
from .names import WiringError
from .simulate import PLACEHOLDER_RE, connector_payload

INGEST_KEYS = {"model_id", "input_map", "output_map", "model_config", "max_prediction_tasks", "ignore_missing",
               "function_name", "full_response_path", "model_input", "tag", "description", "if", "on_failure",
               "ignore_failure"}
SEARCH_REQUEST_KEYS = {"model_id", "query_template", "input_map", "output_map", "optional_input_map",
                       "optional_output_map", "model_config", "max_prediction_tasks", "ignore_missing",
                       "function_name", "full_response_path", "model_input", "tag", "description", "ignore_failure"}


def _string_maps(v: Any) -> bool:
    return (isinstance(v, list) and bool(v) and all(
        isinstance(m, dict) and m and all(isinstance(k, str) and k and isinstance(x, str) and x for k, x in m.items())
        for m in v))


def _check_maps(proc: dict, where: str, kind: str, outputs: Sequence[str], fields: Mapping[str, int] | None,
                p: list[str]) -> None:
    """input_map / output_map: string maps, as many of each, outputs the model has, index fields."""
    ins, outs = proc.get("input_map"), proc.get("output_map")
    if not _string_maps(ins):
        p.append(f"{where}.input_map must be a non-empty list of non-empty {{model_input: field}} string maps")
    if not _string_maps(outs):
        p.append(f"{where}.output_map must be a non-empty list of non-empty {{field: model_output}} string maps")
    if not (_string_maps(ins) and _string_maps(outs)):
        return
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


def _check_query_template(proc: dict, where: str, p: list[str]) -> None:
    """A search request processor's query_template: JSON once filled, placeholders == output_map keys."""
    t, outs = proc["query_template"], proc.get("output_map")
    if not isinstance(t, str):
        p.append(f"{where}.query_template must be a string")
        return
    if not _string_maps(outs):
        return
    names = set(PLACEHOLDER_RE.findall(t))
    keys = {k for m in outs for k in m}
    if names - keys:
        p.append(f"{where}.query_template uses ${{{', '.join(sorted(names - keys))}}}, which no output_map fills")
    if keys - names:
        p.append(f"{where}.output_map fills {', '.join(sorted(keys - names))}, which the query_template never uses")
    try:
        json.loads(PLACEHOLDER_RE.sub("[0.5, 0.5]", t))
    except json.JSONDecodeError as e:
        p.append(f"{where}.query_template is not JSON once its placeholders are filled ({e})")


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
    _check_maps(proc, where, kind, outputs, fields, p)
    for key in ("ignore_missing", "ignore_failure", "full_response_path"):
        if key in proc and not isinstance(proc[key], bool):
            p.append(f"{where}.{key} must be true or false")
    if proc.get("function_name", "remote").lower() != "remote":
        p.append(f"{where}.function_name must be remote (the encoder is an ML Commons remote model)")
    if kind == "search_request" and "query_template" in proc:
        _check_query_template(proc, where, p)
    return p


def check_connector(body: Mapping[str, Any], serve_url: str, form: str = "stored") -> list[str]:
    """Problems with a connector body (empty list: fine): one predict action POSTing exactly what
    ``/encode`` takes in ``form``, a credential, no pre/post-process function."""
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


__all__ = ["INGEST_KEYS", "SEARCH_REQUEST_KEYS", "check_ml_inference", "check_connector", "check_plan_bodies"]
