"""The feature-level known answer's rule and scoring (issue 19), without the trained world."""

import pytest

from dxray.toyworld import feature_truth as ft
from dxray.toyworld import render
from dxray.toyworld.check import feature_agreement


@pytest.mark.parametrize(("o", "b", "scale", "expected"), [
    (3.0, 1.0, 4.0, "core"),        # object 3x the background
    (3.0, 2.0, 4.0, "core"),        # exactly RATIO (1.5) times: core
    (2.9, 2.0, 4.0, "ambiguous"),   # both respond: neither clearly
    (-0.5, 4.0, 5.0, "spurious"),   # the object lowers it, its background drives it
    (1.0, 1.5, 4.0, "spurious"),    # background 1.5x the object and >= 25% of the peak
    (0.1, 0.9, 4.0, "ambiguous"),   # background wins but is < 25% of the peak: too weak to call
    (0.9, 0.1, 4.0, "ambiguous"),   # the same for the object
    (0.0, 0.0, 0.0, "ambiguous"),   # a dead feature
])
def test_the_rule_and_its_margins(o, b, scale, expected):
    assert ft.RATIO == 1.5 and ft.MIN_RESPONSE == 0.25
    assert ft.call(o, b, scale) == expected


def test_object_scenes_put_the_class_object_on_every_neutral_background_in_both_textures():
    scenes = ft.object_scenes(2, per_background=4)
    assert len(scenes) == 12
    assert {s.background for s in scenes} == set(render.UNBIASED_BACKGROUNDS)
    assert {s.texture for s in scenes} == set(render.TEXTURES)
    assert {(s.colour, s.shape) for s in scenes} == {render.CLASSES[2]}
    assert scenes == ft.object_scenes(2, per_background=4)  # fixed: the truth does not move run to run
    assert all(render.render(s)[1].any() for s in scenes)


def test_feature_agreement_counts_pairs_splits_biased_and_leaves_ambiguous_out():
    def truth(c, f, label):
        return {"class_index": c, "feature_index": f, "truth": label, "planted_biased": c in render.BIASED,
                "object_response": 0.0, "background_response": 0.0, "scale": 1.0}

    def verdict(c, f, v):
        return {"class_index": c, "class_name": render.CLASS_NAMES[c], "feature_index": f, "feature_rank": 1,
                "template": "t", "verdict": v, "mean_object_fraction": 0.0}

    truths = [truth(0, 1, "spurious"), truth(0, 2, "spurious"), truth(3, 1, "core"), truth(3, 4, "ambiguous"),
              truth(4, 5, "core")]
    truths.append(truth(4, 6, "core"))
    verdicts = [verdict(0, 1, "spurious"), verdict(0, 2, "core"), verdict(3, 1, "core"), verdict(3, 4, "spurious"),
                verdict(4, 5, "spurious"), verdict(4, 6, "not explained")]  # not called spurious: right on a core truth
    got = feature_agreement(verdicts, truths)
    assert got["all"] == {"agreement": 3 / 5, "n_pairs": 5, "n_ambiguous": 1, "n_truth_spurious": 2,
                          "n_dxray_spurious": 2, "n_not_explained": 1}
    assert got["biased"]["agreement"] == 1 / 2 and got["biased"]["n_pairs"] == 2
    assert got["unbiased"]["agreement"] == 2 / 3 and got["unbiased"]["n_ambiguous"] == 1
    assert [p["correct"] for p in got["pairs"]] == [True, False, True, None, False, True]
