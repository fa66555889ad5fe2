"""Bulk error handling and credentials against a local fake node: per-document 429s retried, 400s
captured with id and reason, whole-request 5xx retried with a bounded wait, a dead server gives a
clear StoreError, and no password or API key ever shows in messages, reprs or logs."""

from __future__ import annotations

import base64
import logging
import socket
import time

import numpy as np
import pytest

from fake_opensearch import FakeOpenSearch
from opensearch_spec import api_spec  # noqa: F401 (session fixture)
from fgplugin.errors import StoreError
from fgplugin.opensearch.client import OpenSearchConfig, load_config, redact_url
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import Document, IndexLayout

DIMS = {"sleeve": 4, "neckline": 3}
LAYOUT = IndexLayout(AttributeSchema(tuple(Attribute(n, ("a", "b")) for n in DIMS), name="t"), DIMS,
                     {"price": "float"}, "v1")
PASSWORD = "s3cret-Pa55word!"
API_KEY = "QUtJRC1hcGkta2V5LXZhbHVl"


def docs(n=20, prefix="d"):
    rng = np.random.default_rng(0)
    return [Document(f"{prefix}{i}", {a: rng.normal(size=d) for a, d in DIMS.items()}, {"price": float(i)}, "v1")
            for i in range(n)]


@pytest.fixture
def fake(api_spec):
    with FakeOpenSearch(api_spec.errors) as f:
        yield f
        assert f.spec_errors == []


def make_store(fake, **kw) -> OpenSearchStore:
    base = dict(url=fake.url, index="fg", retry_total_s=0.5, retry_initial_s=0.01, bulk_initial_backoff=0.01,
                bulk_chunk_size=8, bulk_max_retries=3)
    base.update(kw)
    s = OpenSearchStore(OpenSearchConfig(**base))
    s.ensure_index(LAYOUT)
    return s


def bulk_ids(fake, start=0):
    """The document ids of each _bulk request after the first ``start`` ones."""
    out = []
    for body in fake.bodies("bulk")[start:]:
        out.append([next(iter(line.values()))["_id"] for line in body if set(line) & {"index", "delete"}])
    return out


def test_throttled_documents_are_retried_until_they_succeed(fake):
    s = make_store(fake)
    fake.throttle = {"d1": 2, "d9": 1}
    res = s.upsert(docs())
    assert sorted(res.ok) == sorted(f"d{i}" for i in range(20)) and not res.failed
    assert len(res.ok) == len(set(res.ok))
    calls = bulk_ids(fake)
    # chunks of 8: d0-d7 (d1 throttled twice), d8-d15 (d9 once), d16-d19; retries resend only the rejected
    assert calls == [[f"d{i}" for i in range(8)], ["d1"], ["d1"], [f"d{i}" for i in range(8, 16)], ["d9"],
                     [f"d{i}" for i in range(16, 20)]]
    assert s.count() == 20


def test_throttling_that_outlasts_the_retries_is_reported_not_dropped(fake):
    s = make_store(fake, bulk_max_retries=2)
    fake.throttle = {"d3": 10}
    res = s.upsert(docs(8))
    (f,) = res.failed
    assert f.id == "d3" and f.stage == "store" and f.kind == "throttled"
    assert "429" in f.reason and "rejected_execution_exception" in f.reason
    assert sorted(res.ok + [f.id]) == sorted(f"d{i}" for i in range(8))


def test_rejected_documents_are_captured_with_id_and_reason(fake):
    s = make_store(fake)
    fake.reject = {"d2": "failed to parse field [price] of type [double] in document with id 'd2'"}
    bad_dim = Document("d-wrong", {"sleeve": np.ones(5)}, {}, "v1")  # caught before sending
    res = s.upsert(docs(6) + [bad_dim])
    failures = {f.id: f for f in res.failed}
    assert set(failures) == {"d2", "d-wrong"}
    assert failures["d2"].kind == "rejected" and "HTTP 400" in failures["d2"].reason
    assert "mapper_parsing_exception" in failures["d2"].reason and "failed to parse field [price]" in failures["d2"].reason
    assert failures["d-wrong"].kind == "rejected" and "has shape (5,)" in failures["d-wrong"].reason
    assert "d-wrong" not in sum(bulk_ids(fake), [])
    assert sorted(res.ok) == [f"d{i}" for i in range(6) if i != 2]


