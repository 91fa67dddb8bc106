"""Writes the small real photos the edit tests use, from scikit-image's wheel (public domain / CC0 images).

Usage: pip download --no-deps scikit-image==0.26.0 -d DIR && python tools/test_photos.py DIR/scikit_image-*.whl
Output: tests/data/photos/{astronaut.png, coffee.jpg, chelsea.webp}, 128 px on the long side.
"""

import io
import sys
import zipfile

from PIL import Image

PHOTOS = {"astronaut": "png", "coffee": "jpeg", "chelsea": "webp"}
EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}

with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name, fmt in PHOTOS.items():
        img = Image.open(io.BytesIO(wheel.read(f"skimage/data/{name}.png"))).convert("RGB")
        scale = 128 / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        img.save(f"tests/data/photos/{name}.{EXT[fmt]}", fmt.upper(), quality=92)
        print(name, img.size)
