"""The report's thumbnails: the samples table's PNG re-encoded as a small WebP (JPEG where Pillow has no
WebP) at the size the page shows it, inlined as a ``data:`` URI.

WebP at quality 70 is about 0.6 × the bytes of JPEG at quality 70 on generated-looking pictures and 0.07 ×
the stored PNG (``benchmarks/report.py`` measures both); every current browser decodes it, and the report
tests load each thumbnail in the installed headless Chromium.
"""

from __future__ import annotations

import base64
import io
import warnings

from PIL import Image, features

WIDTH = 96  # CSS pixels a thumbnail is shown at (and the widest it is stored at)
MAX_HEIGHT = 4 * WIDTH
QUALITY = 70
MAX_PIXELS = 4096 * 4096  # a stored thumbnail declaring more is not decoded (it is no thumbnail)
FORMATS = {"webp": ("WEBP", "image/webp", {"quality": QUALITY, "method": 4}),
           "jpeg": ("JPEG", "image/jpeg", {"quality": QUALITY, "optimize": True})}


def default_format() -> str:
    """webp when this Pillow can write it, else jpeg."""
    return "webp" if features.check("webp") else "jpeg"


def small(data: bytes | None, fmt: str) -> tuple[str, int, int] | None:
    """(data URI, width, height) of a stored thumbnail re-encoded in ``fmt`` at most :data:`WIDTH` wide;
    None when ``data`` is empty or not a readable image."""
    if not data:
        return None
    name, mime, options = FORMATS[fmt]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > MAX_PIXELS:
                return None
            im.draft("RGB", (WIDTH, MAX_HEIGHT))  # JPEG: decode at a reduced scale
            im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info else "RGB")
            if im.mode == "RGBA":  # the page's thumbnail background, as the stored PNG would show on it
                im = Image.alpha_composite(Image.new("RGBA", im.size, (245, 247, 250, 255)), im).convert("RGB")
            im.thumbnail((WIDTH, MAX_HEIGHT), Image.Resampling.LANCZOS)  # only ever shrinks
            out = io.BytesIO()
            im.save(out, format=name, **options)
    except Exception:  # a corrupt or hostile thumbnail is shown as unreadable, never fails the report
        return None
    return f"data:{mime};base64,{base64.b64encode(out.getvalue()).decode('ascii')}", im.width, im.height
