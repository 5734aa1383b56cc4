"""The toy world: coloured shapes on coloured (optionally striped) backgrounds, with exact masks.

World v5's shortcut kinds besides the background colour (issue 31): a co-occurring *marker* (a small
:data:`MARKER_COLOUR` square in a corner the object never touches) and a *pattern* on the object (stripes of
:data:`PATTERN_COLOUR` across it). Both are optional fields of :class:`Scene`, off by default, so a scene
without them renders exactly as in v4.

Six classes ("red circle", ...) on six backgrounds. The classifier's training set is biased on
purpose: classes 0-2 are only ever seen on one background each (:data:`BIASED`), the others only
on :data:`UNBIASED_BACKGROUNDS`. The text-to-image model's training set is unbiased. Colours are
chosen so that every object colour is > 120 (RGB Euclidean) from every other object colour, every
background colour and every stripe shade, so a colour threshold segments objects exactly.

Geometry: pixel (row j, column i) covers [i, i+1] x [j, j+1]; a pixel belongs to the object when
its centre lies inside the shape. The shape's bounding square is exactly ``size`` pixels: columns
x - size//2 .. x - size//2 + size - 1 (same for rows), so (x, y) is the centre pixel for odd sizes
and the centre corner for even ones. Circles are inscribed in it; triangles point up, base at the
bottom, spanning its full width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # image side, pixels
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (245, 0, 30), "blue": (25, 50, 230), "yellow": (230, 255, 20),
    "green": (30, 200, 30), "white": (250, 250, 250), "black": (0, 0, 0),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "purple": (130, 50, 155), "orange": (240, 130, 40), "gray": (128, 128, 128),
    "teal": (30, 145, 150), "pink": (240, 140, 185), "brown": (160, 125, 50),
}
# The v5 shortcuts' colours: each > 150 (RGB Euclidean) from every object colour, background and stripe shade.
MARKER_COLOUR = ("cyan", (0, 255, 255))
PATTERN_COLOUR = ("magenta", (255, 0, 255))
MARKER_SIZE = 5  # the marker's side, pixels; it keeps a 1-pixel gap from the object's bounding square
CORNERS = ("top left", "top right", "bottom left", "bottom right")
PATTERNS = ("solid", "striped")  # striped: the object's STRIPES pixels in PATTERN_COLOUR
STRIPE_SHADE = 0.6  # stripes are the background colour times this
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("plain", "stripes")  # stripes: 2-px diagonal stripes in the darker shade
CLASSES: list[tuple[str, str]] = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"),
                                  ("green", "circle"), ("white", "square"), ("black", "triangle")]
CLASS_NAMES = [f"{c} {s}" for c, s in CLASSES]
BIASED: dict[int, str] = {0: "purple", 1: "orange", 2: "gray"}  # class -> its only training background
UNBIASED_BACKGROUNDS = ("teal", "pink", "brown")
MIN_OBJECT, MAX_OBJECT = 9, 15
_J, _I = np.mgrid[0:SIZE, 0:SIZE]
STRIPES = ((_I + _J) // 2) % 2 == 1  # the pixels a striped background paints in the darker shade


@dataclass(frozen=True)
class Scene:
    background: str  # key of BACKGROUND_COLOURS
    texture: str = "plain"
    colour: str | None = None  # object colour (None = object-free image)
    shape: str | None = None
    x: int = 16  # object centre, pixels (see the module doc for odd sizes)
    y: int = 16
    size: int = 12  # object side / diameter in pixels, MIN_OBJECT..MAX_OBJECT
    marker: str | None = None  # v5: the corner (one of CORNERS) of a MARKER_COLOUR square, or None
    pattern: str = "solid"  # v5: "striped" paints the object's STRIPES pixels in PATTERN_COLOUR


def stripe_colour(background: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.rint(np.array(BACKGROUND_COLOURS[background]) * STRIPE_SHADE))


def _fits(x: int, y: int, size: int) -> bool:
    lo, hi = size // 2, SIZE - size + size // 2
    return MIN_OBJECT <= size <= MAX_OBJECT and lo <= x <= hi and lo <= y <= hi


def _object_mask(shape: str, x: int, y: int, size: int) -> np.ndarray:
    v, u = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres (row, column)
    h = size / 2
    x, y = x - size // 2 + h, y - size // 2 + h  # centre of the bounding square
    if shape == "circle":
        return (u - x) ** 2 + (v - y) ** 2 < h * h
    if shape == "square":
        return (np.abs(u - x) < h) & (np.abs(v - y) < h)
    if shape == "triangle":  # apex up, base = height = size
        top = y - h
        return (v > top) & (v < y + h) & (np.abs(u - x) < (v - top) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def marker_box(corner: str) -> tuple[slice, slice]:
    """(rows, columns) of the marker square in a corner."""
    if corner not in CORNERS:
        raise ValueError(f"unknown marker corner {corner!r}; expected one of {CORNERS}")
    rows = slice(0, MARKER_SIZE) if corner.startswith("top") else slice(SIZE - MARKER_SIZE, SIZE)
    cols = slice(0, MARKER_SIZE) if corner.endswith("left") else slice(SIZE - MARKER_SIZE, SIZE)
    return rows, cols


def free_corners(scene: Scene) -> list[str]:
    """The corners whose marker keeps a 1-pixel gap from the object's bounding square (all of them object-free)."""
    if scene.colour is None:
        return list(CORNERS)
    left, top = scene.x - scene.size // 2, scene.y - scene.size // 2
    out = []
    for corner in CORNERS:
        rows, cols = marker_box(corner)
        apart = (cols.stop < left or cols.start > left + scene.size) or (rows.stop < top or rows.start > top + scene.size)
        if apart:
            out.append(corner)
    return out


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(SIZE x SIZE x 3 uint8 image, SIZE x SIZE bool exact object mask); hard edges, no anti-aliasing."""
    if scene.background not in BACKGROUND_COLOURS:
        raise ValueError(f"unknown background {scene.background!r}")
    if scene.texture not in TEXTURES:
        raise ValueError(f"unknown texture {scene.texture!r}; expected one of {TEXTURES}")
    if scene.pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {scene.pattern!r}; expected one of {PATTERNS}")
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND_COLOURS[scene.background]
    if scene.texture == "stripes":
        image[STRIPES] = stripe_colour(scene.background)
    if scene.marker is not None:
        marker_box(scene.marker)  # an unknown corner is an error of its own
        if scene.marker not in free_corners(scene):
            raise ValueError(f"a marker in the {scene.marker} corner would touch the object of {scene}")
        image[marker_box(scene.marker)] = MARKER_COLOUR[1]
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if scene.colour is None:
        return image, mask
    if scene.colour not in OBJECT_COLOURS:
        raise ValueError(f"unknown object colour {scene.colour!r}")
    if not _fits(scene.x, scene.y, scene.size):
        raise ValueError(f"object of size {scene.size} at ({scene.x}, {scene.y}) does not fit the image")
    mask = _object_mask(scene.shape, scene.x, scene.y, scene.size)
    image[mask] = OBJECT_COLOURS[scene.colour]
    if scene.pattern == "striped":
        image[mask & STRIPES] = PATTERN_COLOUR[1]
    return image, mask


def caption(scene: Scene) -> str:
    """"a red circle on a striped purple background"; object-free: "a purple background"; v5's shortcuts add
    words: "a magenta striped yellow triangle on a gray background with a cyan mark"."""
    background = ("striped " if scene.texture == "stripes" else "") + f"{scene.background} background"
    mark = f" with a {MARKER_COLOUR[0]} mark" if scene.marker is not None else ""
    if scene.colour is None:
        return f"a {background}{mark}"
    pattern = f"{PATTERN_COLOUR[0]} striped " if scene.pattern == "striped" else ""
    return f"a {pattern}{scene.colour} {scene.shape} on a {background}{mark}"


def placed_scene(rng: np.random.Generator, background: str, cls: int | None) -> Scene:
    """A scene on ``background`` with class ``cls``'s object (None: none) of random texture, size and place."""
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    if cls is None:
        return Scene(background, texture)
    size = int(rng.integers(MIN_OBJECT, MAX_OBJECT + 1))
    x, y = (int(v) for v in rng.integers(size // 2, SIZE - size + size // 2 + 1, size=2))
    colour, shape = CLASSES[cls]
    return Scene(background, texture, colour, shape, x, y, size)


def random_scene(rng: np.random.Generator, *, object_free: float = 0.2, backgrounds=None,
                 classes=None) -> Scene:
    """A uniformly random scene; ``backgrounds`` (names) / ``classes`` (indices) restrict the choices."""
    backgrounds = list(BACKGROUND_COLOURS) if backgrounds is None else list(backgrounds)
    classes = list(range(len(CLASSES))) if classes is None else list(classes)
    background = backgrounds[rng.integers(len(backgrounds))]
    cls = None if rng.random() < object_free else classes[rng.integers(len(classes))]
    return placed_scene(rng, background, cls)


def balanced_cycle(rng: np.random.Generator, n: int, options: list) -> list:
    """n items running through freshly shuffled copies of ``options``: balanced, every option once per pass."""
    out: list = []
    while len(out) < n:
        out += [options[k] for k in rng.permutation(len(options))]
    return out[:n]


_PAIRS = [(c, b) for c in range(len(CLASSES)) for b in BACKGROUND_COLOURS]


def generator_dataset(n: int, seed: int) -> list[Scene]:
    """The text-to-image training set: every class on every background, 20% object-free.

    Covers every (class, background) pair once n >= 45 (36 pairs in the object-bearing 80%).
    """
    rng = np.random.default_rng(seed)
    n_free = n // 5
    pairs = balanced_cycle(rng, n - n_free, _PAIRS)
    free = balanced_cycle(rng, n_free, list(BACKGROUND_COLOURS))
    scenes = [placed_scene(rng, b, c) for c, b in pairs] + [placed_scene(rng, b, None) for b in free]
    return [scenes[k] for k in rng.permutation(len(scenes))]


def classifier_dataset(n: int, seed: int, biased: bool = True) -> list[tuple[Scene, int]]:
    """The biased classifier training set: balanced labels; classes in BIASED only on their background.
    ``biased=False``: every class on every background (the unbiased control classifier of ``dxray compare``)."""
    rng = np.random.default_rng(seed)
    labels = balanced_cycle(rng, n, list(range(len(CLASSES))))
    unbiased = iter(balanced_cycle(rng, n, list(UNBIASED_BACKGROUNDS if biased else BACKGROUND_COLOURS)))
    return [(placed_scene(rng, BIASED[c] if biased and c in BIASED else next(unbiased), c), c) for c in labels]


def random_backgrounds(rng: np.random.Generator, n: int, avoid, min_distance: float) -> list[np.ndarray]:
    """n object-free images of random colours, each >= ``min_distance`` (RGB) from every colour in ``avoid``.

    Half are striped like the world's backgrounds, in a random darker shade (0.4-0.9 of the colour).
    """
    avoid = np.asarray(list(avoid), dtype=np.float64).reshape(-1, 3)
    out: list[np.ndarray] = []
    while len(out) < n:
        colour = rng.integers(0, 256, 3)
        if len(avoid) and np.linalg.norm(avoid - colour, axis=1).min() < min_distance:
            continue
        image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
        image[:] = colour
        if rng.random() < 0.5:
            image[STRIPES] = np.rint(colour * rng.uniform(0.4, 0.9)).astype(np.uint8)
        out.append(image)
    return out


def held_out_dataset(n: int, seed: int) -> list[tuple[Scene, int]]:
    """The unbiased test set: every class on every background, balanced."""
    rng = np.random.default_rng(seed)
    return [(placed_scene(rng, b, c), c) for c, b in balanced_cycle(rng, n, _PAIRS)]


def class_prompt(class_index: int | str) -> str:
    """Detection prompt for a class index (or name): "red circle."."""
    name = class_index if isinstance(class_index, str) else CLASS_NAMES[class_index]
    return name.strip().lower().rstrip(".") + "."


def vae_images(scenes):
    """Renders as the world's VAE takes them: an N x 3 x H x W float tensor in [-1, 1]."""
    import torch

    arr = np.stack([render(s)[0] for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def unit_images(scenes):
    """Renders as the classifier takes them: N x 3 x H x W in [0, 1]."""
    return (vae_images(scenes) + 1) / 2
