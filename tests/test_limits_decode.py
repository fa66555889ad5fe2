"""Decompression bombs are "too large" (413 in serve) with their pixel counts, not "corrupt"; and no
error message shows a Python object repr ("<_io.BytesIO object at 0x...>")."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from fgplugin.errors import ImageError
from fgplugin.images import ImageLimits, decode
from fgplugin.serve import ServeConfig, create_app

from test_limits_body import StubEncoder

PIL_CAP = 2 * Image.MAX_IMAGE_PIXELS  # over this Pillow refuses at open, before the size is ours to read


def _png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h pixels: what a decompression bomb looks like at open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _no_repr(text: str) -> None:
    assert "<" not in text and "0x" not in text and "object at" not in text, text


@pytest.mark.parametrize("w, h, max_pixels, cause", [
    (30_000, 30_000, 40_000_000, "900000000 pixels, over the 40000000-pixel limit"),  # Pillow's error
    (10_000, 10_000, 40_000_000, "10000x10000 pixels, over the 40000000-pixel limit"),  # Pillow's warning
    (30_000, 30_000, 10**9, f"900000000 pixels, over the {PIL_CAP}-pixel limit"),  # Pillow's cap is lower
    (7_000, 7_000, 40_000_000, "7000x7000 pixels, over the 40000000-pixel limit"),  # ours alone
])
def test_a_decompression_bomb_is_too_large_not_corrupt(w, h, max_pixels, cause):
    assert w * h > PIL_CAP or w * h > max_pixels
    with pytest.raises(ImageError) as e:
        decode(_png_declaring(w, h), "https://me:pw@img.example.com/bomb.png?sig=K",
               limits=ImageLimits(max_pixels=max_pixels))
    assert e.value.kind == "too_large"
    assert str(e.value) == f"https://img.example.com/bomb.png: {cause}"


@pytest.mark.parametrize("data", [
    b"GIF89a not really an image",
    b"definitely not an image",
    _png_declaring(8, 8),  # a header, then pixel data that does not decode
    b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
])
def test_corrupt_images_are_named_without_object_reprs(data):
    with pytest.raises(ImageError) as e:
        decode(data, "img/a.png")
    assert e.value.kind == "corrupt" and str(e.value).startswith("img/a.png: corrupt or unreadable image (")
    _no_repr(str(e.value))


def test_serve_answers_413_for_a_bomb_and_400_without_reprs_for_garbage():
    app = create_app(StubEncoder(), ServeConfig())

    async def calls(c):
        bomb = base64.b64encode(_png_declaring(30_000, 30_000)).decode()
        junk = base64.b64encode(b"not an image at all").decode()
        try:
            return (await c.post("/encode", json={"image": bomb}),
                    await c.post("/encode", json={"images": [{"b64": junk}]}),
                    await c.post("/encode", json={"image": junk, "form": {"x": 1}}))
        finally:
            await app.state.service.batcher.close()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fg.test") as c:
            return await calls(c)

    bomb, junk, form = asyncio.run(main())
    assert bomb.status_code == 413, bomb.text
    assert bomb.json()["error"]["message"] == "item 0: image: 900000000 pixels, over the 40000000-pixel limit"
    assert junk.status_code == 400 and "item 0: image: corrupt or unreadable image" in junk.text
    assert form.status_code == 400 and "'form' must be a string" in form.text  # not a dict's repr
    for r in (bomb, junk, form):
        _no_repr(r.text)


def test_a_real_image_still_decodes():
    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(buf, "PNG")
    im = decode(buf.getvalue(), "a.png")
    assert im.mode == "RGB" and im.size == (20, 10)
