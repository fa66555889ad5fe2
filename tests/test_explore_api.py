"""The explore page's JSON endpoints (fgplugin/web/app.py) over an embedded store built from generated
data, and once over the real OpenSearch node: every answer compared with what the store itself says.
About 15 s on 2 cores (most of it indexing 40 generated items with the session's tiny export)."""

from __future__ import annotations

import base64
import collections
import uuid
from pathlib import Path

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from fgplugin.catalog import load_catalog  # noqa: E402
from fgplugin.search.spec import QuerySpec, Range, Term, Terms  # noqa: E402
from fgplugin.stores import open_store  # noqa: E402
from fgplugin.web.app import catalog_labels, create_app  # noqa: E402

N_ITEMS = 40
BRANDS = ["Aurora", "Cobalt & Co", "Dunmore", "Fjord", "Harbor"]


def explore_store(base: Path) -> tuple[Path, Path, Path]:
    """(store dir, catalog, export): N_ITEMS generated items indexed with the session's tiny export; built
    once per session (the browser test and bench/screenshot.py's test reuse it)."""
    from fgplugin import synth
    from fgplugin.export import ExportedEncoder
    from fgplugin.indexer import index_catalog

    from test_encoder import tiny_export

    export = tiny_export(base, synth.synth_schema())
    root = base / "explore-store"
    store_dir, catalog = root / "store", root / "data" / "catalog.jsonl"
    if not (root / "done").is_file():
        synth.generate(root / "data", N_ITEMS, seed=7, size=64, workers=1)
        with open_store(f"embedded:{store_dir}") as st:
            report = index_catalog(catalog, ExportedEncoder.load(export, device="cpu"), st, workers=1,
                                   errors_path=root / "errors.jsonl", model_path=export)
            assert report.indexed == N_ITEMS, report.failures
        (root / "done").write_text("ok")
    return store_dir, catalog, export


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return explore_store(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def client(built):
    store_dir, catalog, _ = built
    st = open_store(f"embedded:{store_dir}", read_only=True)
    app = create_app(st, labels=catalog_labels(catalog, st))
    with TestClient(app) as c:
        yield c, st, load_catalog(catalog, st.require_layout().schema)
    st.close()


def _ids(hits):
    return [h["id"] if isinstance(h, dict) else h.id for h in hits]


def test_info_lists_the_layout(client):
    c, st, _ = client
    info = c.get("/api/info").json()
    layout = st.require_layout()
    assert [a["name"] for a in info["attributes"]] == layout.attributes
    assert info["metadata"] == layout.metadata_types
    assert info["documents"] == N_ITEMS and info["labels"] is True and info["image_queries"] is True
    assert info["attention"] is False and "--checkpoint" in info["attention_note"]


def test_items_page_through_the_store_by_id(client):
    c, st, catalog = client
    ids = sorted(it.id for it in catalog.items)
    first = c.get("/api/items", params={"limit": 10}).json()["items"]
    second = c.get("/api/items", params={"limit": 10, "offset": 10}).json()["items"]
    assert _ids(first) + _ids(second) == ids[:20]
    prefix = ids[13][:-1]
    got = c.get("/api/items", params={"prefix": prefix}).json()["items"]
    assert _ids(got) == [i for i in ids if i.startswith(prefix)] == _ids(st.browse(prefix, 0, 50))
    item = catalog.by_id()[ids[0]]
    assert first[0]["labels"] == item.labels and first[0]["metadata"]["brand"] == item.metadata["brand"]


def test_keyword_values_count_the_documents(client):
    c, _, catalog = client
    got = c.get("/api/values", params={"field": "brand"}).json()["values"]
    want = collections.Counter(it.metadata["brand"] for it in catalog.items)
    assert {v["value"]: v["count"] for v in got} == dict(want)
    assert [v["count"] for v in got] == sorted(want.values(), reverse=True)
    bad = c.get("/api/values", params={"field": "price"})
    assert bad.status_code == 400 and "'price' is float, not keyword" in bad.json()["error"]["message"]


def test_search_equals_the_store_with_weights_and_filters(client):
    c, st, catalog = client
    a1, a2 = st.require_layout().attributes[:2]
    like = sorted(it.id for it in catalog.items)[5]
    body = {"like_id": like, "attributes": {a1: 1.0, a2: 0.35}, "k": 15,
            "filters": [{"field": "price", "lte": 80}, {"field": "in_stock", "is": True},
                        {"field": "brand", "any": BRANDS}, "has:added"]}
    got = c.post("/api/search", json=body).json()
    spec = QuerySpec({a1: 1.0, a2: 0.35}, like_id=like, k=15,
                     filters=[Range("price", lte=80), Term("in_stock", True),
                              Terms("brand", tuple(BRANDS))])
    want = st.search(spec).hits
    assert _ids(got["hits"]) == _ids(want) and len(want) > 0
    assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in want], abs=1e-6)
    items = catalog.by_id()
    for h in got["hits"]:
        assert h["metadata"]["price"] <= 80 and h["metadata"]["in_stock"] is True
        assert h["labels"] == items[h["id"]].labels and set(h["cosines"]) == {a1, a2}
    assert got["query"]["labels"] == items[like].labels


