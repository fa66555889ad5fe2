"""Every request of the setup, in order (``plan``), each body checked before anything is sent, and
the plan written out as one JSON file per request (``write_plan``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..mapping import ALL_FIELD, emb_field
from ..scripts import stored_script_body
from .bodies import connector_body, ingest_pipeline_body, model_group_body, register_model_body, search_pipeline_body
from .checks import check_plan_bodies
from .inputs import WiringOptions, layout_for, needs_query_form
from .names import ML, MODEL_GROUP, Names
from .settings import cluster_settings_body
from .templates import search_template_body


@dataclass
class Step:
    key: str  # file stem and report name
    method: str
    path: str
    body: Any
    spec: tuple[str, str] | None  # (namespace file, requestBodies name) in the OpenSearch API spec
    note: str = ""


@dataclass(frozen=True)
class _Ids:
    """The ids a plan's requests refer to; placeholders until the objects exist."""

    connector: str
    model_group: str
    model: str
    query_connector: str
    query_model: str  # the model the search pipeline calls: the query model, else ``model``

    @classmethod
    def of(cls, ids: Mapping[str, str], query: bool) -> "_Ids":
        model = ids.get("model", "<model_id>")
        return cls(ids.get("connector", "<connector_id>"), ids.get("model_group", "<model_group_id>"), model,
                   ids.get("query_connector", "<query_connector_id>"),
                   ids.get("query_model", "<query_model_id>") if query else model)


def index_fields(card: Mapping[str, Any], options: WiringOptions) -> dict[str, int]:
    """The index fields the ingest pipeline may fill -> vector size (0: not a vector)."""
    layout = layout_for(card, options.metadata_types)
    fields = {emb_field(a): layout.dims[a] for a in layout.attributes}
    fields[ALL_FIELD] = layout.total_dim
    fields["model_version"] = 0
    return fields


def _query_steps(card: Mapping[str, Any], names: Names, ids: _Ids, connector: Any) -> list[Step]:
    """The query connector and model of a posterior = prob model."""
    return [
        Step("query-connector", "POST", f"{ML}/connectors/_create", connector,
             ("ml.yaml", "ml.create_connector"), f"name {names.query_connector}: queries drop the slack value"),
        Step("query-model", "POST", f"{ML}/models/_register",
             register_model_body(card, ids.query_connector, ids.model_group, form="query"),
             ("ml.yaml", "ml.register_model"), f"name {names.query_model}"),
        Step("query-model-deploy", "POST", f"{ML}/models/{ids.query_model}/_deploy", None, None),
    ]


def plan(card: Mapping[str, Any], options: WiringOptions, ids: Mapping[str, str] | None = None,
         *, redact: bool = True) -> list[Step]:
    """Every request of the setup, in order; ids not known yet appear as ``<connector_id>`` etc."""
    names = Names.for_version(card["version"])
    query = needs_query_form(card)
    i = _Ids.of(dict(ids or {}), query)
    bodies = {
        "connector": connector_body(card, options, redact=redact),
        "ingest_pipeline": ingest_pipeline_body(card, i.model, options),
        "search_pipeline": search_pipeline_body(card, i.query_model, options),
    }
    if query:
        bodies["query_connector"] = connector_body(card, options, redact=redact, form="query")
    check_plan_bodies(card, options, bodies, index_fields(card, options))
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
        Step("model", "POST", f"{ML}/models/_register", register_model_body(card, i.connector, i.model_group),
             ("ml.yaml", "ml.register_model"), f"name {names.model}"),
        Step("model-deploy", "POST", f"{ML}/models/{i.model}/_deploy", None, None),
        *(_query_steps(card, names, i, bodies["query_connector"]) if query else []),
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


__all__ = ["Step", "plan", "write_plan", "index_fields"]
