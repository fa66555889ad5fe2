"""`fgplugin opensearch setup`: the ML Commons connector/model, ingest and search pipelines, stored
script and search template, checked against the official API spec (where it has schemas) and the
project's own ml_inference checks (where it has none), and driven end to end offline: the pipelines'
ml_inference steps are simulated as ML Commons runs them, against a real `fgplugin serve` socket and
the fake OpenSearch node. A live test (FGPLUGIN_OPENSEARCH_URL) registers everything on a real cluster.
"""

from __future__ import annotations

import copy
import http.server
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from fake_opensearch import FakeOpenSearch
from opensearch_spec import api_spec  # noqa: F401 (session fixture)
from fgplugin.errors import StoreError
from fgplugin.opensearch.checks import check_request
from fgplugin.opensearch.client import DEFAULT_PORT as OS_PORT
from fgplugin.opensearch.client import DEFAULT_IMAGE, DEFAULT_URL
from fgplugin.opensearch.compile import to_opensearch
from fgplugin.opensearch.mapping import build_index_body, versioned_index_name
from fgplugin.opensearch.mlcommons.apply import apply, teardown
from fgplugin.opensearch.mlcommons.bodies import connector_body, image_query
from fgplugin.opensearch.mlcommons.checks import check_connector, check_ml_inference, check_plan_bodies
from fgplugin.opensearch.mlcommons.inputs import WiringOptions, layout_for, needs_query_form, output_names, query_spec
from fgplugin.opensearch.mlcommons.names import TEMPLATE_ID, Names, WiringError
from fgplugin.opensearch.mlcommons.plan import plan
from fgplugin.opensearch.mlcommons.settings import (cluster_settings_body, cluster_settings_warnings, is_private_host,
                                                    missing_cluster_settings)
from fgplugin.opensearch.mlcommons.simulate import connector_payload, java_list_string, simulate_ingest, simulate_search
from fgplugin.opensearch.mlcommons.templates import (query_template, render_mustache, search_template_body,
                                                     search_template_request)
from fgplugin.opensearch.scripts import SCRIPT_ID, stored_script_body
from fgplugin.search.spec import QuerySpec, parse_filter
from fgplugin.serve import DEFAULT_PORT as SERVE_PORT
from fgplugin.serve import BackgroundServer, ServeConfig, create_app

REPO = Path(__file__).resolve().parents[1]
SERVE_URL = "http://fgplugin-serve:8080"
META = {"brand": "keyword", "price": "float"}
ATOL = 1e-5


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from fgplugin.export import ExportedEncoder
    from fgplugin.synth import synth_schema

    from test_encoder import tiny_export  # the session's shared tiny untrained export

    return ExportedEncoder.load(tiny_export(tmp_path_factory.getbasetemp(), synth_schema()), device="cpu")


@pytest.fixture(scope="module")
def card(encoder):
    return encoder.card


@pytest.fixture(scope="module")
def prob_encoder(tmp_path_factory):
    """A posterior = prob export (card ``query_slack``): its vectors end with a slack value queries drop."""
    from fgplugin.export import ExportedEncoder
    from fgplugin.synth import synth_schema

    from test_encoder import tiny_prob_export

    return ExportedEncoder.load(tiny_prob_export(tmp_path_factory.getbasetemp(), synth_schema()), device="cpu")


def spec_errors(api_spec, where: tuple[str, str], body: Any) -> list[str]:
    """Violations of the spec's request body schema ``(namespace file, requestBodies name)``."""
    ns, name = where
    ref = f"{api_spec.uri('namespaces/' + ns)}#/components/requestBodies/{name}/content/application~1json/schema"
    v = jsonschema.Draft202012Validator({"$ref": ref}, registry=api_spec.registry)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message[:200]}" for e in v.iter_errors(body)]


