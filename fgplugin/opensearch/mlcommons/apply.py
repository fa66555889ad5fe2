"""Registering the wiring on a cluster (``apply``), idempotently: objects are looked up by name and
reused, PUT-by-id objects are rewritten only when they changed, and nothing is written until the
cluster settings allow the connector. ``teardown`` removes what ``apply`` registered."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ...errors import StoreError
from ...search.store import IndexLayout
from ..mapping import versioned_index_name
from ..store import OpenSearchStore
from .bodies import connector_body, model_group_body, register_model_body
from .inputs import WiringOptions, layout_for, needs_query_form
from .names import ML, MODEL_GROUP, Names, WiringError
from .plan import plan
from .settings import (cluster_settings_body, cluster_settings_warnings, current_cluster_settings,
                       missing_cluster_settings)
from .templates import search_template_body


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


def _request(store: OpenSearchStore, what: str, method: str, path: str, body: Any = None) -> Any:
    """One REST call through the store (its error handling and retries)."""
    return store.call(what, store.client.transport.perform_request, method, path, body=body)


def _search_by_name(store: OpenSearchStore, path: str, name: str, what: str) -> list[dict[str, Any]]:
    body = {"query": {"match_phrase": {"name": name}}, "size": 20}
    try:
        res = _request(store, f"looking up {what} {name!r}", "POST", path, body)
    except StoreError as e:
        if "index_not_found" in str(e) or "HTTP 404" in str(e):
            return []  # ML Commons creates its system indices on first use
        raise
    hits = (res or {}).get("hits", {}).get("hits", [])
    return [h for h in hits if (h.get("_source") or {}).get("name") == name]


def _put_if_changed(store: OpenSearchStore, key: str, name: str, path: str, body: Any,
                    current: Callable[[], Any]) -> Applied:
    try:
        have = current()
    except StoreError as e:
        if "HTTP 404" not in str(e):
            raise
        have = None
    if have == body:
        return Applied(key, name, name, "unchanged")
    _request(store, f"writing {key} {name!r}", "PUT", path, body)
    return Applied(key, name, name, "created" if have is None else "updated")


def _ensure_cluster_settings(store: OpenSearchStore, options: WiringOptions, apply_them: bool,
                             warnings: list[str]) -> Applied:
    """The connector cannot be created until its URL is trusted: apply the settings, or refuse."""
    missing = missing_cluster_settings(current_cluster_settings(store), options)
    if not missing:
        return Applied("cluster-settings", "all present", "-", "unchanged")
    if not apply_them:
        raise WiringError(
            f"the cluster does not allow the encoder yet: {', '.join(missing)}. Review and run\n"
            f"PUT _cluster/settings {json.dumps(cluster_settings_body(options))}\n"
            "(or rerun with --cluster-settings). " + " ".join(cluster_settings_warnings(options)))
    store.call("updating cluster settings", store.client.cluster.put_settings, body=cluster_settings_body(options))
    warnings += cluster_settings_warnings(options)
    return Applied("cluster-settings", ", ".join(missing), "-", "updated")


def refuse_grown_index(read: IndexLayout | None, layout: IndexLayout, alias: str) -> None:
    """WiringError for an index that attributes were added to in place (``OpenSearchStore.add_attributes``): the
    service's emb_all concatenates every attribute of the card, and this index's emb_all cannot grow."""
    if read is not None and read.model_version == layout.model_version and read.combined:
        raise WiringError(
            f"the index behind {alias!r} had attributes added in place (`fgplugin index` with an extended model): its emb_all "
            f"covers {', '.join(a for a, _ in read.combined)} only, while the ingest pipeline would write emb_all over "
            f"{', '.join(layout.attributes)} (refused by the server per document); index it with `fgplugin index`, or "
            "index the extended model into a new --index name and wire that one")


def _ensure_index(store: OpenSearchStore, card: Mapping[str, Any], options: WiringOptions,
                  warnings: list[str]) -> str:
    """The index for this model version (mapping the fields the pipeline fills) and the stored script;
    returns the index name."""
    layout = layout_for(card, options.metadata_types)
    store.ensure_index(layout)  # also stores the painless script
    index = versioned_index_name(store.alias, card["version"])
    read = store.layout
    refuse_grown_index(read, layout, store.alias)
    if read is not None and read.model_version != layout.model_version:
        warnings.append(f"alias {store.alias!r} still reads model {read.model_version[:12]}; documents indexed through "
                        f"the pipeline go to {index!r} (fgplugin index ... then promote swaps the alias)")
    return index


def _put_search_template(store: OpenSearchStore, card: Mapping[str, Any], names: Names) -> Applied:
    path = f"/_scripts/{names.template}"

    def current() -> Any:
        script = _request(store, "reading search template", "GET", path).get("script") or {}
        return {"script": {k: v for k, v in script.items() if k in ("lang", "source")}}

    return _put_if_changed(store, "search-template", names.template, path, search_template_body(card), current)


def _ensure_model_group(store: OpenSearchStore, rows: list[Applied]) -> str:
    found = _search_by_name(store, f"{ML}/model_groups/_search", MODEL_GROUP, "model group")
    if found:
        rows.append(Applied("model-group", MODEL_GROUP, found[0]["_id"], "reused"))
    else:
        res = _request(store, "registering the model group", "POST", f"{ML}/model_groups/_register", model_group_body())
        rows.append(Applied("model-group", MODEL_GROUP, res["model_group_id"], "created"))
    return rows[-1].id


def _put_pipelines(store: OpenSearchStore, card: Mapping[str, Any], options: WiringOptions, ids: Mapping[str, str],
                   log: Callable[[str], None]) -> list[Applied]:
    """The ingest and search pipelines (PUT by id; unchanged ones are left alone)."""
    names = Names.for_version(card["version"])
    steps = {s.key: s for s in plan(card, options, ids, redact=False)}
    rows = []
    for key, get_path in (("ingest-pipeline", f"/_ingest/pipeline/{names.ingest_pipeline}"),
                          ("search-pipeline", f"/_search/pipeline/{names.search_pipeline}")):
        s = steps[key]
        name = s.path.rsplit("/", 1)[-1]
        rows.append(_put_if_changed(store, key, name, s.path, s.body,
                                    lambda p=get_path, n=name: (_request(store, f"reading {n}", "GET", p)
                                                                or {}).get(n)))
        log(f"{key} {name}: {rows[-1].action}")
    return rows


def apply(card: Mapping[str, Any], options: WiringOptions, store: OpenSearchStore, *, cluster_settings: bool = False,
          deploy_timeout_s: float = 120.0, log: Callable[[str], None] = lambda s: None) -> SetupResult:
    """Register everything on the cluster behind ``store``, idempotently."""
    names = Names.for_version(card["version"])
    warnings: list[str] = []
    rows = [_ensure_cluster_settings(store, options, cluster_settings, warnings)]
    index = _ensure_index(store, card, options, warnings)
    rows.append(Applied("index", index, index, "ready"))
    rows.append(Applied("stored-script", names.script, names.script, "stored"))
    rows.append(_put_search_template(store, card, names))
    # One connector + model pair, and for posterior = prob models a second that answers in the query
    # form, for the search pipeline.
    ids = {"model_group": _ensure_model_group(store, rows)}
    for form in ("stored", "query") if needs_query_form(card) else ("stored",):
        ids.update(_ensure_model(store, card, options, form, ids["model_group"], deploy_timeout_s, rows))
    rows += _put_pipelines(store, card, options, ids, log)
    return SetupResult(names, index, ids, rows, warnings)


def _ensure_connector(store: OpenSearchStore, card: Mapping[str, Any], options: WiringOptions, form: str,
                      key: str) -> Applied:
    cname = Names.for_version(card["version"]).connector_for(form)
    found = _search_by_name(store, f"{ML}/connectors/_search", cname, "connector")
    if found:
        return Applied(f"{key}connector", cname, found[0]["_id"], "reused")
    res = _request(store, f"creating the connector {cname}", "POST", f"{ML}/connectors/_create",
                   connector_body(card, options, form=form))
    return Applied(f"{key}connector", cname, res["connector_id"], "created")


def _register_model(store: OpenSearchStore, card: Mapping[str, Any], form: str, key: str, connector_id: str,
                    group_id: str, deploy_timeout_s: float) -> Applied:
    mname = Names.for_version(card["version"]).model_for(form)
    found = [h for h in _search_by_name(store, f"{ML}/models/_search", mname, "model")
             if (h.get("_source") or {}).get("connector_id") in (None, connector_id)]
    if found:
        return Applied(f"{key}model", mname, found[0]["_id"], "reused")
    res = _request(store, f"registering the model {mname}", "POST", f"{ML}/models/_register",
                   register_model_body(card, connector_id, group_id, form=form))
    model_id = res.get("model_id") or _wait_task(store, res["task_id"], deploy_timeout_s)["model_id"]
    return Applied(f"{key}model", mname, model_id, "created")


def _deploy(store: OpenSearchStore, key: str, mname: str, model_id: str, deploy_timeout_s: float) -> Applied:
    """Deploy the model unless it is deployed already; wait until it is."""
    state = _request(store, "reading the model", "GET", f"{ML}/models/{model_id}").get("model_state")
    if state == "DEPLOYED":
        return Applied(f"{key}model-deploy", mname, model_id, "unchanged")
    _request(store, f"deploying the model {mname}", "POST", f"{ML}/models/{model_id}/_deploy")
    deadline = time.monotonic() + deploy_timeout_s
    while state != "DEPLOYED":
        if time.monotonic() > deadline:
            raise WiringError(f"model {model_id} is {state} after {deploy_timeout_s:g} s of deploying; "
                              "check GET _plugins/_ml/profile/models")
        time.sleep(1.0)
        state = _request(store, "reading the model", "GET", f"{ML}/models/{model_id}").get("model_state")
    return Applied(f"{key}model-deploy", mname, model_id, "deployed")


def _ensure_model(store: OpenSearchStore, card: Mapping[str, Any], options: WiringOptions, form: str, group_id: str,
                  deploy_timeout_s: float, rows: list[Applied]) -> dict[str, str]:
    """The connector and deployed remote model for one /encode form: ``{"connector": id, "model": id}``
    (keys prefixed ``query_`` for the query form); reused when one of the name exists."""
    prefix = "query_" if form == "query" else ""
    key = prefix.replace("_", "-")
    rows.append(_ensure_connector(store, card, options, form, key))
    connector_id = rows[-1].id
    rows.append(_register_model(store, card, form, key, connector_id, group_id, deploy_timeout_s))
    model = rows[-1]
    rows.append(_deploy(store, key, model.name, model.id, deploy_timeout_s))
    return {f"{prefix}connector": connector_id, f"{prefix}model": model.id}


def _wait_task(store: OpenSearchStore, task_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        task = _request(store, "reading an ML task", "GET", f"{ML}/tasks/{task_id}")
        if task.get("state") == "COMPLETED":
            return task
        if task.get("state") in ("FAILED", "CANCELLED") or time.monotonic() > deadline:
            raise WiringError(f"ML task {task_id} ended {task.get('state')}: {task.get('error', '')}")
        time.sleep(1.0)


def teardown(card: Mapping[str, Any], store: OpenSearchStore, ids: Mapping[str, str]) -> None:
    """Remove what ``apply`` registered for this model version (the live test's cleanup)."""
    names = Names.for_version(card["version"])
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
            _request(store, f"{method} {path}", method, path)
        except StoreError:
            pass


__all__ = ["Applied", "SetupResult", "apply", "teardown"]
