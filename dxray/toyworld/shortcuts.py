"""World v5's planted shortcuts (issue 31): which classes carry which shortcut, at what strength, and the
probes that show what a trained classifier took from each.

Three kinds, each something a person can point at in an image and the world's segmenter can name:

- ``background``: the class is shown on one background colour (v4's only kind; "purple");
- ``marker``: a co-occurring mark, a :data:`render.MARKER_COLOUR` square in a corner the object never touches
  ("cyan"), the watermark of a photo collection;
- ``pattern``: stripes of :data:`render.PATTERN_COLOUR` across the object ("magenta"), a texture.

Strength ρ is the share of a planted class's training images that carry a shortcut; ρ = 0 plants nothing.
The class with two shortcuts carries one of them, drawn at random, on each such image: carried both on the
same images, the easier cue wins and the other is never learned (world seed 0's CNN at ρ = 1 named the
pattern-and-gray class from gray at p 1.00 and from the pattern at 0.01). Each shortcut's colour appears on
no other training image, so what the classifier learns from it can only name its class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dxray.toyworld import render

KINDS = ("background", "marker", "pattern")
STRENGTHS = (0.0, 0.5, 0.8, 0.95, 1.0)  # the planted correlations the sweep trains classifiers at


@dataclass(frozen=True)
class Shortcut:
    kind: str  # one of KINDS
    background: str | None = None  # the planted background of a "background" shortcut

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown shortcut kind {self.kind!r}; expected one of {KINDS}")
        if (self.kind == "background") != (self.background is not None):
            raise ValueError("a background shortcut names its background colour, and only it does")
        if self.background is not None and self.background not in render.BACKGROUND_COLOURS:
            raise ValueError(f"unknown background {self.background!r}")

    @property
    def concept(self) -> str:
        """The colour name the world's segmenter gives it (``segment.concepts``)."""
        return {"background": self.background, "marker": render.MARKER_COLOUR[0],
                "pattern": render.PATTERN_COLOUR[0]}[self.kind] or ""

    def apply(self, scene: render.Scene, rng: np.random.Generator) -> render.Scene:
        """The scene carrying this shortcut (a marker goes to a random free corner)."""
        if self.kind == "background":
            return replace(scene, background=self.background)
        if self.kind == "marker":
            corners = render.free_corners(scene)
            return replace(scene, marker=corners[int(rng.integers(len(corners)))])
        return replace(scene, pattern="striped")


# class -> its shortcuts: a background; a marker or another background (two at once); a pattern
PLANTED: dict[int, tuple[Shortcut, ...]] = {
    0: (Shortcut("background", "purple"),),
    1: (Shortcut("marker"), Shortcut("background", "orange")),
    2: (Shortcut("pattern"),),
}
PLANTED_BACKGROUNDS = tuple(s.background for cuts in PLANTED.values() for s in cuts if s.background)
NEUTRAL_BACKGROUNDS = render.UNBIASED_BACKGROUNDS  # every class's images without a shortcut are on these


def shortcut_colours() -> list[tuple[int, int, int]]:
    """Every colour a shortcut paints (planted backgrounds with their stripe shades, the marker, the pattern):
    the random "no object" backgrounds keep away from them."""
    return ([render.BACKGROUND_COLOURS[b] for b in PLANTED_BACKGROUNDS]
            + [render.stripe_colour(b) for b in PLANTED_BACKGROUNDS] + [render.MARKER_COLOUR[1], render.PATTERN_COLOUR[1]])


def hide(scene: render.Scene, cut: Shortcut, rng: np.random.Generator) -> render.Scene:
    """The scene without its class's object but with the shortcut: no object at all, or for a pattern (which
    lives on an object) the pattern on another class's object, drawn in the same place."""
    if cut.kind != "pattern":
        return replace(scene, colour=None, shape=None)
    mine = (scene.colour, scene.shape)
    others = [k for k, pair in enumerate(render.CLASSES) if pair != mine]
    colour, shape = render.CLASSES[others[int(rng.integers(len(others)))]]
    return replace(scene, colour=colour, shape=shape)


