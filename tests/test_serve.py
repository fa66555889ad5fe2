"""`fgplugin serve`: the encoder over HTTP, in-process (ASGI) and over a real localhost socket.

Vectors are compared with ExportedEncoder.encode_images on the same images at atol 1e-5: the model
runs in eval mode, so batch composition changes results only by float rounding (observed < 1e-6).
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import logging
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from fgplugin.images import ImageLimits
from fgplugin.serve import (
    CONCAT_FIELD, VERSION_KEY, BackgroundServer, MicroBatcher, ServeConfig, create_app, host_allowed,
)

ATOL = 1e-5


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from fgplugin.export import ExportedEncoder
    from fgplugin.synth import synth_schema

    from test_encoder import tiny_export  # the session's shared tiny untrained export

    return ExportedEncoder.load(tiny_export(tmp_path_factory.getbasetemp(), synth_schema()), device="cpu")


@pytest.fixture(scope="module")
def prob_encoder(tmp_path_factory):
    """A posterior = prob export: every vector ends with the slack value a query drops."""
    from fgplugin.export import ExportedEncoder
    from fgplugin.synth import synth_schema

    from test_encoder import tiny_prob_export

    return ExportedEncoder.load(tiny_prob_export(tmp_path_factory.getbasetemp(), synth_schema()), device="cpu")


def _png(color=(200, 30, 30), size=(48, 40), pattern: int = 0) -> bytes:
    rng = np.random.default_rng(pattern)
    arr = np.clip(np.array(color, np.float32) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [_png((200, 30, 30), pattern=1), _png((20, 180, 40), (64, 64), 2), _png((30, 30, 220), (32, 70), 3)]


def _expected(encoder, blobs: list[bytes]) -> dict[str, np.ndarray]:
    return encoder.encode_images([Image.open(io.BytesIO(b)).convert("RGB") for b in blobs])


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _check_vectors(encoder, out: dict[str, Any], exp: dict[str, np.ndarray], row: int) -> None:
    for a in encoder.attributes:
        np.testing.assert_allclose(np.asarray(out[a], np.float32), exp[a][row], atol=ATOL, err_msg=a)
    concat = np.concatenate([exp[a][row] / np.linalg.norm(exp[a][row]) for a in encoder.attributes])
    np.testing.assert_allclose(np.asarray(out[CONCAT_FIELD], np.float32), concat, atol=ATOL)


class Counting:
    """Wraps an encoder and counts model calls (optionally slow, or failing)."""

    def __init__(self, inner, delay_s: float = 0.0, fail: Exception | None = None):
        self.inner, self.delay_s, self.fail = inner, delay_s, fail
        self.calls: list[int] = []
        for k in ("attributes", "dims", "version", "card", "preprocess", "query_slack"):
            setattr(self, k, getattr(inner, k))

    def encode_tensors(self, batch):
        self.calls.append(int(batch.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return self.inner.encode_tensors(batch)


def _asgi(app, fn):
    """Run ``await fn(client)`` against the app in-process (no socket)."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as c:
            try:
                return await fn(c)
            finally:
                await app.state.service.batcher.close()

    return asyncio.run(main())


# -- in-process ----------------------------------------------------------------------------------
def test_single_and_batch_vectors_match_the_encoder(encoder, images):
    exp = _expected(encoder, images)
    app = create_app(encoder)

    async def calls(c):
        single = await c.post("/encode", json={"image": _b64(images[0])})
        data_uri = await c.post("/encode", json={"image": {"b64": "data:image/png;base64," + _b64(images[1])}})
        batch = await c.post("/encode", json={"images": [{"b64": _b64(b)} for b in images]})
        upload = await c.post("/encode", files={"file": ("x.png", images[2], "image/png")})
        multi = await c.post("/encode", files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)])
        subset = await c.post("/encode?attributes=" + encoder.attributes[1], json={"image": _b64(images[0])})
        return single, data_uri, batch, upload, multi, subset

    single, data_uri, batch, upload, multi, subset = _asgi(app, calls)
    for r in (single, data_uri, batch, upload, multi, subset):
        assert r.status_code == 200, r.text
        assert r.json()[VERSION_KEY] == encoder.version
    # single calls are flat: one field per attribute, plus emb_all (what ML Commons' output_map reads)
    assert set(single.json()) == {VERSION_KEY, *encoder.attributes, CONCAT_FIELD}
    _check_vectors(encoder, single.json(), exp, 0)
    _check_vectors(encoder, data_uri.json(), exp, 1)
    _check_vectors(encoder, upload.json(), exp, 2)
    for body in (batch.json(), multi.json()):
        assert len(body["items"]) == 3
        for i, item in enumerate(body["items"]):
            _check_vectors(encoder, item, exp, i)
    assert set(subset.json()) == {VERSION_KEY, encoder.attributes[1]}
    for a in encoder.attributes:
        assert len(single.json()[a]) == encoder.dims[a]
        assert abs(np.linalg.norm(single.json()[a]) - 1) < 1e-4


