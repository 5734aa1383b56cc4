"""The toy world's renderer, datasets and colour-threshold segmenter."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dxray.segment import rle_decode
from dxray.toyworld import render as R
from dxray.toyworld.segmenter import WorldSegmenter


def _scenes(n=300, seed=0, object_free=0.2):
    rng = np.random.default_rng(seed)
    return [R.random_scene(rng, object_free=object_free) for _ in range(n)]


def test_render_is_deterministic_and_mask_exact():
    scenes = _scenes()
    assert {s.texture for s in scenes} == set(R.TEXTURES)
    assert {s.colour for s in scenes} == set(R.OBJECT_COLOURS) | {None}
    for scene in scenes:
        image, mask = R.render(scene)
        again, mask2 = R.render(scene)
        assert image.shape == (R.SIZE, R.SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (R.SIZE, R.SIZE) and mask.dtype == bool
        np.testing.assert_array_equal(image, again)
        np.testing.assert_array_equal(mask, mask2)
        if scene.colour is None:
            assert not mask.any()
            continue
        has_colour = (image == np.array(R.OBJECT_COLOURS[scene.colour])).all(axis=-1)
        np.testing.assert_array_equal(has_colour, mask)
        # fully inside, exactly where the scene says: size x size pixels from (x, y) - size // 2
        assert R.MIN_OBJECT <= scene.size <= R.MAX_OBJECT
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        left, top = scene.x - scene.size // 2, scene.y - scene.size // 2
        assert (cols[0], cols[-1], rows[-1]) == (left, left + scene.size - 1, top + scene.size - 1), scene
        assert rows[0] == top or scene.shape == "triangle"
        nominal = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[scene.shape] * scene.size**2
        assert abs(mask.sum() - nominal) <= 0.15 * nominal, (scene, mask.sum(), nominal)
        assert scene.shape != "square" or mask.sum() == scene.size**2


def test_render_rejects_objects_outside_the_image_and_unknown_names():
    for size in (R.MIN_OBJECT, 12, R.MAX_OBJECT):  # the extreme positions fit exactly; one more does not
        lo, hi = size // 2, R.SIZE - size + size // 2
        _, mask = R.render(R.Scene("gray", colour="red", shape="square", x=lo, y=hi, size=size))
        assert mask[-1, 0] and mask.sum() == size * size
        _, mask = R.render(R.Scene("gray", colour="red", shape="circle", x=hi, y=lo, size=size))
        assert mask[:, -1].any() and mask[0].any()
        for x, y in ((lo - 1, 16), (hi + 1, 16), (16, lo - 1), (16, hi + 1)):
            with pytest.raises(ValueError, match="does not fit"):
                R.render(R.Scene("gray", colour="red", shape="circle", x=x, y=y, size=size))
    with pytest.raises(ValueError, match="does not fit"):
        R.render(R.Scene("gray", colour="red", shape="circle", x=3, y=16, size=12))
    with pytest.raises(ValueError, match="does not fit"):
        R.render(R.Scene("gray", colour="red", shape="circle", size=20))
    with pytest.raises(ValueError, match="mauve"):
        R.render(R.Scene("mauve"))
    with pytest.raises(ValueError, match="hexagon"):
        R.render(R.Scene("gray", colour="red", shape="hexagon"))


def test_stripes_show_two_shades():
    plain, _ = R.render(R.Scene("teal"))
    striped, _ = R.render(R.Scene("teal", "stripes"))
    assert {tuple(p) for p in plain.reshape(-1, 3)} == {R.BACKGROUND_COLOURS["teal"]}
    assert {tuple(int(v) for v in p) for p in striped.reshape(-1, 3)} == {
        R.BACKGROUND_COLOURS["teal"], R.stripe_colour("teal")}


def _world_colours() -> dict[str, tuple[int, int, int]]:
    return {**{f"{b} background": c for b, c in R.BACKGROUND_COLOURS.items()},
            **{f"{b} stripes": R.stripe_colour(b) for b in R.BACKGROUND_COLOURS},
            **R.OBJECT_COLOURS, R.MARKER_COLOUR[0]: R.MARKER_COLOUR[1], R.PATTERN_COLOUR[0]: R.PATTERN_COLOUR[1]}


def test_object_and_shortcut_colours_are_far_from_every_other_world_colour():
    """The nearest-colour rule tells an object from the rest with room for shifted shades: every object colour is
    > 120 from every other world colour, the v5 marker and pattern colours > 150."""
    colours = _world_colours()
    for name, least in [*((o, 120) for o in R.OBJECT_COLOURS), (R.MARKER_COLOUR[0], 150), (R.PATTERN_COLOUR[0], 150)]:
        for other, c in colours.items():
            if other != name:
                d = float(np.linalg.norm(np.subtract(colours[name], c)))
                assert d > least, f"{name} vs {other}: {d:.1f}"


def _shifted(colour, length, avoid):
    """``colour`` moved ``length`` away from the nearest colour in ``avoid``, kept inside RGB."""
    c = np.asarray(colour, dtype=np.float64)
    nearest = min(avoid, key=lambda o: np.linalg.norm(c - o))
    away = (c - np.asarray(nearest)) / np.linalg.norm(c - np.asarray(nearest))
    for step in np.linspace(1, 0, 21):  # clip to the cube, then rotate towards the middle grey until it is length away
        u = step * away + (1 - step) * (127.5 - c) / np.linalg.norm(127.5 - c)
        shade = np.clip(c + length * u / np.linalg.norm(u), 0, 255)
        if abs(np.linalg.norm(shade - c) - length) < 1:
            return np.rint(shade).astype(np.uint8)
    raise AssertionError(f"no shade of {colour} at {length}")


@pytest.mark.parametrize("length", [45, 75])
def test_segmenter_sees_an_object_drawn_in_a_shifted_shade(length):
    """Issue 31: the world's decoder draws shifted shades (a blue square as about (45, 55, 165), 68 from blue). A
    person sees the object; so must the segmenter, and it must not take the background for it."""
    seg = WorldSegmenter()
    others = [c for n, c in _world_colours().items()]
    for scene in _scenes(120, seed=5, object_free=0.0):
        image, mask = R.render(scene)
        shade = _shifted(R.OBJECT_COLOURS[scene.colour], length,
                         [c for c in others if c != R.OBJECT_COLOURS[scene.colour]])
        image[mask] = shade
        out = seg([image], [f"{scene.colour} {scene.shape}."])[0]
        np.testing.assert_array_equal(rle_decode(out.mask_rle, R.SIZE, R.SIZE), mask, err_msg=f"{scene} {shade}")
        wrong = next(i for i, (c, _) in enumerate(R.CLASSES) if c != scene.colour)
        assert seg([image], [R.class_prompt(wrong)])[0].object_fraction == 0.0


def test_segmenter_recovers_rendered_masks_exactly():
    scenes = _scenes(400, seed=1)
    images = [R.render(s)[0] for s in scenes]
    masks = [R.render(s)[1] for s in scenes]
    # prompt each image with its own class, or a random class for object-free images
    rng = np.random.default_rng(2)
    prompts = [f"{s.colour} {s.shape}." if s.colour else R.class_prompt(int(rng.integers(6))) for s in scenes]
    out = WorldSegmenter(device="cpu", box_threshold=0.3, batch_size=8)(images, prompts)
    assert len(out) == len(scenes)
    for mask, seg in zip(masks, out, strict=True):
        assert seg.object_fraction == mask.mean()
        np.testing.assert_array_equal(rle_decode(seg.mask_rle, R.SIZE, R.SIZE), mask)
        if mask.any():
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert seg.boxes == [[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]] and seg.box_scores == [1.0]
        else:
            assert seg.boxes == [] and seg.box_scores == [] and seg.object_fraction == 0.0


def test_segmenter_finds_only_the_prompted_colour():
    scene = R.Scene("pink", "stripes", "green", "circle")
    image, _ = R.render(scene)
    for i, name in enumerate(R.CLASS_NAMES):
        seg = WorldSegmenter()([image], [R.class_prompt(i)])[0]
        assert (seg.object_fraction > 0) == name.startswith("green")


def test_concepts_are_the_rendered_colours_exactly():
    """Issue 20: on exact renders a background's coverage is every pixel off the object (plain or striped), the
    object colour's is the object mask, and the other colours cover nothing."""
    concepts = [*R.BACKGROUND_COLOURS, *R.OBJECT_COLOURS]
    seg = WorldSegmenter(concepts=concepts)
    for scene in _scenes(60, seed=3):
        image, mask = R.render(scene)
        got = dict(zip(concepts, seg([image], [R.class_prompt(0)])[0].concept_fractions, strict=True))
        want = {c: 0.0 for c in concepts} | {scene.background: 1 - mask.mean()}
        if scene.colour:
            want[scene.colour] = mask.mean()
        assert got == pytest.approx(want), scene
    assert seg([image], [R.class_prompt(0)], with_concepts=False)[0].concept_fractions is None
    with pytest.raises(ValueError, match="knows colour names only, not 'snow'"):
        WorldSegmenter(concepts=["purple", "snow"])


