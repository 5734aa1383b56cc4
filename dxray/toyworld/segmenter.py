"""A segmenter for the toy world with the interface of :class:`dxray.segment.Segmenter`.

The object of a prompt such as "red circle." is every pixel within ``tolerance`` (RGB Euclidean
distance) of the red object colour. On rendered images this is the renderer's exact mask; object
colours are > 2 x tolerance away from every other world colour, so slightly blurry generated
images still segment well.

Concepts are the world's colour names ("purple": a background and its stripe shade, "red": an object
colour): a pixel covers the concept whose colour is nearest to it, when that is within ``tolerance``.
"""

from __future__ import annotations

import numpy as np

from dxray.segment import Segmentation, rle_encode
from dxray.toyworld.render import BACKGROUND_COLOURS, OBJECT_COLOURS, stripe_colour


def prompt_colour(prompt: str) -> tuple[int, int, int]:
    """RGB of the colour word that opens a prompt ("red circle." -> red)."""
    words = prompt.strip().lower().rstrip(".").split()
    word = words[0] if words else ""
    if word not in OBJECT_COLOURS:
        raise ValueError(f"unknown colour {word!r} in prompt {prompt!r}; expected one of {list(OBJECT_COLOURS)}")
    return OBJECT_COLOURS[word]


class WorldSegmenter:
    """Colour-threshold segmenter; accepts and ignores Segmenter's keyword arguments."""

    def __init__(self, *, tolerance: float = 60.0, concepts: list[str] | None = None, **_ignored):
        if not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.concepts = [c.strip().lower() for c in concepts or []]
        unknown = [c for c in self.concepts if c not in BACKGROUND_COLOURS and c not in OBJECT_COLOURS]
        if unknown:
            raise ValueError(f"the toy world's segmenter knows colour names only, not {unknown[0]!r}: "
                             f"{', '.join([*BACKGROUND_COLOURS, *OBJECT_COLOURS])}")
        # every world colour, labelled with its name: a background twice (plain and its stripe shade)
        self._palette = [(name, colour) for name, colour in OBJECT_COLOURS.items()] + [
            (name, colour) for name in BACKGROUND_COLOURS
            for colour in (BACKGROUND_COLOURS[name], stripe_colour(name))]

    def coverage(self, image: np.ndarray) -> list[float]:
        """Per concept: the share of pixels whose nearest world colour (within tolerance) is that concept's."""
        pixels = image.astype(np.float32).reshape(-1, 1, 3)
        colours = np.asarray([c for _, c in self._palette], dtype=np.float32).reshape(1, -1, 3)
        dist = ((pixels - colours) ** 2).sum(axis=-1)
        nearest = dist.argmin(axis=1)
        close = dist[np.arange(len(nearest)), nearest] <= self.tolerance**2
        names = np.asarray([n for n, _ in self._palette])[nearest]
        return [float((close & (names == c)).mean()) for c in self.concepts]

    def __call__(self, images: list[np.ndarray], prompts: list[str], with_concepts: bool = True) -> list[Segmentation]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"expected H x W x 3 images, got shape {image.shape}")
            diff = image.astype(np.float32) - np.asarray(prompt_colour(prompt), dtype=np.float32)
            mask = (diff * diff).sum(axis=-1) <= self.tolerance**2
            boxes, scores = [], []
            if mask.any():
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                boxes = [[float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]]
                scores = [1.0]
            out.append(Segmentation(float(mask.mean()), rle_encode(mask), boxes, scores,
                                    self.coverage(image) if self.concepts and with_concepts else None))
        return out