def test_query_form_drops_the_slack_value(encoder, prob_encoder, images):
    """``form: query`` answers with the vectors a query scores with: for a posterior = prob model the
    slack value zeroed and the rest re-normalised (what OpenSearch's image-query pipeline needs); for
    any other model the stored vectors. Every way of asking agrees; an unknown form is a 422."""
    from fgplugin.similarity import query_form

    stored = _expected(prob_encoder, images)
    assert prob_encoder.query_slack and not encoder.query_slack

    async def calls(c):
        return (await c.post("/encode", json={"image": _b64(images[0]), "form": "query"}),
                await c.post("/encode?form=query", json={"images": [{"b64": _b64(b)} for b in images]}),
                await c.post("/encode", files={"file": ("x.png", images[1], "image/png")}, data={"form": "query"}),
                await c.post("/encode", json={"image": _b64(images[0]), "form": "stored"}),
                await c.post("/encode", json={"image": _b64(images[0]), "form": "raw"}))

    single, batch, upload, as_stored, bad = _asgi(create_app(prob_encoder), calls)
    for r in (single, batch, upload, as_stored):
        assert r.status_code == 200, r.text
    rows = [(single.json(), 0), (upload.json(), 1)] + [(item, i) for i, item in enumerate(batch.json()["items"])]
    for out, i in rows:
        blocks = []
        for a in prob_encoder.attributes:
            got = np.asarray(out[a], np.float64)
            assert got[-1] == 0.0 and abs(np.linalg.norm(got) - 1) < 1e-5  # slack dropped, unit again
            want = query_form(stored[a][i], True)
            np.testing.assert_allclose(got, want, atol=ATOL, err_msg=a)
            assert stored[a][i][-1] > 1e-3  # ...where the stored vector has a real slack value
            blocks.append(want)
        np.testing.assert_allclose(out[CONCAT_FIELD], np.concatenate(blocks), atol=ATOL)
    _check_vectors(prob_encoder, as_stored.json(), stored, 0)
    err = _err(bad)
    assert bad.status_code == 422 and "'raw'" in err["message"] and err["known"] == ["stored", "query"]

    # a model without the slack: the query form is the stored vector
    async def plain(c):
        return await c.post("/encode", json={"image": _b64(images[2]), "form": "query"})

    _check_vectors(encoder, _asgi(create_app(encoder), plain).json(), _expected(encoder, images), 2)


def test_health_and_model_card(encoder):
    app = create_app(encoder)

    async def calls(c):
        return await c.get("/health"), await c.get("/model")

    health, model = _asgi(app, calls)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()[VERSION_KEY] == encoder.version
    assert model.json()["version"] == encoder.version and model.json()["dims"] == encoder.dims


def _err(r) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == r.status_code and body["error"]["request_id"]
    return body["error"]