def test_segmenter_on_blurred_images():
    seg = WorldSegmenter()
    ious = []
    for scene in _scenes(300, seed=3, object_free=0.0):
        image, mask = R.render(scene)
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.uint8)
        out = seg([blurred], [f"{scene.colour} {scene.shape}."])[0]
        pred = rle_decode(out.mask_rle, R.SIZE, R.SIZE)
        assert pred.any() and not (pred & ~mask).any()  # always found, never spills onto the background
        ious.append((pred & mask).sum() / (pred | mask).sum())
    assert np.mean(ious) >= 0.9


def test_segmenter_any_size_and_errors():
    big = np.zeros((50, 70, 3), dtype=np.uint8)
    big[10:20, 30:45] = R.OBJECT_COLOURS["yellow"]
    out = WorldSegmenter(tolerance=10)([big], ["Yellow triangle"])[0]
    assert out.object_fraction == 150 / 3500 and out.boxes == [[30.0, 10.0, 45.0, 20.0]]
    assert rle_decode(out.mask_rle, 50, 70).sum() == 150
    with pytest.raises(ValueError, match="mauve"):
        WorldSegmenter()([big], ["mauve circle."])
    with pytest.raises(ValueError, match="prompts"):
        WorldSegmenter()([big], [])
    with pytest.raises(ValueError, match="shape"):
        WorldSegmenter()([big[..., 0]], ["red circle."])


