"""A segmenter for the toy world with the interface of :class:`dxray.segment.Segmenter`.

The object of a prompt such as "red circle." is every pixel whose nearest world colour is the red
object colour, when that is within ``tolerance`` (RGB Euclidean distance). On rendered images this is
the renderer's exact mask. A generated image draws its colours in shifted shades (the world's decoder
paints a blue square (25, 50, 230) as about (45, 55, 165)): a person still sees a blue square, and so
does the nearest-colour rule, where an exact match within a small radius saw nothing (issue 31).

Concepts are the world's colour names ("purple": a background and its stripe shade, "red": an object
colour, "cyan": v5's marker, "magenta": v5's pattern on an object): a pixel covers the concept whose
colour is nearest to it, when that is within ``tolerance``.
"""

from __future__ import annotations

import numpy as np

from dxray.segment import Segmentation, rle_encode
from dxray.toyworld.render import (
    BACKGROUND_COLOURS,
    MARKER_COLOUR,
    OBJECT_COLOURS,
    PATTERN_COLOUR,
    stripe_colour,
)

TOLERANCE = 100.0  # within this of its nearest world colour a pixel is that colour; object colours are > 120 apart


def prompt_word(prompt: str) -> str:
    """The object colour word that opens a prompt ("red circle." -> "red")."""
    words = prompt.strip().lower().rstrip(".").split()
    word = words[0] if words else ""
    if word not in OBJECT_COLOURS:
        raise ValueError(f"unknown colour {word!r} in prompt {prompt!r}; expected one of {list(OBJECT_COLOURS)}")
    return word


def prompt_colour(prompt: str) -> tuple[int, int, int]:
    """RGB of the colour word that opens a prompt ("red circle." -> red)."""
    return OBJECT_COLOURS[prompt_word(prompt)]


class WorldSegmenter:
    """Colour-threshold segmenter; accepts and ignores Segmenter's keyword arguments."""

    def __init__(self, *, tolerance: float = TOLERANCE, concepts: list[str] | None = None, **_ignored):
        if not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}")
        self.tolerance = float(tolerance)
        # every world colour, labelled with its name: a background twice (plain and its stripe shade)
        self._palette = [(name, colour) for name, colour in OBJECT_COLOURS.items()] + [
            (name, colour) for name in BACKGROUND_COLOURS
            for colour in (BACKGROUND_COLOURS[name], stripe_colour(name))] + [MARKER_COLOUR, PATTERN_COLOUR]
        self._names = np.asarray([n for n, _ in self._palette])
        self._colours = np.asarray([c for _, c in self._palette], dtype=np.float32).reshape(1, -1, 3)
        self.concepts = [c.strip().lower() for c in concepts or []]
        known = list(dict.fromkeys(n for n, _ in self._palette))
        unknown = [c for c in self.concepts if c not in known]
        if unknown:
            raise ValueError(f"the toy world's segmenter knows colour names only, not {unknown[0]!r}: "
                             f"{', '.join(known)}")

    def colour_names(self, image: np.ndarray) -> np.ndarray:
        """H x W: each pixel's nearest world colour name, or "" when none is within the tolerance."""
        pixels = np.asarray(image, dtype=np.float32).reshape(-1, 1, 3)
        dist = ((pixels - self._colours) ** 2).sum(axis=-1)
        nearest = dist.argmin(axis=1)
        close = dist[np.arange(len(nearest)), nearest] <= self.tolerance**2
        return np.where(close, self._names[nearest], "").reshape(np.shape(image)[:2])

    def coverage(self, image: np.ndarray, names: np.ndarray | None = None) -> list[float]:
        """Per concept: the share of pixels whose nearest world colour (within tolerance) is that concept's."""
        names = self.colour_names(image) if names is None else names
        return [float((names == c).mean()) for c in self.concepts]

    def __call__(self, images: list[np.ndarray], prompts: list[str], with_concepts: bool = True) -> list[Segmentation]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"expected H x W x 3 images, got shape {image.shape}")
            names = self.colour_names(image)
            mask = names == prompt_word(prompt)
            boxes, scores = [], []
            if mask.any():
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                boxes = [[float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]]
                scores = [1.0]
            out.append(Segmentation(float(mask.mean()), rle_encode(mask), boxes, scores,
                                    self.coverage(image, names) if self.concepts and with_concepts else None))
        return out
