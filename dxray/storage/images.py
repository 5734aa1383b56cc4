"""PNG encoding of generated images and their inline thumbnails."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_png(img: np.ndarray, size: int = 64) -> bytes:
    """A PNG whose longest side is ``size`` (aspect kept)."""
    im = Image.fromarray(img)
    im.thumbnail((size, size), Image.Resampling.LANCZOS)  # only ever shrinks
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