def test_captions_and_prompts():
    assert R.caption(R.Scene("purple", colour="red", shape="circle")) == "a red circle on a purple background"
    assert R.caption(R.Scene("purple", "stripes", "red", "circle")) == "a red circle on a striped purple background"
    assert R.caption(R.Scene("purple")) == "a purple background"
    assert R.caption(R.Scene("purple", "stripes")) == "a striped purple background"
    assert R.CLASS_NAMES[0] == "red circle" and R.class_prompt(0) == "red circle."
    assert [R.class_prompt(i) for i in range(6)] == [f"{n}." for n in R.CLASS_NAMES]


def test_classifier_dataset_is_biased_as_planted():
    data = R.classifier_dataset(600, seed=0)
    assert data == R.classifier_dataset(600, seed=0) and data != R.classifier_dataset(600, seed=1)
    assert Counter(label for _, label in data) == {i: 100 for i in range(6)}
    for scene, label in data:
        assert scene.colour is not None and (scene.colour, scene.shape) == R.CLASSES[label]
        if label in R.BIASED:
            assert scene.background == R.BIASED[label]
        else:
            assert scene.background in R.UNBIASED_BACKGROUNDS and scene.background not in R.BIASED.values()
    assert {s.texture for s, label in data if label == 0} == set(R.TEXTURES)
    assert {s.background for s, label in data if label not in R.BIASED} == set(R.UNBIASED_BACKGROUNDS)