def test_bad_input_gets_clear_4xx(encoder, images):
    big = np.zeros((300, 300, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    cfg = ServeConfig(limits=ImageLimits(max_bytes=20_000, max_pixels=50_000), max_images=4,
                      max_request_bytes=200_000)
    app = create_app(encoder, cfg)
    good = {"b64": _b64(images[0])}
    cases = [
        # (request kwargs, status, words the message must contain, item index)
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, ["not valid JSON"], None),
        (dict(json=[1, 2]), 400, ["JSON object"], None),
        (dict(json={}), 400, ["exactly one of"], None),
        (dict(json={"image": _b64(images[0]), "url": "http://x/y.png"}), 400, ["exactly one of", "image, url"], None),
        (dict(json={"images": []}), 400, ["non-empty list"], None),
        (dict(json={"images": [good, {"b64": "!!not base64!!"}]}), 400, ["item 1", "base64"], 1),
        (dict(json={"images": [good, good, {"b64": _b64(b"GIF89a not really an image")}]}), 400,
         ["item 2", "corrupt"], 2),
        (dict(json={"images": [good, {"link": "x"}]}), 400, ["item 1", "'url' or 'b64'"], 1),
        (dict(json={"image": _b64(b"")}), 400, ["item 0", "empty"], 0),
        (dict(json={"image": _b64(images[0]), "attributes": ["sleeve", CONCAT_FIELD]}), 422,
         ["'sleeve'", "known"], None),
        (dict(json={"image": _b64(buf.getvalue())}), 413, ["item 0", "pixel"], 0),
        (dict(json={"image": _b64(bytes(30_000))}), 413, ["item 0", "byte limit"], 0),
        (dict(json={"images": [good] * 5}), 413, ["5 images", "limit of 4"], None),
        (dict(content=b"x" * 300_000, headers={"content-type": "application/json"}), 413, ["byte limit"], None),
        (dict(json={"url": "file:///etc/passwd"}), 400, ["item 0", "not an http(s) URL"], 0),
        (dict(json={"url": "http://images.example.com/a.png"}), 403, ["item 0", "URL fetching is off"], 0),
        (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, ["content type"], None),
        (dict(files=[("a", ("a.png", images[0])), ("b", ("b.png", images[1]))]), 400, ["'images'"], None),
    ]

    async def calls(c):
        return [await c.post("/encode", **kw) for kw, *_ in cases]

    for r, (kw, status, words, item) in zip(_asgi(app, calls), cases):
        assert r.status_code == status, (kw.keys(), r.text)
        err = _err(r)
        for w in words:
            assert w in err["message"], (w, err)
        assert err.get("item") == item, err
        if status == 422:
            assert err["known"] == [*encoder.attributes, CONCAT_FIELD]


def test_url_host_allow_list_and_token(encoder, images):
    app = create_app(encoder, ServeConfig(allow_hosts=("*.example.com", "10.1.2.3"), token="s3cret"))

    async def calls(c):
        auth = {"Authorization": "Bearer s3cret"}
        return (
            await c.post("/encode", json={"image": _b64(images[0])}),
            await c.post("/encode", json={"image": _b64(images[0])}, headers={"Authorization": "Bearer nope"}),
            await c.post("/encode", json={"url": "http://evil.test/a.png"}, headers=auth),
            await c.post("/encode", json={"image": _b64(images[0])}, headers=auth),
        )

    no_token, wrong, forbidden, ok = _asgi(app, calls)
    assert no_token.status_code == 401 and wrong.status_code == 401
    assert forbidden.status_code == 403 and "'evil.test' is not on the allow-list" in _err(forbidden)["message"]
    assert ok.status_code == 200
    assert host_allowed("img.example.com", ["*.example.com"]) and not host_allowed("example.com.evil", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"]) and host_allowed("ANY.host", ["*"])


def test_internal_errors_do_not_leak(encoder, images, caplog):
    app = create_app(Counting(encoder, fail=RuntimeError("secret path /srv/weights corrupted")))

    async def calls(c):
        return await c.post("/encode", json={"image": _b64(images[0])}, headers={"X-Request-ID": "req-42"})

    with caplog.at_level(logging.ERROR, logger="fgplugin.serve"):
        r = _asgi(app, calls)
    assert r.status_code == 500
    assert _err(r) == {"status": 500, "message": "internal error", "request_id": "req-42"}
    assert "secret" not in r.text
    assert any("req-42" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_micro_batcher_batches():
    import torch

    calls: list[int] = []

    def fn(batch):
        calls.append(int(batch.shape[0]))
        return {"a": batch.flatten(1).numpy() * 2}

    async def main():
        b = MicroBatcher(fn, max_batch=4, max_wait_s=0.05)
        xs = [torch.full((1, 2, 2), float(i)) for i in range(10)]
        out = await b.encode(xs)  # queued at once: batches of 4, 4, 2
        lone = await b.encode([torch.ones(1, 2, 2)])  # alone: waits max_wait, then runs as a batch of 1
        await b.close()
        return out, lone

    out, lone = asyncio.run(main())
    assert calls == [4, 4, 2, 1]
    assert [float(o["a"][0]) for o in out] == [2.0 * i for i in range(10)]  # results go back in order
    assert float(lone[0]["a"][0]) == 2.0


# -- over a real socket --------------------------------------------------------------------------
class _Upstream(http.server.BaseHTTPRequestHandler):
    """Image host for URL tests: /img.png, /stall, /missing, /to-file, /to-other-host, /big."""

    png: bytes = b""

    def do_GET(self):  # noqa: N802
        if self.path == "/img.png":
            self._send(200, self.png)
        elif self.path == "/stall":
            time.sleep(2.0)
            self._send(200, self.png)
        elif self.path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif self.path == "/to-other-host":
            self._redirect(f"http://localhost:{self.server.server_port}/img.png")
        elif self.path == "/big":
            self._send(200, bytes(100_000))
        else:
            self._send(404, b"nope")

    def _send(self, status, body):
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _redirect(self, where):
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def upstream(images):
    _Upstream.png = images[1]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def test_url_fetching_limits_over_socket(encoder, images, upstream):
    limits = ImageLimits(max_bytes=50_000, max_pixels=10_000_000, timeout_s=0.3, retries=0)
    app = create_app(encoder, ServeConfig(allow_hosts=("127.0.0.1",), limits=limits))
    exp = _expected(encoder, [images[1]])
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        ok = c.post("/encode", json={"url": f"{upstream}/img.png"})
        t0 = time.monotonic()
        stall = c.post("/encode", json={"images": [{"b64": _b64(images[0])}, {"url": f"{upstream}/stall"}]})
        stall_s = time.monotonic() - t0
        to_file = c.post("/encode", json={"url": f"{upstream}/to-file"})
        other = c.post("/encode", json={"url": f"{upstream}/to-other-host"})
        missing = c.post("/encode", json={"url": f"{upstream}/missing"})
        big = c.post("/encode", json={"url": f"{upstream}/big"})
    assert ok.status_code == 200, ok.text
    _check_vectors(encoder, ok.json(), exp, 0)
    assert stall.status_code == 504 and _err(stall)["item"] == 1 and "timed out" in _err(stall)["message"]
    assert stall_s < 1.8  # gave up at the 0.3 s timeout, not when the upstream answered (2 s)
    assert to_file.status_code == 403 and "'file' URL refused" in _err(to_file)["message"]
    assert other.status_code == 403 and "'localhost' is not on the allow-list" in _err(other)["message"]
    assert missing.status_code == 502 and "HTTP 404" in _err(missing)["message"]
    assert big.status_code == 413 and "byte limit" in _err(big)["message"]


def test_parallel_requests_are_batched_and_all_answered(encoder, images):
    counting = Counting(encoder)
    app = create_app(counting, ServeConfig(max_batch=8, max_wait_ms=50))
    exp = _expected(encoder, images)
    n = 24

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/encode", json={"image": _b64(images[i % 3])}) for i in range(n)))

    with BackgroundServer(app) as srv:
        rs = asyncio.run(fire(srv.url))
    assert [r.status_code for r in rs] == [200] * n
    for i, r in enumerate(rs):
        _check_vectors(encoder, r.json(), exp, i % 3)
    assert sum(counting.calls) == n
    assert len(counting.calls) < n / 2 and max(counting.calls) > 1, counting.calls  # really batched


def test_saturation_gives_429_and_shutdown_drains(encoder, images):
    counting = Counting(encoder, delay_s=0.4)
    app = create_app(counting, ServeConfig(max_concurrency=2, max_batch=1, max_wait_ms=0))
    body = {"image": _b64(images[0])}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/encode", json=body) for _ in range(6)))

    srv = BackgroundServer(app).__enter__()
    try:
        rs = asyncio.run(burst(srv.url))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        busy = next(r for r in rs if r.status_code == 429)
        assert busy.headers["Retry-After"] == "1" and "busy" in _err(busy)["message"]
        # graceful shutdown: a request in flight when the server is told to stop still gets its answer
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(f"{srv.url}/encode", json=body, timeout=30)))
        t.start()
        deadline = time.monotonic() + 5
        while app.state.service.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.service.in_flight == 1
    finally:
        srv.__exit__(None, None, None)
    t.join(10)
    assert result["r"].status_code == 200


def test_cli_serves_on_a_port_and_stops_cleanly(encoder, images):
    """`fgplugin serve --model EXPORT --port P` is one command; SIGTERM runs uvicorn's graceful shutdown
    (lifespan shutdown drains the batcher), after which uvicorn re-raises the signal as its exit status."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fgplugin_cli.app", "serve", "--model", str(encoder.path), "--port", str(port),
         "--device", "cpu", "--allow-host", "images.example.com", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        r = httpx.post(f"{url}/encode", json={"image": _b64(images[0])}, timeout=30)
        assert r.status_code == 200 and r.json()[VERSION_KEY] == encoder.version
        _check_vectors(encoder, r.json(), _expected(encoder, [images[0]]), 0)
        r = httpx.post(f"{url}/encode", json={"url": "http://elsewhere.test/a.png"}, timeout=30)
        assert r.status_code == 403  # --allow-host reached the service
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out, out