def unit_vectors(card, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for a in card["attributes"]:
        v = rng.normal(size=card["dims"][a])
        out[a] = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def assert_same_body(got: Any, want: Any, path: str = "body") -> None:
    """Equal JSON, numbers within float32 rounding."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, sorted(got), sorted(want))
        for k in want:
            assert_same_body(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_body(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert abs(got - want) <= 1e-6, (path, got, want)
    else:
        assert got == want, (path, got, want)


def fill(template: str, outputs: dict[str, Any]) -> Any:
    """ML Commons' query_template substitution: Java List.toString of each output."""
    return json.loads(re.sub(r"\$\{([^}]+)\}", lambda m: java_list_string(outputs[m.group(1)]), template))


# -- generated bodies ----------------------------------------------------------------------------
def test_every_generated_body_validates(api_spec, card):
    options = WiringOptions(serve_url=SERVE_URL, metadata_types=META, filters=["price<100"], token="t0k3n")
    steps = plan(card, options)
    assert [s.key for s in steps] == ["cluster-settings", "stored-script", "search-template", "connector",
                                      "model-group", "model", "model-deploy", "ingest-pipeline", "search-pipeline"]
    v = Names.for_version(card["version"]).version
    assert v == card["version"][:12]
    # The spec allows "_meta" on ingest pipelines; OpenSearch 2.19 refused it (the real node's word).
    assert "_meta" not in next(s.body for s in steps if s.key == "ingest-pipeline")
    for s in steps:
        if s.spec is None:
            assert s.body is None  # _deploy takes no body
            continue
        errs = spec_errors(api_spec, s.spec, s.body)
        if s.key == "search-pipeline":
            # The spec's RequestProcessor is a closed oneOf without ml_inference, so the real body fails it;
            # the rest of the pipeline validates, and check_ml_inference covers the processor itself.
            assert errs and all(e.startswith("request_processors/0") for e in errs), errs
            assert spec_errors(api_spec, s.spec, {**s.body, "request_processors": []}) == []
            proc = s.body["request_processors"][0]["ml_inference"]
            assert check_ml_inference(proc, "p", kind="search_request", outputs=output_names(card)) == []
        else:
            assert errs == [], (s.key, errs)
    bodies = {s.key: s.body for s in steps}
    assert bodies["stored-script"] == stored_script_body() and steps[1].path == f"/_scripts/{SCRIPT_ID}"
    check_request("put_script", bodies["stored-script"])  # H4's own checks of the painless script
    # names carry the model version; the pipelines point at the model
    assert bodies["connector"]["name"] == f"fgplugin-encoder-{v}"
    assert steps[-2].path == f"/_ingest/pipeline/fgplugin-encode-{v}"
    assert steps[-1].path == f"/_search/pipeline/fgplugin-image-query-{v}"
    ingest = bodies["ingest-pipeline"]["processors"][0]["ml_inference"]
    assert ingest["input_map"] == [{"url": "image"}]
    assert ingest["output_map"] == [{**{f"emb_{a}": a for a in card["attributes"]}, "emb_all": "emb_all",
                                     "model_version": "model_version"}]
    # every output_map target is a field of the index the store creates, and nothing else is written
    props = build_index_body(layout_for(card, META))["mappings"]["properties"]
    assert set(ingest["output_map"][0]) <= set(props)
    # the bearer token is kept out of generated output, but sent when applying
    assert "t0k3n" not in json.dumps([s.body for s in steps])
    assert plan(card, options, redact=False)[3].body["credential"] == {"token": "t0k3n"}


@pytest.mark.parametrize("mode,weights,filters", [
    ("exact", None, []),
    ("exact", {"sleeve_length": 0.7, "neckline": 0.3}, ["price<100", "brand=acme,zeta"]),
    ("ann", None, ["brand=acme"]),
    ("ann+rescore", None, ["has:brand"]),
])
def test_query_template_is_the_compiled_query(api_spec, card, mode, weights, filters):
    options = WiringOptions(serve_url=SERVE_URL, attributes=weights, filters=filters, k=15, mode=mode,
                                   metadata_types=META)
    template, names = query_template(card, options)
    q = unit_vectors(card, seed=3)
    outputs = {f"emb_{a}": q[a].tolist() for a in card["attributes"]}
    outputs["emb_all"] = np.concatenate([q[a] for a in card["attributes"]]).tolist()
    body = fill(template, outputs)
    spec = query_spec(card, options)
    want = to_opensearch(spec, layout_for(card, META), query_vectors=q)
    assert_same_body(body, want)
    api_spec.validate("search", body)
    check_request("search", body)
    expect = ["emb_all"] if mode != "exact" else []
    if mode != "ann":
        expect += [f"emb_{a}" for a in spec.attributes]
    assert sorted(names) == sorted(expect)


def test_posterior_prob_plan_adds_a_query_connector(api_spec, card, prob_encoder):
    """The search pipeline puts the service's answer into the query as it is; a posterior = prob model's
    query must drop the slack value first, so its plan adds a connector + model asking /encode for the
    query form, and the search pipeline (only it) calls that model. Other models' plans are unchanged."""
    from fgplugin.similarity import query_form

    pcard = prob_encoder.card
    assert needs_query_form(pcard) and not needs_query_form(card)
    options = WiringOptions(serve_url=SERVE_URL, token="t0k3n")
    steps = plan(pcard, options)
    assert [s.key for s in steps] == ["cluster-settings", "stored-script", "search-template", "connector",
                                      "model-group", "model", "model-deploy", "query-connector", "query-model",
                                      "query-model-deploy", "ingest-pipeline", "search-pipeline"]
    for s in steps:
        if s.spec is not None and s.key != "search-pipeline":  # ml_inference: not in the spec (see above)
            assert spec_errors(api_spec, s.spec, s.body) == [], s.key
    bodies = {s.key: s.body for s in steps}
    v = Names.for_version(pcard["version"]).version
    assert bodies["query-connector"]["name"] == bodies["query-model"]["name"] == f"fgplugin-encoder-query-{v}"
    assert connector_payload(bodies["query-connector"], {"url": "u"}) == {"url": "u", "form": "query"}
    assert connector_payload(bodies["connector"], {"url": "u"}) == {"url": "u"}
    assert bodies["query-model"]["connector_id"] == "<query_connector_id>"
    assert steps[9].path.endswith("/<query_model_id>/_deploy")
    assert bodies["ingest-pipeline"]["processors"][0]["ml_inference"]["model_id"] == "<model_id>"
    assert bodies["search-pipeline"]["request_processors"][0]["ml_inference"]["model_id"] == "<query_model_id>"
    assert "t0k3n" not in json.dumps(bodies["query-connector"])
    # the checks: a query connector that sends the stored form, or a plan without one, is refused
    assert check_connector(bodies["query-connector"], SERVE_URL, "query") == []
    assert "query form" in " ".join(check_connector(bodies["connector"], SERVE_URL, "query"))
    assert "stored form" in " ".join(check_connector(bodies["query-connector"], SERVE_URL))
    plain = {"connector": bodies["connector"], "ingest_pipeline": bodies["ingest-pipeline"],
             "search_pipeline": bodies["search-pipeline"]}
    with pytest.raises(WiringError, match="needs the query connector"):
        check_plan_bodies(pcard, options, plain)
    assert "query-connector" not in {s.key for s in plan(card, options)}
    # ann modes: the service's query-form emb_all is what the compiled query searches with
    ann = WiringOptions(serve_url=SERVE_URL, mode="ann")
    template, used = query_template(pcard, ann)
    q = {a: query_form(v, True) for a, v in unit_vectors(pcard, seed=5).items()}
    body = fill(template, {"emb_all": np.concatenate([q[a] for a in pcard["attributes"]]).tolist()})
    assert used == ["emb_all"]
    assert_same_body(body, to_opensearch(query_spec(pcard, ann), layout_for(pcard), query_vectors=q))


def test_ann_with_unequal_weights_cannot_be_templated(card):
    options = WiringOptions(serve_url=SERVE_URL, attributes={"neckline": 2.0, "collar": 1.0}, mode="ann")
    for mode in ("ann", "ann+rescore"):
        options.mode = mode
        with pytest.raises(WiringError, match="only when every attribute is chosen at weight 1"):
            query_template(card, options)
    with pytest.raises(WiringError, match="unknown attribute"):
        query_template(card, WiringOptions(serve_url=SERVE_URL, attributes={"sleeves": 1.0}))


def test_search_template_renders_to_the_exact_query(api_spec, card):
    body = search_template_body(card)
    assert spec_errors(api_spec, ("_core.yaml", "put_script"), body) == []
    layout = layout_for(card, META)
    q = unit_vectors(card, seed=5)
    spec = QuerySpec(attributes={"neckline": 0.5, "pattern": 1.5}, vectors={a: q[a] for a in ("neckline", "pattern")},
                     filters=[parse_filter("price>=10"), parse_filter("brand!=acme")], k=7)
    req = search_template_request(spec, layout, spec.vectors)
    assert spec_errors(api_spec, ("_core.yaml", "search_template"), req) == []
    rendered = render_mustache(body["script"]["source"], req["params"])
    assert rendered == to_opensearch(spec, layout)  # exactly the query the builder produces
    api_spec.validate("search", rendered)
    with pytest.raises(WiringError, match="lack vectors"):
        render_mustache(body["script"]["source"], {k: v for k, v in req["params"].items() if k != "vectors"})
    with pytest.raises(WiringError, match="exact"):
        search_template_request(QuerySpec({"neckline": 1.0}, vectors=spec.vectors, mode="ann"), layout, spec.vectors)


def test_ml_inference_checker_catches_mistakes(card):
    steps = {s.key: s.body for s in plan(card, WiringOptions(serve_url=SERVE_URL))}
    ingest = steps["ingest-pipeline"]["processors"][0]["ml_inference"]
    search = steps["search-pipeline"]["request_processors"][0]["ml_inference"]
    outs = output_names(card)
    fields = {f"emb_{a}": 1 for a in card["attributes"]} | {"emb_all": 1, "model_version": 0}
    assert check_ml_inference(ingest, "i", kind="ingest", outputs=outs, fields=fields) == []

    def problems(base, kind, change):
        proc = copy.deepcopy(base)
        change(proc)
        return " | ".join(check_ml_inference(proc, "p", kind=kind, outputs=outs, fields=fields))

    a0 = card["attributes"][0]
    cases = [
        (ingest, "ingest", lambda p: p.update(model_ids="x"), "unknown key(s) model_ids"),
        (ingest, "ingest", lambda p: p.update(model_id=""), "model_id must be a non-empty string"),
        (ingest, "ingest", lambda p: p["output_map"][0].update(emb_x="sleeve"), "no output 'sleeve'"),
        (ingest, "ingest", lambda p: p["output_map"][0].update(embedding="emb_all"), "'embedding' is not a field"),
        (ingest, "ingest", lambda p: p["input_map"].append({"url": "image2"}), "input_map has 2 entries"),
        (ingest, "ingest", lambda p: p.update(input_map={"url": "image"}), "input_map must be a non-empty list"),
        (ingest, "ingest", lambda p: p.update(ignore_missing="no"), "ignore_missing must be true or false"),
        (ingest, "ingest", lambda p: p.update(function_name="TEXT_EMBEDDING"), "function_name must be remote"),
        (ingest, "ingest", lambda p: p.update(query_template="{}"), "unknown key(s) query_template"),
        (search, "search_request", lambda p: p["output_map"][0].pop(f"emb_{a0}"), f"uses ${{emb_{a0}}}"),
        (search, "search_request", lambda p: p["output_map"][0].update(extra="emb_all"), "never uses"),
        (search, "search_request", lambda p: p.update(query_template=p["query_template"][:-1]), "not JSON"),
        (search, "search_request", lambda p: p.update(max_prediction_tasks=0), "max_prediction_tasks"),
    ]
    for base, kind, change, words in cases:
        assert words in problems(base, kind, change), words


def test_connector_request_and_cluster_settings(api_spec):
    options = WiringOptions(serve_url="http://fgplugin-serve:8080/")
    assert options.serve_url == SERVE_URL
    card = {"version": "ab" * 32, "attributes": ["a"], "dims": {"a": 4}}
    conn = connector_body(card, options)
    assert check_connector(conn, SERVE_URL) == []
    nasty = 'http://img.example/a "b" \\ c.jpg'
    assert connector_payload(conn, {"url": nasty}) == {"url": nasty}  # escaped, then parsed back intact
    assert "credential must be a non-empty object" in " ".join(check_connector({**conn, "credential": {}}, SERVE_URL))
    broken = copy.deepcopy(conn)
    broken["actions"][0]["request_body"] = '{"url": ${parameters.url}}'
    assert "not JSON once filled" in " ".join(check_connector(broken, SERVE_URL))
    assert "must POST" in " ".join(check_connector(conn, "http://other:1"))
    for bad in ("ftp://x", "fgplugin-serve:8080", "http://u:p@h:1"):
        with pytest.raises(WiringError):
            WiringOptions(serve_url=bad)

    body = cluster_settings_body(options)
    assert spec_errors(api_spec, ("cluster.yaml", "cluster.put_settings"), body) == []
    s = body["persistent"]
    (rx,) = s["plugins.ml_commons.trusted_connector_endpoints_regex"]
    assert re.fullmatch(rx, f"{SERVE_URL}/encode")
    for other in ("http://fgplugin-serve:8080.evil.test/encode", "http://fgplugin-serveX8080/encode",
                  "https://fgplugin-serve:8080/encode", "http://fgplugin-serve:80801/encode"):
        assert not re.fullmatch(rx, other), other
    assert s["plugins.ml_commons.only_run_on_ml_node"] is False
    assert s["plugins.ml_commons.connector.private_ip_enabled"] is True  # docker service name: private
    assert is_private_host("127.0.0.1") and is_private_host("10.0.0.7") and not is_private_host("8.8.8.8")
    no_private = cluster_settings_body(WiringOptions(serve_url="http://93.184.216.34:8080"))
    assert "plugins.ml_commons.connector.private_ip_enabled" not in no_private["persistent"]
    assert any("REPLACES" in w for w in cluster_settings_warnings(options))
    current = {"plugins.ml_commons.trusted_connector_endpoints_regex.0": "^https://api\\.openai\\.com/.*$",
               "plugins.ml_commons.only_run_on_ml_node": "true"}
    assert missing_cluster_settings(current, options) == [
        "plugins.ml_commons.trusted_connector_endpoints_regex", "plugins.ml_commons.only_run_on_ml_node",
        "plugins.ml_commons.connector.private_ip_enabled"]
    ok = {"plugins.ml_commons.trusted_connector_endpoints_regex": [rx], "plugins.ml_commons.only_run_on_ml_node": "false",
          "plugins.ml_commons.connector.private_ip_enabled": "true"}
    assert missing_cluster_settings(ok, options) == []


# -- the whole chain, offline --------------------------------------------------------------------
def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = np.clip(rng.normal(60 + 30 * i, 50, (56, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class _Images(http.server.BaseHTTPRequestHandler):
    blobs: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        body = self.blobs.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    _Images.blobs = {f"/img/{i}.png": _png(i) for i in range(6)}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", _Images.blobs
    srv.shutdown()


def _post(url: str, payload: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    r = httpx.post(url, json=payload, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_pipelines_end_to_end_through_fgplugin_serve(api_spec, encoder, card, image_host):
    host, blobs = image_host
    app = create_app(encoder, ServeConfig(allow_hosts=("127.0.0.1",), token="s3cret"))
    exp = encoder.encode_images([Image.open(io.BytesIO(blobs[f"/img/{i}.png"])).convert("RGB") for i in range(6)])
    with BackgroundServer(app) as srv, FakeOpenSearch(api_spec.errors) as fake:
        options = WiringOptions(serve_url=srv.url, token="s3cret", metadata_types={"brand": "keyword"})
        steps = {s.key: s.body for s in plan(card, options, {"model": "m-1"}, redact=False)}
        connector = steps["connector"]
        # ingest: a document with only an image URL (and metadata) gets every vector field from the service
        docs = [simulate_ingest(steps["ingest-pipeline"], {"image": f"{host}/img/{i}.png", "brand": f"b{i % 2}"},
                                       connector, _post) for i in range(6)]
        for i, d in enumerate(docs):
            assert d["model_version"] == card["version"]
            for a in card["attributes"]:
                np.testing.assert_allclose(d[f"emb_{a}"], exp[a][i], atol=ATOL)
            np.testing.assert_allclose(d["emb_all"], np.concatenate([exp[a][i] for a in card["attributes"]]), atol=ATOL)
        with pytest.raises(WiringError, match="already has field"):
            simulate_ingest(steps["ingest-pipeline"], docs[0], connector, _post)
        # the documents fit the index the store creates (strict mapping, vector sizes)
        from fgplugin.opensearch.store import OpenSearchStore

        store = OpenSearchStore.from_url(fake.url, index="fgplugin", env={})
        layout = layout_for(card, {"brand": "keyword"})
        store.ensure_index(layout)
        index = versioned_index_name("fgplugin", card["version"])
        lines = []
        for i, d in enumerate(docs):
            lines += [{"index": {"_index": index, "_id": f"d{i}"}}, d]
        res = store.client.bulk(body=lines, refresh="true")
        assert not res["errors"], res
        # search: an image-URL query becomes the compiled weighted query, and finds the same image first
        request = image_query(f"{host}/img/3.png")
        body = simulate_search(steps["search-pipeline"], request, connector, _post)
        spec = query_spec(card, options)
        assert_same_body(body, to_opensearch(spec, layout, query_vectors={a: exp[a][3] for a in card["attributes"]}))
        api_spec.validate("search", body)
        hits = store.client.search(index="fgplugin", body=body)["hits"]["hits"]
        assert hits[0]["_id"] == "d3"
        n = len(card["attributes"])
        assert abs(hits[0]["_score"] - 2 * n) < 1e-3  # sum over attributes of 1 * (1 + cos), cos = 1
        assert all(h["_score"] < hits[0]["_score"] for h in hits[1:])
        assert fake.spec_errors == []
    # without the token the service refuses the connector's call
    bad = {**connector, "credential": {"token": "wrong"}}
    with BackgroundServer(app) as srv2:
        bad["actions"] = [{**connector["actions"][0], "url": f"{srv2.url}/encode"}]
        with pytest.raises(AssertionError, match="401"):
            simulate_ingest(steps["ingest-pipeline"], {"image": f"{host}/img/0.png"}, bad, _post)


def test_posterior_prob_pipelines_end_to_end_through_fgplugin_serve(api_spec, prob_encoder, image_host):
    """Documents are ingested in the stored form ([p, slack]); the image query goes through the query
    connector, so the search body is exactly what ``fgplugin query`` compiles (slack dropped), and the
    cluster scores each item p_q . p_x / |p_q| per attribute. The stored-form connector would not."""
    from fgplugin.opensearch.store import OpenSearchStore
    from fgplugin.similarity import query_form

    card = prob_encoder.card
    host, blobs = image_host
    app = create_app(prob_encoder, ServeConfig(allow_hosts=("127.0.0.1",)))
    stored = prob_encoder.encode_images([Image.open(io.BytesIO(blobs[f"/img/{i}.png"])).convert("RGB") for i in range(6)])
    attrs = card["attributes"]
    with BackgroundServer(app) as srv, FakeOpenSearch(api_spec.errors) as fake:
        options = WiringOptions(serve_url=srv.url)
        steps = {s.key: s.body for s in plan(card, options, {"model": "m-1", "query_model": "m-2"}, redact=False)}
        docs = [simulate_ingest(steps["ingest-pipeline"], {"image": f"{host}/img/{i}.png"}, steps["connector"],
                                       _post) for i in range(6)]
        for i, d in enumerate(docs):
            for a in attrs:
                np.testing.assert_allclose(d[f"emb_{a}"], stored[a][i], atol=ATOL)
                assert d[f"emb_{a}"][-1] > 1e-3  # the slack value is stored
        store = OpenSearchStore.from_url(fake.url, index="fgplugin", env={})
        layout = layout_for(card)
        assert layout.query_slack
        store.ensure_index(layout)
        lines = []
        for i, d in enumerate(docs):
            lines += [{"index": {"_index": versioned_index_name("fgplugin", card["version"]), "_id": f"d{i}"}}, d]
        assert not store.client.bulk(body=lines, refresh="true")["errors"]
        request = image_query(f"{host}/img/3.png")
        body = simulate_search(steps["search-pipeline"], request, steps["query-connector"], _post)
        spec = query_spec(card, options)
        assert_same_body(body, to_opensearch(spec, layout, query_vectors={a: stored[a][3] for a in attrs}))
        with pytest.raises(AssertionError):  # through the stored-form connector the query keeps the slack
            assert_same_body(simulate_search(steps["search-pipeline"], request, steps["connector"], _post), body)
        hits = store.client.search(index="fgplugin", body=body)["hits"]["hits"]
        assert len(hits) == 6 and fake.spec_errors == []
        for h in hits:  # the script's 1 + cos per attribute, the query in its query form
            i = int(h["_id"][1:])
            want = sum(1 + float(query_form(stored[a][3], True) @ stored[a][i]) for a in attrs)
            assert abs(h["_score"] - want) < 1e-4, (h["_id"], h["_score"], want)
        assert [h["_score"] for h in hits] == sorted((h["_score"] for h in hits), reverse=True)


# -- applying, against a stateful fake of the cluster's ML Commons side --------------------------
class FakeCluster:
    """Just the cluster calls ``apply`` makes, with ML Commons' answers; bodies spec-checked."""

    alias = "fgplugin"

    def __init__(self, api_spec, settings: dict[str, Any] | None = None):
        self.api_spec = api_spec
        self.settings = dict(settings or {})
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"connectors": {}, "model_groups": {}, "models": {}}
        self.docs: dict[str, Any] = {}  # path -> body (scripts, pipelines)
        self.layout = None
        self.writes: list[str] = []
        self.spec_problems: list[str] = []
        self.client = self
        self.transport = self
        self.cluster = self

    def call(self, what, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def ensure_index(self, layout):
        self.layout = layout

    def get_settings(self, include_defaults, flat_settings):
        return {"defaults": {"plugins.ml_commons.only_run_on_ml_node": "true"}, "persistent": dict(self.settings)}

    def put_settings(self, body):
        self.spec_problems += spec_errors(self.api_spec, ("cluster.yaml", "cluster.put_settings"), body)
        self.settings.update(body["persistent"])
        self.writes.append("settings")

    def _check(self, where, body):
        self.spec_problems += [f"{where}: {e}" for e in spec_errors(self.api_spec, where, body)]

    def perform_request(self, method, path, params=None, body=None):
        m = re.fullmatch(r"/_plugins/_ml/(connectors|model_groups|models)/_search", path)
        if m:
            name = body["query"]["match_phrase"]["name"]
            hits = [{"_id": i, "_source": o} for i, o in self.objects[m.group(1)].items() if name in o["name"]]
            return {"hits": {"hits": hits}}
        creates = {"/_plugins/_ml/connectors/_create": ("connectors", "connector_id", "ml.create_connector"),
                   "/_plugins/_ml/model_groups/_register": ("model_groups", "model_group_id", "ml.register_model_group"),
                   "/_plugins/_ml/models/_register": ("models", "model_id", "ml.register_model")}
        if path in creates:
            kind, key, spec_name = creates[path]
            self._check(("ml.yaml", spec_name), body)
            oid = f"{kind}-{len(self.objects[kind]) + 1}"
            self.objects[kind][oid] = {**body, "model_state": "REGISTERED"} if kind == "models" else dict(body)
            self.writes.append(kind)
            return {key: oid, "task_id": "t", "status": "CREATED"}
        m = re.fullmatch(r"/_plugins/_ml/models/([^/]+)(/_deploy)?", path)
        if m:
            model = self.objects["models"][m.group(1)]
            if m.group(2):
                model["model_state"] = "DEPLOYED"
                self.writes.append("deploy")
                return {"task_id": "t2", "status": "COMPLETED"}
            return model
        if method == "GET":
            if path not in self.docs:
                raise StoreError(f"fake: GET {path} failed: HTTP 404 not found")
            got = self.docs[path]
            return {"_id": path, "found": True, **got} if path.startswith("/_scripts/") else {path.rsplit("/", 1)[1]: got}
        if method == "PUT":
            where = {"/_scripts/": ("_core.yaml", "put_script"), "/_ingest/": ("ingest.yaml", "ingest.put_pipeline")}
            for prefix, w in where.items():
                if path.startswith(prefix):
                    self._check(w, body)
            self.docs[path] = copy.deepcopy(body)
            self.writes.append(path)
            return {"acknowledged": True}
        raise AssertionError(f"unexpected {method} {path}")


def test_apply_registers_everything_once(api_spec, card):
    options = WiringOptions(serve_url=SERVE_URL, token="tok")
    cluster = FakeCluster(api_spec)
    with pytest.raises(WiringError, match="trusted_connector_endpoints_regex") as e:
        apply(card, options, cluster)
    assert "PUT _cluster/settings" in str(e.value) and cluster.writes == []  # nothing half-done
    first = apply(card, options, cluster, cluster_settings=True)
    actions = {r.key: r.action for r in first.rows}
    assert actions == {"cluster-settings": "updated", "index": "ready", "stored-script": "stored",
                       "search-template": "created", "connector": "created", "model-group": "created",
                       "model": "created", "model-deploy": "deployed", "ingest-pipeline": "created",
                       "search-pipeline": "created"}
    assert first.index == versioned_index_name("fgplugin", card["version"])
    assert cluster.layout.model_version == card["version"]
    names = first.names
    ingest = cluster.docs[f"/_ingest/pipeline/{names.ingest_pipeline}"]
    search = cluster.docs[f"/_search/pipeline/{names.search_pipeline}"]
    assert ingest["processors"][0]["ml_inference"]["model_id"] == first.ids["model"] == "models-1"
    assert search["request_processors"][0]["ml_inference"]["model_id"] == "models-1"
    conn = cluster.objects["connectors"]["connectors-1"]
    assert conn["credential"] == {"token": "tok"} and conn["actions"][0]["url"] == f"{SERVE_URL}/encode"
    assert cluster.objects["models"]["models-1"]["connector_id"] == "connectors-1"
    assert cluster.objects["models"]["models-1"]["model_group_id"] == "model_groups-1"
    assert cluster.spec_problems == []
    writes = len(cluster.writes)

    again = apply(card, options, cluster)  # settings now present: no --cluster-settings needed
    assert {r.key: r.action for r in again.rows} == {
        "cluster-settings": "unchanged", "index": "ready", "stored-script": "stored", "search-template": "unchanged",
        "connector": "reused", "model-group": "reused", "model": "reused", "model-deploy": "unchanged",
        "ingest-pipeline": "unchanged", "search-pipeline": "unchanged"}
    assert again.ids == first.ids and len(cluster.writes) == writes
    assert all(len(v) == 1 for v in cluster.objects.values())

    # a new export version gets its own connector, model and pipelines beside the old ones
    other = {**card, "version": "f" * 64}
    third = apply(other, options, cluster)
    assert third.ids["connector"] != first.ids["connector"] and third.ids["model_group"] == first.ids["model_group"]
    assert len(cluster.objects["models"]) == 2


def test_apply_registers_the_query_model_for_posterior_prob(api_spec, prob_encoder):
    card = prob_encoder.card
    options = WiringOptions(serve_url=SERVE_URL, token="tok")
    cluster = FakeCluster(api_spec)
    first = apply(card, options, cluster, cluster_settings=True)
    actions = {r.key: r.action for r in first.rows}
    assert {k: actions[k] for k in ("connector", "model", "model-deploy", "query-connector", "query-model",
                                    "query-model-deploy")} == {
        "connector": "created", "model": "created", "model-deploy": "deployed", "query-connector": "created",
        "query-model": "created", "query-model-deploy": "deployed"}
    ids, names = first.ids, first.names
    assert ids["query_model"] != ids["model"] and ids["query_connector"] != ids["connector"]
    qmodel = cluster.objects["models"][ids["query_model"]]
    assert qmodel["connector_id"] == ids["query_connector"] and qmodel["model_state"] == "DEPLOYED"
    qconn = cluster.objects["connectors"][ids["query_connector"]]
    assert connector_payload(qconn, {"url": "u"}) == {"url": "u", "form": "query"}
    assert qconn["credential"] == {"token": "tok"}
    ingest = cluster.docs[f"/_ingest/pipeline/{names.ingest_pipeline}"]["processors"][0]["ml_inference"]
    search = cluster.docs[f"/_search/pipeline/{names.search_pipeline}"]["request_processors"][0]["ml_inference"]
    assert ingest["model_id"] == ids["model"] and search["model_id"] == ids["query_model"]
    assert cluster.spec_problems == []
    writes = len(cluster.writes)
    again = apply(card, options, cluster)
    assert again.ids == ids and len(cluster.writes) == writes
    assert {r.action for r in again.rows} <= {"unchanged", "reused", "ready", "stored"}


# -- the CLI -------------------------------------------------------------------------------------
def test_setup_cli_prints_and_writes_the_plan(tmp_path, encoder):
    from typer.testing import CliRunner

    from fgplugin_cli.app import app

    runner = CliRunner()
    base = ["opensearch", "setup", "--model", str(encoder.path), "--serve-url", SERVE_URL]
    out = tmp_path / "wiring"
    r = runner.invoke(app, base + ["--out", str(out), "--serve-token", "sekret", "-a", "neckline=2", "-a", "collar"])
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.iterdir())
    assert files[0] == "00-cluster-settings.json" and files[-2] == "08-search-pipeline.json" and "plan.json" in files
    text = "".join(p.read_text() for p in out.iterdir())
    assert "sekret" not in text and "<set FGPLUGIN_SERVE_TOKEN>" in text
    search = json.loads((out / "08-search-pipeline.json").read_text())["body"]
    assert set(search["request_processors"][0]["ml_inference"]["output_map"][0]) == {"emb_neckline", "emb_collar"}
    r = runner.invoke(app, base)
    assert r.exit_code == 0
    printed = json.loads(r.stdout)
    assert [s["path"] for s in printed][:2] == ["/_cluster/settings", f"/_scripts/{SCRIPT_ID}"]
    r = runner.invoke(app, base + ["--mode", "ann", "-a", "neckline=2"])
    assert r.exit_code == 2 and "every attribute is chosen at weight 1" in r.output


# -- docker compose ------------------------------------------------------------------------------
def test_compose_serve_and_ml_commons_match_cli_defaults():
    compose = yaml.safe_load((REPO / "docker" / "compose.yml").read_text())
    services = compose["services"]
    os_ = services["opensearch"]
    assert os_["image"] == DEFAULT_IMAGE and os_["image"].split(":")[1].startswith("3.")
    assert f"{OS_PORT}:{OS_PORT}" in os_["ports"] and DEFAULT_URL.endswith(f":{OS_PORT}")
    assert os_["environment"]["DISABLE_SECURITY_PLUGIN"] == "true"
    assert "host.docker.internal:host-gateway" in os_["extra_hosts"]
    serve = services["fgplugin-serve"]
    assert serve["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    cmd = serve["command"]
    assert cmd[0] == "serve" and cmd[cmd.index("--port") + 1] == str(SERVE_PORT) and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert f"{SERVE_PORT}:{SERVE_PORT}" in serve["ports"]
    (vol,) = serve["volumes"]
    assert vol["target"] == cmd[cmd.index("--model") + 1] and vol["read_only"] is True and vol["type"] == "bind"
    assert set(serve["environment"]) == {"FGPLUGIN_ALLOW_HOSTS", "FGPLUGIN_SERVE_TOKEN"}  # both read by `fgplugin serve`
    dash = services["opensearch-dashboards"]
    assert dash["profiles"] == ["dashboards"] and dash["image"].endswith(":" + os_["image"].split(":")[1])
    assert json.loads(dash["environment"]["OPENSEARCH_HOSTS"]) == [f"http://opensearch:{OS_PORT}"]
    assert set(compose["volumes"]) == {"fgplugin-opensearch-data"}
    # the image installs the repository and serves on the default port; the CLI reads those variables
    docker = (REPO / "docker" / "Dockerfile").read_text()
    assert "pip install" in docker and f"EXPOSE {SERVE_PORT}" in docker and f"--port\", \"{SERVE_PORT}" in docker
    cli = (REPO / "cli" / "serve.py").read_text()
    assert 'envvar="FGPLUGIN_ALLOW_HOSTS"' in cli and 'envvar="FGPLUGIN_SERVE_TOKEN"' in cli
    readme = (REPO / "docker" / "README.md").read_text()
    for words in ("fgplugin opensearch setup", "--serve-url http://fgplugin-serve:8080", "?pipeline=fgplugin-encode-",
                  "search_pipeline=fgplugin-image-query-", TEMPLATE_ID, "--profile dashboards"):
        assert words in readme, words


# -- live ----------------------------------------------------------------------------------------
@pytest.mark.live
def test_live_register_index_and_query_through_the_pipelines(encoder, card, image_host, opensearch_url,  # noqa: ARG001
                                                             tmp_path_factory):
    """Needs a cluster that can reach this machine: the test serves images and `fgplugin serve` on
    0.0.0.0 and tells OpenSearch to call FGPLUGIN_SERVE_ADVERTISE_HOST (default: 127.0.0.1 for a node on
    this machine, host.docker.internal otherwise)."""
    from fgplugin.opensearch.store import OpenSearchStore

    LIVE_URL = opensearch_url
    local = any(h in opensearch_url for h in ("//127.0.0.1", "//localhost", "//[::1]"))
    advertise = os.environ.get("FGPLUGIN_SERVE_ADVERTISE_HOST", "127.0.0.1" if local else "host.docker.internal")
    bind = "127.0.0.1" if local else "0.0.0.0"  # reachable from the cluster too
    img_srv = http.server.ThreadingHTTPServer((bind, 0), _Images)
    threading.Thread(target=img_srv.serve_forever, daemon=True).start()
    app = create_app(encoder, ServeConfig(allow_hosts=(advertise, "127.0.0.1")))
    alias = f"fgplugin-wiring-live-{card['version'][:6]}"
    with BackgroundServer(app, host=bind) as srv:
        options = WiringOptions(serve_url=f"http://{advertise}:{srv.port}", index=alias,
                                       metadata_types={"brand": "keyword"})
        store = OpenSearchStore.from_url(LIVE_URL, index=alias)
        result = None
        try:
            result = apply(card, options, store, cluster_settings=True)
            names = result.names
            t = store.client.transport
            for i in range(4):
                t.perform_request("PUT", f"/{result.index}/_doc/d{i}",
                                  params={"pipeline": names.ingest_pipeline, "refresh": "true"},
                                  body={"image": f"http://{advertise}:{img_srv.server_port}/img/{i}.png", "brand": "b"})
            got = t.perform_request("GET", f"/{result.index}/_doc/d2")["_source"]
            assert got["model_version"] == card["version"] and len(got["emb_all"]) == sum(card["dims"].values())
            res = t.perform_request("POST", f"/{result.index}/_search", params={"search_pipeline": names.search_pipeline},
                                    body=image_query(f"http://{advertise}:{img_srv.server_port}/img/2.png"))
            assert res["hits"]["hits"][0]["_id"] == "d2"
            # The same images indexed and queried by fgplugin itself (embedded store, the same encoder)
            # rank the same ids with the same weighted cosine sums (the pipeline's scores are Σw(1+cos)).
            from fgplugin.search.store import Document
            from fgplugin.search.embedded import DuckDBStore

            layout = layout_for(card, {"brand": "keyword"})
            blobs = [_Images.blobs[f"/img/{i}.png"] for i in range(4)]
            vecs = encoder.encode_images([Image.open(io.BytesIO(b)) for b in blobs])
            with DuckDBStore(tmp_path_factory.mktemp("wiring-embedded")) as emb:
                emb.ensure_index(layout)
                emb.upsert([Document(f"d{i}", {a: vecs[a][i] for a in card["attributes"]}, {"brand": "b"},
                                     card["version"]) for i in range(4)])
                spec = query_spec(card, options)
                spec.vectors = {a: vecs[a][2] for a in card["attributes"]}
                want = emb.search(spec).hits
            total_w = sum(spec.attributes.values())
            got = [(h["_id"], h["_score"] - total_w) for h in res["hits"]["hits"]]
            assert [i for i, _ in got] == [h.id for h in want]
            assert [sc for _, sc in got] == pytest.approx([h.score for h in want], abs=1e-4)
            again = apply(card, options, store)
            assert again.ids == result.ids
        finally:
            if result is not None:
                teardown(card, store, result.ids)
                # Nothing of this model version is left: pipelines, models, connectors.
                gone = [f"/_search/pipeline/{result.names.search_pipeline}",
                        f"/_ingest/pipeline/{result.names.ingest_pipeline}",
                        *(f"/_plugins/_ml/{kind}s/{result.ids[kind]}" for kind in ("model", "connector")
                          if result.ids.get(kind))]
                for path in gone:
                    with pytest.raises(Exception, match="404|NotFound|not found|Not Found"):
                        store.client.transport.perform_request("GET", path)
                try:
                    store.client.indices.delete(index=result.index)
                except Exception:  # noqa: BLE001 - best-effort cleanup
                    pass
            img_srv.shutdown()