def test_server_side_rejections_of_mapping_errors_are_captured(fake):
    s = make_store(fake)
    # Bypass the client-side checks to see the server's own answer for a vector of the wrong size.
    s.prepare_document = lambda doc, layout: {"emb_sleeve": [0.5] * 7, "model_version": "v1"}
    res = s.upsert(docs(2))
    assert [f.id for f in res.failed] == ["d0", "d1"]
    assert all("Vector dimension mismatch" in f.reason and f.kind == "rejected" for f in res.failed)


def test_whole_request_5xx_is_retried_with_backoff(fake):
    s = make_store(fake)
    n0 = len(fake.bodies("bulk"))
    fake.bulk_statuses = [503, 502]
    t0 = time.perf_counter()
    res = s.upsert(docs(5))
    assert sorted(res.ok) == [f"d{i}" for i in range(5)] and not res.failed
    assert len(fake.bodies("bulk")) - n0 == 3
    assert time.perf_counter() - t0 < 2.0


def test_a_transport_failure_during_429_retries_resends_only_what_is_unsettled(fake):
    s = make_store(fake)
    n0 = len(fake.bodies("bulk"))
    fake.throttle = {"d4": 1}
    fake.bulk_statuses = [None, 503]  # first call answers per item; the helper's 429 retry gets a 503
    res = s.upsert(docs(6))
    assert sorted(res.ok) == [f"d{i}" for i in range(6)] and len(res.ok) == 6 and not res.failed
    assert bulk_ids(fake, n0) == [[f"d{i}" for i in range(6)], ["d4"], ["d4"]]


def test_persistent_5xx_gives_up_after_a_bounded_wait(fake):
    s = make_store(fake, retry_total_s=0.3)  # backoff 0.01, 0.02, 0.04, ... s: 5 retries fit in 0.3 s
    n0 = len(fake.bodies("bulk"))
    fake.bulk_statuses = [503] * 1000
    t0 = time.perf_counter()
    with pytest.raises(StoreError) as exc:
        s.upsert(docs(3))
    elapsed = time.perf_counter() - t0
    msg = str(exc.value)
    assert fake.url in msg and "HTTP 503" in msg and "after 5 attempts" in msg
    assert len(fake.bodies("bulk")) - n0 == 5
    assert elapsed < 0.3 + 1.0  # the total wait stays within retry_total_s (plus request time)


def _dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_server_down_is_a_clear_error_without_credentials(caplog):
    url = _dead_url()
    caplog.set_level(logging.DEBUG)
    s = OpenSearchStore(load_config(f"http://fguser:{PASSWORD}@{url[7:]}/fg", env={}, retry_total_s=0.2,
                                    retry_initial_s=0.05))
    t0 = time.perf_counter()
    with pytest.raises(StoreError) as exc:
        s.ensure_index(LAYOUT)
    msg = str(exc.value)
    assert url in msg and "cannot connect" in msg and "attempts" in msg
    assert time.perf_counter() - t0 < 3.0
    for text in (msg, repr(s), repr(s.config), s.url, caplog.text):
        assert PASSWORD not in text and "fguser:" not in text
    assert PASSWORD not in base64.b64decode(base64.b64encode(caplog.text.encode())).decode()
    basic = base64.b64encode(f"fguser:{PASSWORD}".encode()).decode()
    assert basic not in caplog.text and basic not in msg


def test_basic_auth_is_sent_and_a_refusal_names_no_secret(fake, caplog):
    fake.auth = "Basic " + base64.b64encode(f"fguser:{PASSWORD}".encode()).decode()
    caplog.set_level(logging.DEBUG)
    s = make_store(fake, user="fguser", password=PASSWORD)
    assert not s.upsert(docs(3)).failed
    wrong = OpenSearchStore(OpenSearchConfig(url=fake.url, index="fg", user="fguser", password="wrong-" + PASSWORD,
                                             retry_total_s=0.1, retry_initial_s=0.01))
    with pytest.raises(StoreError) as exc:
        wrong.count()
    assert "HTTP 401" in str(exc.value) and "FGPLUGIN_OPENSEARCH_USER" in str(exc.value)
    for text in (str(exc.value), caplog.text, repr(s), repr(wrong)):
        assert PASSWORD not in text


def test_api_key_is_sent_as_authorization_apikey(fake, caplog, monkeypatch, tmp_path):
    fake.auth = f"ApiKey {API_KEY}"
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FGPLUGIN_OPENSEARCH_API_KEY", API_KEY)
    monkeypatch.delenv("FGPLUGIN_OPENSEARCH_USER", raising=False)
    s = OpenSearchStore.from_url(fake.url, index="fg", retry_total_s=0.1)
    s.ensure_index(LAYOUT)
    assert s.count() == 0
    assert all(r["headers"].get("authorization") == f"ApiKey {API_KEY}" for r in fake.requests)
    assert API_KEY not in caplog.text and API_KEY not in repr(s) and API_KEY not in repr(s.config)