def test_a_photo_finds_its_own_item_first(client, built):
    c, st, catalog = client
    a = st.require_layout().attributes[0]
    item = sorted(catalog.items, key=lambda it: it.id)[3]
    photo = base64.b64encode(Path(st.image_of(item.id)).read_bytes()).decode()
    got = c.post("/api/search", json={"image": "data:image/jpeg;base64," + photo, "attributes": {a: 1.0}, "k": 3}).json()
    assert got["hits"][0]["id"] == item.id and got["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_thumbnails_are_jpegs(client):
    c, _, catalog = client
    r = c.get("/api/image", params={"id": catalog.items[0].id, "size": 48})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"


@pytest.mark.parametrize("body, status, cause, words", [
    ({"like_id": "no-such-item", "attributes": {"colour": 1}}, 404, "unknown_id", "'no-such-item'"),
    ({"like_id": "syn000001", "attributes": {"colour": 1}, "filters": [{"field": "colour_x", "is": "a"}]}, 400,
     "query", "unknown field 'colour_x'"),
    ({"like_id": "syn000001", "attributes": {"colour": 1}, "filters": [{"field": "brand", "gte": 3}]}, 400, "query",
     "range filter on 'brand'"),
    ({"like_id": "syn000001", "attributes": {"colour": 1}, "filters": [{"field": "price", "lte": "cheap"}]}, 400,
     "query", "'price'"),
    ({"like_id": "syn000001", "attributes": {"sleeve": 1}}, 400, "query", "sleeve"),
    ({"image": "not base64!", "attributes": {"colour": 1}}, 400, "image", "base64"),
])
def test_errors_name_their_cause(client, body, status, cause, words):
    c, _, _ = client
    r = c.post("/api/search", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["cause"] == cause and words in err["message"]


def test_a_missing_model_and_a_store_that_is_down_are_reported(built, tmp_path):
    store_dir, catalog, _ = built
    with open_store(f"embedded:{store_dir}", read_only=True) as st:
        item = load_catalog(catalog, st.require_layout().schema).items[0]
        with TestClient(create_app(st, model=str(tmp_path / "gone"))) as c:
            photo = base64.b64encode(Path(st.image_of(item.id)).read_bytes()).decode()
            r = c.post("/api/search", json={"image": photo, "attributes": {"colour": 1}})
            assert r.status_code == 503 and r.json()["error"]["cause"] == "model"
            assert str(tmp_path / "gone") in r.json()["error"]["message"]
    down = open_store("opensearch:http://127.0.0.1:9", interactive=True)
    with TestClient(create_app(down)) as c:
        r = c.get("/api/info")
        assert r.status_code == 503 and r.json()["error"]["cause"] == "store"
        assert "127.0.0.1:9" in r.json()["error"]["message"]


def test_attention_maps_of_a_checkpoint(built, client):
    from fgplugin.loading import load_encoder
    from fgplugin.synth import synth_schema

    _, st, catalog = client
    ckpt = built[2].parent / f"ckpt-{synth_schema().fingerprint()}"
    app = create_app(st, explainer=load_encoder(ckpt, device="cpu"))
    a = st.require_layout().attributes[:2]
    with TestClient(app) as c:
        got = c.post("/api/attention", json={"attributes": a, "id": catalog.items[0].id}).json()
    assert [p["attribute"] for p in got["panels"]] == a
    assert all(p["image"].startswith("data:image/jpeg;base64,") for p in got["panels"])


def test_the_page_and_its_files_are_served_locally(client):
    c, _, _ = client
    page = c.get("/").text
    assert "/static/app.js" in page and "/static/style.css" in page and "http" not in page.replace("http-equiv", "")
    for f in ("app.js", "style.css"):
        r = c.get(f"/static/{f}")
        assert r.status_code == 200 and "://" not in r.text


def test_the_page_works_over_opensearch(opensearch_url, built):
    """The same endpoints over the real node: items, keyword values and hits equal the embedded store's."""
    from fgplugin.opensearch.store import OpenSearchStore

    store_dir, catalog, _ = built
    with open_store(f"embedded:{store_dir}", read_only=True) as emb:
        layout = emb.require_layout()
        docs = list(emb.get_documents([d.id for d in emb.browse(None, 0, N_ITEMS)]).values())
        alias = f"fgexplore-{uuid.uuid4().hex[:8]}"
        os_store = OpenSearchStore.from_url(opensearch_url, index=alias, refresh="wait_for")
        try:
            os_store.ensure_index(layout)
            assert not os_store.upsert(docs).failed
            a1, a2 = layout.attributes[:2]
            body = {"like_id": docs[4].id, "attributes": {a1: 1.0, a2: 0.5}, "k": 10,
                    "filters": [{"field": "price", "lte": 90}, {"field": "in_stock", "is": True}]}
            with TestClient(create_app(os_store)) as c_os, TestClient(create_app(emb)) as c_emb:
                for path, params in (("/api/items", {"limit": 15, "offset": 5}), ("/api/items", {"prefix": docs[0].id[:-1]}),
                                     ("/api/items", {"prefix": "syn00001", "offset": 2, "limit": 3}),
                                     ("/api/items", {"prefix": "syn000010"}),
                                     ("/api/values", {"field": "brand"})):
                    got, want = c_os.get(path, params=params).json(), c_emb.get(path, params=params).json()
                    key = "items" if path == "/api/items" else "values"
                    if key == "items":  # dates may be written differently (same instant); ids and prices agree
                        assert [(i["id"], i["metadata"]["price"]) for i in got[key]] == \
                            [(i["id"], i["metadata"]["price"]) for i in want[key]] and want[key]
                    else:
                        assert got[key] == want[key]
                got, want = c_os.post("/api/search", json=body).json(), c_emb.post("/api/search", json=body).json()
                assert _ids(got["hits"]) == _ids(want["hits"]) and got["hits"]
                assert [h["score"] for h in got["hits"]] == pytest.approx([h["score"] for h in want["hits"]], abs=1e-4)
                r = c_os.post("/api/search", json={**body, "like_id": "no-such-item"})
                assert r.status_code == 404 and r.json()["error"]["cause"] == "unknown_id"
        finally:
            for name in list(os_store.client.indices.get(index=f"{alias}-*")):
                os_store.client.indices.delete(index=name)
            os_store.close()
