"""Index mapping: field types, engine/space validation, versioned names, alias swap, the checked-in demo
mapping, and docker/compose.yml against the client defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from opensearch_spec import api_spec  # noqa: F401 (session fixture)
from fgplugin.errors import StoreError
from fgplugin.opensearch.checks import RequestCheckError, check_request
from fgplugin.opensearch.client import DEFAULT_IMAGE, DEFAULT_PORT, DEFAULT_URL
from fgplugin.opensearch.mapping import (alias_swap_body, build_index_body, demo_mapping_json, layout_from_meta,
                                         main, versioned_index_name)
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import IndexLayout

REPO = Path(__file__).resolve().parents[1]
TYPES = {"brand": "keyword", "title": "text", "price": "float", "qty": "integer", "in_stock": "boolean",
         "added": "date"}


def layout(dims=None, types=TYPES, version="0123456789abcdef0123") -> IndexLayout:
    dims = dims or {"sleeve": 16, "neckline": 8, "colour": 4}
    schema = AttributeSchema(tuple(Attribute(n, ("a", "b", "c")) for n in dims), name="t")
    return IndexLayout(schema, dims, dict(types), version)


def test_index_body_fields_settings_and_spec(api_spec):
    lay = layout()
    body = build_index_body(lay, engine="lucene", m=24, ef_construction=200, ef_search=256, shards=2, replicas=1)
    api_spec.validate("indices.create", body)
    props = body["mappings"]["properties"]
    for a, d in lay.dims.items():
        f = props[f"emb_{a}"]
        assert f["type"] == "knn_vector" and f["dimension"] == d and f["data_type"] == "float"
        assert f["method"] == {"name": "hnsw", "engine": "lucene", "space_type": "innerproduct",
                               "parameters": {"m": 24, "ef_construction": 200}}
    assert props["emb_all"]["dimension"] == 16 + 8 + 4 == lay.total_dim
    assert {f: props[f]["type"] for f in TYPES} == {
        "brand": "keyword", "title": "text", "price": "double", "qty": "long", "in_stock": "boolean", "added": "date"}
    assert props["model_version"] == {"type": "keyword"}
    assert props["image"]["type"] == "keyword" and props["image"]["index"] is False
    assert body["mappings"]["dynamic"] == "strict"
    assert body["settings"]["index"] == {"number_of_shards": 2, "number_of_replicas": 1, "knn": True,
                                         "knn.algo_param.ef_search": 256}
    # the layout round-trips through _meta, so a store can be reopened from the cluster alone
    back = layout_from_meta(body["mappings"]["_meta"]["fgplugin"], "test")
    assert back.dims == lay.dims and back.metadata_types == lay.metadata_types
    assert back.model_version == lay.model_version and back.schema.fingerprint() == lay.schema.fingerprint()
    assert back.query_slack is False
    slack = layout_from_meta(build_index_body(dataclasses.replace(lay, query_slack=True), engine="lucene")
                             ["mappings"]["_meta"]["fgplugin"], "test")
    assert slack.query_slack is True  # posterior = prob indexes: queries drop the slack value


@pytest.mark.parametrize("engine, message", [("nmslib", "deprecated"), ("annoy", "not supported"), ("FAISS", "not supported")])
def test_engines_other_than_faiss_and_lucene_are_refused(engine, message):
    with pytest.raises(StoreError, match=message):
        build_index_body(layout(), engine=engine)


def test_bad_build_settings_and_reserved_names_are_refused():
    with pytest.raises(StoreError, match="m must be an integer in 2..100"):
        build_index_body(layout(), m=1)
    with pytest.raises(StoreError, match="ef_search"):
        build_index_body(layout(), ef_search=0)
    with pytest.raises(StoreError, match="shards"):
        build_index_body(layout(), shards=0)
    with pytest.raises(StoreError, match="dimension must be an integer in 1..16000"):
        build_index_body(layout(dims={"sleeve": 20_000}))
    with pytest.raises(StoreError, match="clashes"):
        build_index_body(layout(types={"image": "keyword"}))
    with pytest.raises(StoreError, match="clashes"):
        build_index_body(layout(types={"emb_extra": "keyword"}))


def test_versioned_names_and_atomic_alias_swap(api_spec):
    assert versioned_index_name("fgplugin", "ABCdef0123456789ffff") == "fgplugin-abcdef012345"
    assert versioned_index_name("fg", "") == "fg-unversioned"
    assert versioned_index_name("fg", "v1") != versioned_index_name("fg", "v2")
    for bad in ("Upper", "_x", "a b", "a*b", ""):
        with pytest.raises(StoreError, match="not a valid OpenSearch index name"):
            versioned_index_name(bad, "v1")
    body = alias_swap_body("fg", "fg-new", ["fg-old"])
    api_spec.validate("indices.update_aliases", body)
    # one request: remove and add together, so readers always see exactly one index
    assert body == {"actions": [{"remove": {"index": "fg-old", "alias": "fg"}}, {"add": {"index": "fg-new", "alias": "fg"}}]}
    assert alias_swap_body("fg", "fg-new") == {"actions": [{"add": {"index": "fg-new", "alias": "fg"}}]}


def test_checked_in_demo_mapping_matches_the_code(api_spec, capsys):
    pytest.importorskip("fgplugin.synth", reason="the demo schema (fgplugin.synth) is not in this checkout yet")
    path = REPO / "mappings" / "demo.json"
    assert path.is_file(), "regenerate with: python -m fgplugin.opensearch.mapping --demo > mappings/demo.json"
    assert path.read_text(encoding="utf-8") == demo_mapping_json(), (
        "mappings/demo.json is stale; regenerate with: python -m fgplugin.opensearch.mapping --demo > mappings/demo.json")
    body = json.loads(path.read_text(encoding="utf-8"))
    api_spec.validate("indices.create", body)
    check_request("indices.create", body)
    props = body["mappings"]["properties"]
    assert {"brand", "category", "price", "in_stock"} <= set(props)
    assert all(props[f"emb_{a}"]["dimension"] == 64 for a in body["mappings"]["_meta"]["fgplugin"]["dims"])
    assert main(["--demo"]) == 0
    assert capsys.readouterr().out == demo_mapping_json()


# -- docker/compose.yml ---------------------------------------------------------------------------------
def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_runs_single_node_opensearch_3_with_knn_on_the_default_port():
    compose = yaml.safe_load((REPO / "docker" / "compose.yml").read_text(encoding="utf-8"))
    svc = compose["services"]["opensearch"]
    assert svc["image"] == DEFAULT_IMAGE
    repo, tag = DEFAULT_IMAGE.rsplit(":", 1)
    assert repo == "opensearchproject/opensearch" and int(tag.split(".")[0]) >= 3  # 3.x bundles k-NN (faiss)
    env = _env(svc)
    assert env["discovery.type"] == "single-node"
    assert env["DISABLE_SECURITY_PLUGIN"] == "true" and env["DISABLE_INSTALL_DEMO_CONFIG"] == "true"
    assert "OPENSEARCH_INITIAL_ADMIN_PASSWORD" in env
    published = {str(p).split(":")[-2] if str(p).count(":") else str(p): str(p).split(":")[-1] for p in svc["ports"]}
    assert published.get(str(DEFAULT_PORT)) == "9200", f"compose must publish {DEFAULT_URL}'s port"
    assert DEFAULT_URL == f"http://localhost:{DEFAULT_PORT}"
    volumes = [v.split(":")[0] for v in svc["volumes"]]
    assert any(v in compose["volumes"] for v in volumes), "data must live in a named volume"
    assert any(v.endswith(":/usr/share/opensearch/data") for v in svc["volumes"])
    readme = (REPO / "docker" / "README.md").read_text(encoding="utf-8")
    assert f"--store opensearch:{DEFAULT_URL}" in readme


# -- codecs ----------------------------------------------------------------------------------------------
def codec_layout(codec: str) -> IndexLayout:
    lay = layout()
    return dataclasses.replace(lay, codec=codec, scales={a: 120.0 for a in lay.attributes} if codec == "int8" else {})


@pytest.mark.parametrize("engine", ["lucene", "faiss"])
def test_int8_is_a_byte_vector_field_and_the_codec_rides_in_meta(api_spec, engine):
    body = build_index_body(codec_layout("int8"), engine=engine)
    api_spec.validate("indices.create", body)
    props = body["mappings"]["properties"]
    assert {props[f]["data_type"] for f in ("emb_sleeve", "emb_colour", "emb_all")} == {"byte"}
    back = layout_from_meta(body["mappings"]["_meta"]["fgplugin"], "test")
    assert back.codec == "int8" and back.scales == {"sleeve": 120.0, "neckline": 120.0, "colour": 120.0}
    assert layout_from_meta({**body["mappings"]["_meta"]["fgplugin"], "codec": None}, "old").codec == "float32"


def test_float16_is_faiss_fp16_and_refused_on_lucene_with_the_way_out(api_spec):
    body = build_index_body(codec_layout("float16"), engine="faiss")
    api_spec.validate("indices.create", body)
    method = body["mappings"]["properties"]["emb_sleeve"]["method"]
    assert method["parameters"]["encoder"] == {"name": "sq", "parameters": {"type": "fp16"}}
    with pytest.raises(StoreError, match="codec float16 needs the faiss engine .* use --engine faiss, or --codec int8"):
        build_index_body(codec_layout("float16"), engine="lucene")
    with pytest.raises(StoreError, match="codec binary is not available on OpenSearch: .* use --codec int8"):
        build_index_body(dataclasses.replace(layout(), codec="binary", scales={a: 127.0 for a in layout().attributes}),
                         engine="lucene")


def test_another_codec_gets_its_own_versioned_index():
    assert versioned_index_name("fg", "v1") == "fg-v1"  # float32 names stay as they were
    assert versioned_index_name("fg", "v1", "int8") == "fg-v1-int8"
