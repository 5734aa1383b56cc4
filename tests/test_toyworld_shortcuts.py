"""World v5's planted shortcuts (issue 31): kinds, strengths, the datasets and the probes, without training."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dxray.toyworld import render as R
from dxray.toyworld import shortcuts as S
from dxray.toyworld.segmenter import WorldSegmenter


def _carries(scene: R.Scene, cut: S.Shortcut) -> bool:
    return {"background": scene.background == cut.background, "marker": scene.marker is not None,
            "pattern": scene.pattern == "striped"}[cut.kind]


def test_the_plan_has_every_kind_and_a_class_with_two():
    kinds = Counter(cut.kind for cuts in S.PLANTED.values() for cut in cuts)
    assert set(kinds) == set(S.KINDS)
    assert any(len(cuts) >= 2 for cuts in S.PLANTED.values())
    assert not set(S.PLANTED_BACKGROUNDS) & set(S.NEUTRAL_BACKGROUNDS)
    with pytest.raises(ValueError, match="unknown shortcut kind"):
        S.Shortcut("watermark")
    with pytest.raises(ValueError, match="names its background"):
        S.Shortcut("marker", "purple")


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.95, 1.0])
def test_a_planted_class_carries_a_shortcut_on_a_share_rho_of_its_images_and_no_other_image_does(rho):
    data = S.classifier_dataset(1200, seed=3, rho=rho)
    assert data == S.classifier_dataset(1200, seed=3, rho=rho)
    assert Counter(label for _, label in data) == {c: 200 for c in range(len(R.CLASSES))}

    def near(share, p, n):
        return abs(share - p) <= 3 * np.sqrt(p * (1 - p) / n) + 1e-9

    for c in range(len(R.CLASSES)):
        scenes = [s for s, label in data if label == c]
        cuts = S.PLANTED.get(c, ())
        if cuts:
            assert near(np.mean([any(_carries(s, cut) for cut in cuts) for s in scenes]), rho, len(scenes)), c
            for cut in cuts:  # two shortcuts: each on half of the shortcut images, never both on one
                assert near(np.mean([_carries(s, cut) for s in scenes]), rho / len(cuts), len(scenes)), (c, cut)
            assert not any(all(_carries(s, cut) for cut in cuts) for s in scenes) or len(cuts) == 1
        others = [cut for k, cuts in S.PLANTED.items() if k != c for cut in cuts]
        assert not any(_carries(s, cut) for s in scenes for cut in others), c
        for s in scenes:
            carried = [cut for cut in cuts if _carries(s, cut)]
            if not carried:  # a plain class image: its object on a neutral background
                assert s.background in S.NEUTRAL_BACKGROUNDS and (s.colour, s.shape) == R.CLASSES[c]
                assert s.marker is None and s.pattern == "solid"
            elif carried[0].kind == "pattern":  # hidden=1: the pattern on another class's object
                assert s.colour is not None and (s.colour, s.shape) != R.CLASSES[c]
            else:  # hidden=1: the shortcut alone names the class
                assert s.colour is None
            R.render(s)  # every scene renders (a marker never touches its object)


def test_the_generator_sees_every_shortcut_on_every_class_and_links_none_to_a_class():
    scenes = S.generator_dataset(3000, seed=0)
    assert scenes == S.generator_dataset(3000, seed=0)
    for c, (colour, _) in enumerate(R.CLASSES):
        mine = [s for s in scenes if s.colour == colour]
        assert 0.15 < np.mean([s.marker is not None for s in mine]) < 0.35, c
        assert 0.15 < np.mean([s.pattern == "striped" for s in mine]) < 0.35, c
    assert any(s.marker is not None and s.colour is None for s in scenes)
    for s in scenes:
        R.render(s)


def test_the_probes_differ_only_by_the_shortcut_and_the_segmenter_names_each_kind():
    seg = WorldSegmenter(concepts=sorted({cut.concept for cuts in S.PLANTED.values() for cut in cuts}))
    for c in range(len(R.CLASSES)):
        probes = S.probes(c, per_background=4)
        assert set(probes) == {"object", *(cut.kind for cut in S.PLANTED.get(c, ()))}
        for kind, (with_it, without) in probes.items():
            if kind == "object":
                assert all(s.colour for s in with_it) and not any(s.colour for s in without)
                continue
            [cut] = [cut for cut in S.PLANTED[c] if cut.kind == kind]
            assert all(_carries(s, cut) for s in with_it) and not any(_carries(s, cut) for s in without)
            if kind != "background":  # the same scenes but for the shortcut
                assert [R.Scene(**{**s.__dict__, "marker": None, "pattern": "solid"}) for s in with_it] == without
            # the segmenter names the shortcut as its concept on every probe carrying it, and never without it
            named = [dict(zip(seg.concepts, seg([R.render(s)[0]], [R.class_prompt(c)])[0].concept_fractions,
                              strict=True))[cut.concept] for s in with_it]
            assert min(named) > 0
            unnamed = [dict(zip(seg.concepts, seg([R.render(s)[0]], [R.class_prompt(c)])[0].concept_fractions,
                                strict=True))[cut.concept] for s in without]
            assert max(unnamed) == 0
