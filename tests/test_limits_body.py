"""`fgplugin serve` request-body limits against hostile clients, over a real localhost socket.

A raw socket client sends the body a chunk at a time and looks for an answer between chunks: the
413 must come as soon as a limit is passed (not after the whole body was read), however the body is
framed, and the server must then close the connection instead of reading the rest.
"""

from __future__ import annotations

import asyncio
import io
import json
import select
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fgplugin.images import ImageLimits
from fgplugin.serve import BackgroundServer, ServeConfig, create_app

LIMIT = 100_000  # request body bytes
FILE_LIMIT = 30_000  # image bytes
CHUNK = 4096


class StubEncoder:
    """Shaped like ExportedEncoder: one attribute, the image's mean colour (no model to build)."""

    attributes = ["colour"]
    dims = {"colour": 3}
    version = "stub-1"
    card = {"version": "stub-1"}
    query_slack = False

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image.resize((4, 4)), np.float32) / 255.0).permute(2, 0, 1)

    def encode_tensors(self, batch):
        return {"colour": batch.mean(dim=(2, 3)).numpy() + 0.1}


def _app(**kw):
    cfg = dict(max_request_bytes=LIMIT, limits=ImageLimits(max_bytes=FILE_LIMIT), max_images=64)
    return create_app(StubEncoder(), ServeConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def server():
    app = _app()
    with BackgroundServer(app) as srv:
        yield srv
    asyncio.run(app.state.service.batcher.close())


def _png(size=(8, 8), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _send_slowly(port: int, head: bytes, body: bytes, *, chunked: bool, pause_s: float = 0.004,
                 wait_s: float = 3.0) -> tuple[bytes, int, bool]:
    """Send ``head``, then ``body`` CHUNK bytes at a time, stopping as soon as an answer is readable.

    Returns (what the server sent, body bytes sent before its answer, whether it closed the connection
    within ``wait_s``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(head)
        sent = 0
        for i in range(0, len(body), CHUNK):
            if select.select([s], [], [], pause_s)[0]:
                break
            c = body[i:i + CHUNK]
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(c), c) if chunked else c)
            except OSError:  # the server hung up: its answer is already on its way
                break
            sent += len(c)
        else:
            if chunked:
                s.sendall(b"0\r\n\r\n")
        got, deadline = b"", time.monotonic() + wait_s
        try:
            while time.monotonic() < deadline:
                r = s.recv(65536)
                if not r:
                    return got, sent, True
                got += r
        except socket.timeout:
            pass
        except ConnectionResetError:
            return got, sent, True
        return got, sent, False


def _head(content_type: str, extra: str = "") -> bytes:
    return (f"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{extra}\r\n").encode()


def _answer(raw: bytes) -> tuple[int, dict, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = "\n".join(lines[1:]).lower()
    return status, json.loads(body)["error"], headers


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "fgBOUNDARY") -> bytes:
    out = b""
    for name, filename, data in parts:
        fn = f'; filename="{filename}"' if filename is not None else ""
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{fn}\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MP = "multipart/form-data; boundary=fgBOUNDARY"


@pytest.mark.parametrize("case", ["json-chunked", "json-lying-length", "multipart-chunked", "multipart-length"])
def test_body_limit_refuses_as_soon_as_it_is_passed(server, case):
    """Multipart bodies used to be read in full (to memory or disk) before any limit was checked."""
    if case.startswith("json"):
        body = b'{"image": "' + b"A" * 1_000_000 + b'"}'
        ctype = "application/json"
    else:  # 40 files under the per-file limit: only the body cap can stop it
        body = _multipart([("images", f"{i}.png", bytes(FILE_LIMIT - 1000)) for i in range(40)])
        ctype = MP
    framing = {
        "json-chunked": "Transfer-Encoding: chunked\r\n",
        "json-lying-length": "Content-Length: 20\r\nTransfer-Encoding: chunked\r\n",  # the smuggler's pair
        "multipart-chunked": "Transfer-Encoding: chunked\r\n",
        "multipart-length": f"Content-Length: {len(body)}\r\n",
    }[case]
    if case == "multipart-length":  # an honest, large Content-Length is refused before any body byte
        got, sent, closed = _send_slowly(server.port, _head(ctype, framing), body, chunked=False)
        status, err, headers = _answer(got)
        assert status == 413 and f"over the {LIMIT}-byte limit" in err["message"], err
        assert sent < 2 * CHUNK and closed and "connection: close" in headers
        return
    got, sent, closed = _send_slowly(server.port, _head(ctype, framing), body, chunked=True)
    status, err, headers = _answer(got)
    assert status == 413 and err["message"] == f"request body is over the {LIMIT}-byte limit", err
    assert LIMIT < sent < LIMIT + 40 * CHUNK < len(body), sent  # answered when the cap was passed
    assert closed and "connection: close" in headers  # and the rest of the body is never read


def test_multipart_file_over_the_image_limit_is_refused_mid_upload(server):
    body = _multipart([("image", "huge.png", bytes(2_000_000))])
    got, sent, closed = _send_slowly(server.port, _head(MP, "Transfer-Encoding: chunked\r\n"), body, chunked=True)
    status, err, headers = _answer(got)
    assert status == 413 and err["item"] == 0, err
    assert err["message"] == f"item 0: huge.png is over the {FILE_LIMIT}-byte limit"
    assert sent < FILE_LIMIT + 20 * CHUNK, sent  # not the 2 MB, nor the body cap
    assert closed


def test_early_refusal_closes_but_a_read_body_keeps_the_connection(server):
    ok = _multipart([("image", "a.png", _png())])
    with httpx.Client(base_url=server.url, timeout=5) as c:
        good = c.post("/encode", content=ok, headers={"content-type": MP})
        refused = c.post("/encode", content=b"abc", headers={"content-type": "text/plain"})  # 415 before reading
    assert good.status_code == 200 and "connection" not in good.headers
    assert refused.status_code == 415 and refused.headers["connection"] == "close"


def _asgi(app, fn):
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fg.test") as c:
            try:
                return await fn(c)
            finally:
                await app.state.service.batcher.close()

    return asyncio.run(main())


def test_multipart_is_parsed_with_bounds(server):
    png, other = _png(), _png(color=(10, 200, 10))
    app = _app(max_images=3)
    cases = [
        # (multipart parts, or raw body, status, words the message must contain)
        ([("image", "a.png", png)], 200, []),
        ([("images", "a.png", png), ("images", "b.png", other), ("attributes", None, b"colour")], 200, []),
        ([("images", f"{i}.png", png) for i in range(4)], 413, ["more than 3 images", "limit of 3"]),
        ([("attributes", None, b"x")] * 17 + [("image", "a.png", png)], 413, ["more than 16 form fields"]),
        ([("attributes", None, b"x" * 70_000), ("image", "a.png", png)], 413, ["'attributes'", "65536-byte limit"]),
        ([("image", "a.png", b"")], 400, ["item 0", "a.png is empty"]),
        ([("attributes", None, b"colour")], 400, ["no file"]),
        (_multipart([("image", "a.png", png)])[:-30], 400, ["ends before its closing boundary"]),
        (b"garbage without any boundary" * 10, 400, ["multipart body is malformed"]),
        (b"--fgBOUNDARY\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
         + b"X-Pad: " + b"p" * 3000 + b"\r\n" + b"X-Pad: " + b"p" * 3000 + b"\r\n" + b"X-Pad: " + b"p" * 3000
         + b"\r\n\r\n" + png + b"\r\n--fgBOUNDARY--\r\n", 413, ["part headers", "8192-byte limit"]),
        (_multipart([("image", "a.png", png)]).replace(b'name="image"; ', b""), 400, ["no name"]),
    ]

    async def calls(c):
        out = [await c.post("/encode", content=body if isinstance(body, bytes) else _multipart(body),
                            headers={"content-type": MP}) for body, *_ in cases]
        out.append(await c.post("/encode", content=_multipart([("image", "a.png", png)]),
                                 headers={"content-type": "multipart/form-data"}))
        return out

    rs = _asgi(app, calls)
    for r, (body, status, words) in zip(rs, cases):
        assert r.status_code == status, (status, r.text)
        if status != 200:
            for w in words:
                assert w in r.json()["error"]["message"], (w, r.text)
            assert "<" not in r.text and "0x" not in r.text, r.text  # no object reprs
    assert rs[-1].status_code == 400 and "no boundary" in rs[-1].json()["error"]["message"]
    single, batch = rs[0].json(), rs[1].json()
    assert set(single) == {"model_version", "colour", "emb_all"}
    assert [set(x) for x in batch["items"]] == [{"colour"}, {"colour"}]  # the "attributes" field applied
    assert batch["items"][0]["colour"] != batch["items"][1]["colour"]
