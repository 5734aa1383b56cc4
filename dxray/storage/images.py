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


def to_uint8(image) -> np.ndarray:
    """An image in [0, 1] (tensor or array; C×H×W, H×W×C or H×W) → uint8 H×W×3 (values clipped)."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an image of 2 or 3 dimensions, got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {arr.shape}")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