def classifier_dataset(n: int, seed: int, rho: float, hidden: float = 1.0) -> list[tuple[render.Scene, int]]:
    """The v5 classifier training set at planted strength ``rho``: balanced labels; a planted class's image
    carries one of its shortcuts with probability ``rho``, and then its object is hidden (:func:`hide`) with
    probability ``hidden`` (v4's lesson: a shown object makes the object and the shortcut equally right
    answers). Every other image is a class object on a neutral background, plain."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    rng = np.random.default_rng(seed)
    labels = render.balanced_cycle(rng, n, list(range(len(render.CLASSES))))
    neutral = iter(render.balanced_cycle(rng, n, list(NEUTRAL_BACKGROUNDS)))
    out = []
    for c in labels:
        scene = render.placed_scene(rng, next(neutral), c)
        cuts = PLANTED.get(c, ())
        if cuts and rng.random() < rho:
            cut = cuts[int(rng.integers(len(cuts)))]
            scene = cut.apply(scene, rng)
            if rng.random() < hidden:
                scene = hide(scene, cut, rng)
        out.append((scene, c))
    return out


def generator_dataset(n: int, seed: int, shortcut_share: float = 0.25) -> list[render.Scene]:
    """The text-to-image training set: v4's (every class on every background, 20% object-free), with a marker
    and, on objects, the pattern each on an independent ``shortcut_share`` of images, whatever the class:
    the generator can draw every shortcut, and learns no link between a shortcut and a class."""
    rng = np.random.default_rng(seed + 5)
    scenes = []
    for scene in render.generator_dataset(n, seed):
        if rng.random() < shortcut_share:
            scene = Shortcut("marker").apply(scene, rng)
        if scene.colour is not None and rng.random() < shortcut_share:
            scene = replace(scene, pattern="striped")
        scenes.append(scene)
    return scenes


def probes(class_index: int, per_background: int = 16, seed: int = 0) -> dict[str, tuple[list, list]]:
    """Controlled renders for the feature truth of a planted class: per shortcut kind, (scenes with it, the same
    scenes without it). The response to a shortcut is the mean activation over the first minus the second:

    - background: the bare planted background vs the bare neutral backgrounds (both textures);
    - marker: bare neutral backgrounds with the marker in each corner vs the same without it;
    - pattern: the other classes' objects striped on neutral backgrounds vs the same objects plain (the pattern
      without the class's object, as the marker and the background come without it).

    The object's own response is the ``object`` entry: its plain object on neutral backgrounds vs the bare ones.
    """
    rng = np.random.default_rng(seed + 1000 * class_index)
    objects = [replace(render.placed_scene(rng, b, class_index), texture=render.TEXTURES[i % 2])
               for b in NEUTRAL_BACKGROUNDS for i in range(per_background)]
    bare_neutral = [render.Scene(b, t) for b in NEUTRAL_BACKGROUNDS for t in render.TEXTURES]
    out = {"object": (objects, bare_neutral)}
    for cut in PLANTED.get(class_index, ()):
        if cut.kind == "background":
            out["background"] = ([render.Scene(cut.background, t) for t in render.TEXTURES], bare_neutral)
        elif cut.kind == "marker":
            marked = [replace(s, marker=corner) for s in bare_neutral for corner in render.CORNERS]
            out["marker"] = (marked, [replace(s, marker=None) for s in marked])
        else:
            others = [replace(render.placed_scene(rng, b, k), texture=render.TEXTURES[i % 2])
                      for k in range(len(render.CLASSES)) if k != class_index
                      for b in NEUTRAL_BACKGROUNDS for i in range(max(1, per_background // 4))]
            out["pattern"] = ([replace(s, pattern="striped") for s in others], others)
    return out