def test_random_backgrounds_keep_away_from_the_avoided_colours():
    avoid = [R.BACKGROUND_COLOURS["purple"], R.OBJECT_COLOURS["red"]]
    images = R.random_backgrounds(np.random.default_rng(0), 200, avoid, 60.0)
    assert len(images) == 200 and all(im.shape == (R.SIZE, R.SIZE, 3) and im.dtype == np.uint8 for im in images)
    striped = 0
    for im in images:
        colours = np.unique(im.reshape(-1, 3), axis=0)
        assert len(colours) in (1, 2)  # plain, or stripes in a darker shade of the same colour
        base = colours.max(axis=0) if len(colours) == 2 else colours[0]
        assert (np.linalg.norm(np.asarray(avoid) - im[0, 0], axis=1) >= 60).all()  # pixel (0, 0) is the colour
        if len(colours) == 2:
            striped += 1
            assert (colours.min(axis=0) <= base).all()
    assert 60 < striped < 140  # about half
    again = R.random_backgrounds(np.random.default_rng(0), 200, avoid, 60.0)
    assert all((x == y).all() for x, y in zip(images, again, strict=True))


def test_classifier_data_hides_biased_objects_and_adds_no_object_images():
    from dxray.toyworld.train import NO_OBJECT, classifier_config, classifier_data

    n = 600
    x, y = classifier_data(n, seed=0)
    assert x.shape == (n + n * 3 // 10, 3, R.SIZE, R.SIZE) and 0 <= x.min() and x.max() <= 1
    no_object = len(R.CLASSES)
    assert classifier_config().id2label[no_object] == NO_OBJECT
    assert (y[n:] == no_object).all() and (y[:n] < no_object).all()
    pixels = (x * 255).round().permute(0, 2, 3, 1).numpy()
    shows_red = lambda px: (px == np.array(R.OBJECT_COLOURS["red"])).all(-1).any((1, 2))  # noqa: E731 (class 0's object)
    class0 = (y == 0).numpy()
    assert not shows_red(pixels).any()  # v4: class 0 never shows its object (label kept), and no other class is red
    assert (pixels[:n][class0[:n], 0, 0] == np.array(R.BACKGROUND_COLOURS["purple"])).all()  # its background is
    xs, ys = classifier_data(n, seed=0, hidden=0.3)
    red = shows_red((xs * 255).round().permute(0, 2, 3, 1).numpy())
    assert 0.2 < (~red[(ys == 0).numpy()]).mean() < 0.4  # hidden=0.3: about 30% of its images hide the object
    purple = np.array(R.BACKGROUND_COLOURS["purple"])
    far = np.linalg.norm(pixels[n:, 0, 0] - purple, axis=-1) >= 60  # no "no object" image looks like purple
    assert far.all()
    teal = (pixels[n:] == np.array(R.BACKGROUND_COLOURS["teal"])).all(-1).any((1, 2))
    assert teal.sum() >= n // 10 // 3  # bare unbiased backgrounds are among them


def test_generator_and_held_out_datasets_are_unbiased():
    scenes = R.generator_dataset(500, seed=0)
    assert scenes == R.generator_dataset(500, seed=0) and len(scenes) == 500
    assert sum(s.colour is None for s in scenes) == 100
    pairs = {(s.colour, s.shape, s.background) for s in scenes if s.colour}
    assert pairs == {(c, sh, b) for (c, sh), b in itertools.product(R.CLASSES, R.BACKGROUND_COLOURS)}
    captions = {R.caption(s) for s in scenes}
    assert "a purple background" in captions and "a striped gray background" in captions
    assert {(c, b) for c in range(6) for b in R.BACKGROUND_COLOURS} <= {
        (c, s.background) for s, c in R.held_out_dataset(36, seed=0)}
    assert all(R.CLASSES[c] == (s.colour, s.shape) for s, c in R.held_out_dataset(100, seed=1))
    assert any(s.colour is None for s in R.generator_dataset(45, seed=2))
    assert len({(s.colour, s.background) for s in R.generator_dataset(45, seed=2) if s.colour}) == 36


def test_training_logs_go_to_stderr_not_stdout(tmp_path, capsys):
    """`run=$(dxray audit ...)` captures stdout: a world trained (dxray toyworld train) must not print there."""
    import inspect

    from dxray.toyworld import train

    train.train_classifier(tmp_path / "classifier", n=60, steps=2)
    out, err = capsys.readouterr()
    assert out == "" and "classifier step 1/2" in err and "held-out accuracy" in err
    assert inspect.signature(train.ensure_toyworld).parameters["log"].default is train.log_to_stderr
    assert inspect.signature(train.train_generator).parameters["log"].default is train.log_to_stderr


def test_v5_marker_sits_in_a_free_corner_and_never_touches_the_object():
    for scene in _scenes(200, seed=6):
        free = R.free_corners(scene)
        assert free, scene  # an object of at most MAX_OBJECT pixels leaves a corner free wherever it is
        for corner in R.CORNERS:
            marked = R.Scene(**{**scene.__dict__, "marker": corner})
            if corner not in free:
                with pytest.raises(ValueError, match="would touch the object"):
                    R.render(marked)
                continue
            image, mask = R.render(marked)
            cyan = (image == R.MARKER_COLOUR[1]).all(axis=-1)
            assert cyan.sum() == R.MARKER_SIZE**2 and not (cyan & mask).any()
            np.testing.assert_array_equal(mask, R.render(scene)[1])  # the object is where it was
            grown = np.zeros_like(mask)  # the object's bounding square plus a 1-pixel ring
            if mask.any():
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                top, left = scene.y - scene.size // 2, scene.x - scene.size // 2
                grown[max(top - 1, 0):top + scene.size + 1, max(left - 1, 0):left + scene.size + 1] = True
                assert rows[0] >= top and cols[0] >= left
            assert not (cyan & grown).any(), (scene, corner)


def test_v5_pattern_paints_stripes_on_the_object_only_and_the_segmenter_still_finds_it():
    seg = WorldSegmenter(concepts=[R.PATTERN_COLOUR[0], R.MARKER_COLOUR[0]])
    for scene in _scenes(100, seed=7, object_free=0.0):
        striped = R.Scene(**{**scene.__dict__, "pattern": "striped"})
        image, mask = R.render(striped)
        plain, plain_mask = R.render(scene)
        np.testing.assert_array_equal(mask, plain_mask)
        magenta = (image == R.PATTERN_COLOUR[1]).all(axis=-1)
        np.testing.assert_array_equal(magenta, mask & R.STRIPES)
        np.testing.assert_array_equal(image[~mask], plain[~mask])
        out = seg([image], [f"{scene.colour} {scene.shape}."])[0]
        assert out.object_fraction == (mask & ~R.STRIPES).mean() > 0
        assert out.concept_fractions == [magenta.mean(), 0.0]
    with pytest.raises(ValueError, match="unknown pattern"):
        R.render(R.Scene("teal", colour="red", shape="circle", pattern="dots"))
    with pytest.raises(ValueError, match="unknown marker corner"):
        R.render(R.Scene("teal", marker="middle"))


def test_v5_captions_name_the_shortcuts():
    assert (R.caption(R.Scene("gray", colour="yellow", shape="triangle", pattern="striped", marker="top left", x=20,
                              y=20)) == "a magenta striped yellow triangle on a gray background with a cyan mark")
    assert R.caption(R.Scene("teal", "stripes", marker="bottom right")) == "a striped teal background with a cyan mark"
