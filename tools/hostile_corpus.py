"""Writes tests/data/hostile/: broken and hostile image files for the input-path tests.

Usage: python tools/hostile_corpus.py   (needs Pillow with WebP; run from the repository root)
Every file is small; what makes each hostile is described in tests/data/hostile/README.md.
"""

import io
import struct
import zlib

from PIL import Image

OUT = "tests/data/hostile/"


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width, height, raw, color_type=0, depth=8):
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def save(name, data):
    with open(OUT + name, "wb") as f:
        f.write(data)


def pil_bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


good = Image.new("RGB", (64, 48), (200, 40, 40))
good_png = pil_bytes(good, "PNG")
save("truncated.png", good_png[: len(good_png) // 2])
save("truncated.jpg", pil_bytes(good, "JPEG")[:300])
# Header claims 100000 x 100000 (10 gigapixels); the data is a few bytes.
save("huge-dimensions.png", png(100_000, 100_000, zlib.compress(b"\x00" * 64)))
# A real, valid zip bomb: 10000 x 10000 grey zeros (100 MB of pixels) in ~100 KB.
rows = (b"\x00" + b"\x00" * 10_000) * 10_000
save("zip-bomb.png", png(10_000, 10_000, zlib.compress(rows, 9)))
# Valid header, corrupt checksum on the data.
bad = bytearray(good_png)
bad[-20] ^= 0xFF
save("bad-crc.png", bytes(bad))
save("cmyk.jpg", pil_bytes(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG"))
save("gray16.png", pil_bytes(Image.new("I;16", (32, 24), 40000), "PNG"))
frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
save("animated.webp", pil_bytes(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0))
save("not-an-image.gif", pil_bytes(good, "GIF"))
save("empty.png", b"")
save("garbage.bin", bytes((i * 37 + 11) % 256 for i in range(4096)))
save("zero-width.png", png(0, 10, zlib.compress(b"")))
print("written")
