"""The image-fetch timeout bounds the whole fetch (connect + headers + body), not each read.

A raw socket server on 127.0.0.1 trickles a byte every 0.2 s (in the body, or in the headers) and
gives up after TRICKLE_S, so that the old per-read timeout, which never trips, fails these tests in
seconds instead of hanging them.
"""

from __future__ import annotations

import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from fgplugin.errors import ImageError
from fgplugin.images import ImageLimits, read_bytes, shown_url
from fgplugin.serve import BackgroundServer, ServeConfig, create_app

from test_limits_body import StubEncoder

TRICKLE_S = 5.0
SLACK_S = 0.6  # scheduling slack on a busy machine: far below what the old timeout allowed


class Trickler:
    """HTTP/1.1 with keep-alive: /ok.png answers at once; /trickle-body sends its headers, then one body
    byte every 0.2 s; /trickle-headers sends its status line, then one header byte every 0.2 s."""

    def __init__(self, png: bytes):
        self.png = png
        self.connections = 0
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TRICKLE_S)
        buf = b""
        with conn:
            try:
                while not self.stop.is_set():
                    while b"\r\n\r\n" not in buf:
                        got = conn.recv(4096)
                        if not got:
                            return
                        buf += got
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    path = head.split()[1].decode().split("?")[0]
                    if path == "/ok.png":
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.png), self.png))
                    elif path == "/trickle-body":
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                        return self._trickle(conn, b"x" * 100_000)
                    elif path == "/trickle-headers":
                        conn.sendall(b"HTTP/1.1 200 OK\r\n")
                        return self._trickle(conn, b"X-Slow: " + b"a" * 50_000)
                    else:
                        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            except OSError:  # the client hung up, as it should
                return

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        end = time.monotonic() + TRICKLE_S
        for i in range(len(data)):
            if self.stop.wait(0.2) or time.monotonic() > end:
                return
            conn.sendall(data[i:i + 1])

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture()
def trickler():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    t = Trickler(buf.getvalue())
    yield t
    t.close()


def _timed_fetch(url: str, limits: ImageLimits, client: httpx.Client | None = None) -> tuple[ImageError, float]:
    t0 = time.monotonic()
    with pytest.raises(ImageError) as e:
        read_bytes(url, limits=limits, client=client)
    return e.value, time.monotonic() - t0


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_server_cannot_hold_a_fetch_past_the_timeout(trickler, path):
    url = f"http://fg-user:s3cret@127.0.0.1:{trickler.port}{path}?X-Signature=KEY123#frag"
    err, took = _timed_fetch(url, ImageLimits(timeout_s=1.0, retries=0))
    assert err.kind == "timeout"
    assert str(err) == f"{trickler.url}{path}: timed out after 1 s (after 1 attempts)"  # no credentials, no query
    assert 1.0 <= took < 1.0 + SLACK_S, took


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_the_deadline_holds_on_a_reused_keep_alive_connection(trickler, path):
    limits = ImageLimits(timeout_s=1.0, retries=0)
    with httpx.Client(timeout=limits.timeout_s) as client:
        assert read_bytes(f"{trickler.url}/ok.png", limits=limits, client=client) == trickler.png
        err, took = _timed_fetch(f"{trickler.url}{path}", limits, client)
        assert read_bytes(f"{trickler.url}/ok.png", limits=limits, client=client) == trickler.png  # still usable
    assert trickler.connections == 2  # the first connection was reused, then dropped with its timed-out fetch
    assert err.kind == "timeout" and took < 1.0 + SLACK_S, took


def test_each_attempt_has_the_deadline(trickler):
    err, took = _timed_fetch(f"{trickler.url}/trickle-body", ImageLimits(timeout_s=0.5, retries=1, backoff_s=0.1))
    assert str(err).endswith("timed out after 0.5 s (after 2 attempts)")
    assert 1.1 <= took < 1.1 + SLACK_S, took


def test_serve_answers_504_in_time_naming_the_url_without_credentials(trickler):
    limits = ImageLimits(timeout_s=1.0, retries=0)
    app = create_app(StubEncoder(), ServeConfig(allow_hosts=("127.0.0.1",), limits=limits))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        t0 = time.monotonic()
        r = c.post("/encode", json={"url": f"http://u:pw-SECRET@127.0.0.1:{trickler.port}/trickle-body?k=SECRET"})
        took = time.monotonic() - t0
        ok = c.post("/encode", json={"url": f"{trickler.url}/ok.png"})
        bad = c.post("/encode", json={"url": "http://u:pw-SECRET@[::1/a.png"})  # urlparse raises: was a 500
    assert r.status_code == 504, r.text
    assert r.json()["error"]["message"] == (
        f"item 0: upstream fetch timed out: {trickler.url}/trickle-body: timed out after 1 s (after 1 attempts)")
    assert "SECRET" not in r.text and took < 1.0 + SLACK_S + 0.5, took
    assert ok.status_code == 200, ok.text
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "item 0: not a valid URL", bad.text


def test_shown_url_drops_credentials_query_and_fragment():
    assert shown_url("https://me:pw@img.example.com:8443/a/b.jpg?sig=1#x") == "https://img.example.com:8443/a/b.jpg"
    assert shown_url("http://img.example.com/a.jpg") == "http://img.example.com/a.jpg"
    with pytest.raises(ImageError) as e:
        read_bytes("ftp://me:pw@files.example.com/a.jpg")
    assert "pw" not in str(e.value) and "ftp://files.example.com/a.jpg" in str(e.value)
    with pytest.raises(ImageError) as e:
        read_bytes("http://me:pw@[::1/a.jpg")
    assert e.value.kind == "bad_url" and "pw" not in str(e.value) and "not a valid URL" in str(e.value)