# -- settings -----------------------------------------------------------------------------------------
def test_settings_come_from_url_then_env_then_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg_file = tmp_path / "os.toml"
    cfg_file.write_text('[opensearch]\nurl = "https://file-host:9201"\nuser = "fileuser"\npassword = "filepw"\n'
                        'index = "fromfile"\nverify_certs = false\nca_certs = "/ca.pem"\ntimeout = 12\n')
    cfg_file.chmod(0o600)
    c = load_config(config_path=cfg_file, env={})
    assert (c.url, c.user, c.password, c.index, c.verify_certs, c.ca_certs, c.timeout) == (
        "https://file-host:9201", "fileuser", "filepw", "fromfile", False, "/ca.pem", 12.0)
    env = {"FGPLUGIN_OPENSEARCH_URL": "http://env-host:9200", "FGPLUGIN_OPENSEARCH_PASSWORD": "envpw",
           "FGPLUGIN_OPENSEARCH_VERIFY_CERTS": "true", "FGPLUGIN_OPENSEARCH_INDEX": "fromenv"}
    c = load_config(config_path=cfg_file, env=env)
    assert (c.url, c.user, c.password, c.index, c.verify_certs) == ("http://env-host:9200", "fileuser", "envpw",
                                                                     "fromenv", True)
    c = load_config("https://urluser:url%40pw@url-host:9300/urlindex", config_path=cfg_file, env=env)
    assert (c.url, c.user, c.password, c.index) == ("https://url-host:9300", "urluser", "url@pw", "urlindex")
    assert "url@pw" not in repr(c) and "urluser" in repr(c)
    c = load_config(env={"FGPLUGIN_OPENSEARCH_CONFIG": str(cfg_file)})  # the env var names the file
    assert c.user == "fileuser"
    assert load_config(env={}).url == "http://localhost:9200"  # no file in $HOME: defaults


def test_bad_settings_are_refused_clearly(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('url = "http://h:9200"\npasword = "typo-secret"\n')
    with pytest.raises(StoreError, match="unknown key.*pasword") as exc:
        load_config(config_path=f, env={})
    assert "typo-secret" not in str(exc.value)
    with pytest.raises(StoreError, match="does not exist"):
        load_config(config_path=tmp_path / "none.toml", env={})
    with pytest.raises(StoreError, match="give only one"):
        load_config(env={"FGPLUGIN_OPENSEARCH_USER": "u", "FGPLUGIN_OPENSEARCH_API_KEY": "k"}, config_path=None)
    with pytest.raises(StoreError, match="not a boolean"):
        load_config(env={"FGPLUGIN_OPENSEARCH_VERIFY_CERTS": "maybe"})
    with pytest.raises(StoreError, match="http:// or https://"):
        load_config("ftp://h:21", env={})
    assert redact_url("https://u:p@h:9200/x") == "https://h:9200/x"


def test_fast_serializer_writes_what_the_standard_one_means():
    """orjson serialises bulk bodies; the decoded JSON equals the standard serializer's for every value
    kind a document holds, and what orjson refuses (an integer over 64 bits) still goes through."""
    import datetime as dt
    import json

    from opensearchpy import JSONSerializer

    from fgplugin.opensearch.client import FastJSONSerializer

    rng = np.random.default_rng(1)
    doc = {"emb_a": rng.normal(size=64).astype(np.float32).tolist(), "price": np.float32(2.5), "n": np.int64(7),
           "when": dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc), "day": dt.date(2024, 5, 6),
           "tags": ["x", "ü"], "ok": True, "none": None, "big": 2**70, "arr": np.arange(3)}
    fast, slow = FastJSONSerializer(), JSONSerializer()
    assert json.loads(fast.dumps(doc)) == json.loads(slow.dumps(doc))
    assert fast.dumps('{"raw": 1}') == '{"raw": 1}'


def test_http_compress_is_off_unless_asked_for():
    """gzip costs the client more than it saves on a fast link: off by default, on from the env or file."""
    assert load_config("http://h:9200", env={}).http_compress is False
    assert load_config("http://h:9200", env={"FGPLUGIN_OPENSEARCH_HTTP_COMPRESS": "true"}).http_compress is True
    with pytest.raises(StoreError, match="http_compress"):
        load_config("http://h:9200", env={"FGPLUGIN_OPENSEARCH_HTTP_COMPRESS": "maybe"})
