"""The pipelined encoder: same vectors as encoding directly, input order kept, bounded read-ahead, and
every bad item (missing, corrupt, oversize, timed-out URL, model failure) reported without stopping
the batch."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgplugin.encoder import dequantize, int8_scales, iter_encoded, quantize
from fgplugin.export import ExportedEncoder
from fgplugin.images import ImageLimits

N = 24
ATOL = 1e-5  # pipelined vs direct: same preprocessing and model; only batch composition differs


# -- shared setup: a tiny untrained export and a few images (cached under the session's temp folder) --
def tiny_export(base: Path, schema) -> Path:
    """An untrained small ASEN (resnet18 global branch, 64 px, 32-d) exported for ``schema``; built once
    per session (test_indexer reuses it). Untrained is enough: these tests check the pipeline, not
    quality; ASEN rather than ASEN_v2 because its export takes a third of the time, and its vectors
    still differ per attribute."""
    out = base / f"tiny-export-{schema.fingerprint()}"
    if (out / "model_card.json").is_file():
        return out
    from fgplugin.export import export_model
    from fgplugin.models import build_model, load_config, save_checkpoint

    config = load_config("asen", {"trunk": "resnet18", "image_size": 64, "embed_dim": 32, "attr_embed_dim": 32,
                                  "asa_dim": 32})
    model = build_model(config, schema)
    save_checkpoint(base / f"ckpt-{schema.fingerprint()}", model)
    return export_model(base / f"ckpt-{schema.fingerprint()}", out)


def tiny_prob_export(base: Path, schema) -> Path:
    """An untrained small ``mtc`` with ``posterior = prob`` (every vector [p, slack]) exported for
    ``schema``; built once per session. Untrained posteriors are flat, but the slack value is there."""
    out = base / f"tiny-prob-export-{schema.fingerprint()}"
    if (out / "model_card.json").is_file():
        return out
    from fgplugin.export import export_model
    import torch

    from fgplugin.models import build_model, load_config, save_checkpoint

    torch.manual_seed(0)
    model = build_model(load_config("mtc", {"trunk": "resnet_tiny", "image_size": 64, "posterior": "prob"}), schema)
    save_checkpoint(base / f"ckpt-prob-{schema.fingerprint()}", model)
    return export_model(base / f"ckpt-prob-{schema.fingerprint()}", out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fgplugin.synth import synth_schema

    enc = ExportedEncoder.load(tiny_export(tmp_path_factory.getbasetemp(), synth_schema()), device="cpu")
    root = tmp_path_factory.mktemp("encoder")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        p = root / f"{i:02d}.jpg" if i % 2 else root / f"{i:02d}.png"
        size = (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return enc, root, paths


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/slow"):
            time.sleep(1.5)  # longer than the client's timeout
        if self.path.startswith("/missing"):
            self.send_response(404)
            self.end_headers()
            return
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up, as it should

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server(setup):
    _, _, paths = setup
    handler = type("H", (_Handler,), {"body": paths[1].read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_pipelined_vectors_equal_direct_encoding_in_input_order(setup):
    enc, _, paths = setup
    items = [(f"id{i}", str(p)) for i, p in enumerate(paths)]
    batches = list(iter_encoded(enc, items, batch_size=5, workers=3))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4]  # batch_size input items each
    assert [i for b in batches for i in b.ids] == [i for i, _ in items]
    assert all(not b.failures for b in batches)
    direct = enc.encode_images([Image.open(p) for p in paths])
    for a in enc.attributes:
        got = np.concatenate([b.vectors[a] for b in batches])
        assert got.dtype == np.float32 and got.shape == (N, enc.dims[a])
        np.testing.assert_allclose(got, direct[a], atol=ATOL)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert all(b.timings.model_s > 0 and b.timings.decode_s > 0 for b in batches)


def test_read_ahead_is_bounded(setup):
    enc, _, paths = setup
    pulled = []

    def items():
        for i in range(10_000):  # far more than may ever be in flight
            pulled.append(i)
            yield f"id{i}", str(paths[i % N])

    gen = iter_encoded(enc, items(), batch_size=4, workers=2, prefetch_batches=2)
    first = next(gen)
    assert first.ids == ["id0", "id1", "id2", "id3"]
    # (prefetch_batches + 1) batches queued for the loaders, plus the batch being assembled
    assert len(pulled) <= (2 + 2) * 4
    gen.close()


def test_each_bad_item_is_a_failure_and_the_batch_goes_on(setup, http_server, tmp_path):
    enc, _, paths = setup
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    big = tmp_path / "big.png"  # many bytes, few pixels
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(big)
    wide = tmp_path / "wide.png"  # few bytes, many pixels
    Image.new("RGB", (400, 300), (10, 20, 30)).save(wide)
    limits = ImageLimits(max_bytes=50_000, max_pixels=100_000, timeout_s=0.3, retries=0)
    assert big.stat().st_size > limits.max_bytes and wide.stat().st_size < limits.max_bytes
    items = [
        ("ok0", str(paths[0])),
        ("missing", str(tmp_path / "nope.jpg")),
        ("corrupt", str(tmp_path / "corrupt.jpg")),
        ("ok_url", f"{http_server}/img.jpg"),
        ("too_many_bytes", str(big)),
        ("too_many_pixels", str(wide)),
        ("slow_url", f"{http_server}/slow.jpg"),
        ("http_404", f"{http_server}/missing.jpg"),
        ("ftp", "ftp://example.com/a.jpg"),
        ("ok1", str(paths[2])),
    ]
    batches = list(iter_encoded(enc, items, batch_size=len(items), workers=4, limits=limits))
    assert len(batches) == 1
    b = batches[0]
    assert b.ids == ["ok0", "ok_url", "ok1"]
    got = {f.id: (f.stage, f.kind) for f in b.failures}
    assert got == {
        "missing": ("read", "missing"),
        "corrupt": ("decode", "corrupt"),
        "too_many_bytes": ("read", "too_large"),
        "too_many_pixels": ("decode", "too_large"),
        "slow_url": ("read", "timeout"),
        "http_404": ("read", "http"),
        "ftp": ("read", "bad_url"),
    }
    assert all(f.reason for f in b.failures)
    direct = enc.encode_images([Image.open(paths[0]), Image.open(paths[1]), Image.open(paths[2])])
    for a in enc.attributes:  # the URL served paths[1]'s bytes
        np.testing.assert_allclose(b.vectors[a], direct[a], atol=ATOL)


class _NaNOnSecond:
    """The real encoder, except that item 2 of any batch it sees comes out as NaN."""

    def __init__(self, enc):
        self.enc = enc
        self.preprocess, self.attributes, self.dims = enc.preprocess, enc.attributes, enc.dims

    def encode_tensors(self, batch):
        out = self.enc.encode_tensors(batch)
        if len(batch) > 1:
            for v in out.values():
                v[1] = np.nan
        return out


class _RaisesOnBright:
    """The real encoder, but the model raises whenever a very bright image is in the batch."""

    def __init__(self, enc):
        self.enc = enc
        self.preprocess, self.attributes, self.dims = enc.preprocess, enc.attributes, enc.dims

    def encode_tensors(self, batch):
        if (batch.mean(dim=(1, 2, 3)) > 1.5).any():
            raise RuntimeError("boom")
        return self.enc.encode_tensors(batch)


def test_model_failures_cost_only_the_item(setup, tmp_path):
    enc, _, paths = setup
    b = next(iter_encoded(_NaNOnSecond(enc), [(f"i{k}", str(paths[k])) for k in range(4)], batch_size=4))
    assert b.ids == ["i0", "i2", "i3"]
    assert [(f.id, f.stage, f.kind) for f in b.failures] == [("i1", "encode", "nan")]

    white = tmp_path / "white.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(white)
    items = [("a", str(paths[0])), ("white", str(white)), ("b", str(paths[1]))]
    b = next(iter_encoded(_RaisesOnBright(enc), items, batch_size=3))
    assert b.ids == ["a", "b"]
    assert [(f.id, f.stage, f.kind) for f in b.failures] == [("white", "encode", "model")]
    direct = enc.encode_images([Image.open(paths[0]), Image.open(paths[1])])
    for a in enc.attributes:
        np.testing.assert_allclose(b.vectors[a], direct[a], atol=ATOL)


def test_compact_storage_round_trips(setup):
    enc, _, paths = setup
    b32 = next(iter_encoded(enc, [(str(i), str(p)) for i, p in enumerate(paths[:8])], batch_size=8))
    b8 = next(iter_encoded(enc, [(str(i), str(p)) for i, p in enumerate(paths[:8])], batch_size=8, dtype="int8"))
    b16 = quantize(b32.vectors, "float16")
    scales = int8_scales(enc.card)
    assert set(scales) == set(enc.attributes) and all(s > 0 for s in scales.values())
    for a in enc.attributes:
        assert b8.vectors[a].dtype == np.int8 and b16[a].dtype == np.float16
        # int8 step is 1/scale per component: error at most half a step, cosine error tiny.
        back = dequantize({a: b8.vectors[a]}, scales=scales)[a]
        assert np.abs(back - b32.vectors[a]).max() <= 0.5 / scales[a] + 1e-6
        back = back / np.linalg.norm(back, axis=1, keepdims=True)
        assert np.abs((back * b32.vectors[a]).sum(1) - 1).max() < 1e-2
        assert np.abs(b16[a].astype(np.float32) - b32.vectors[a]).max() < 1e-3
