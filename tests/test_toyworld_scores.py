"""Known-answer figures that do not flatter (issue 31): precision, recall, F1, FPR and AUROC of the spurious call
with cluster-bootstrap intervals, beside baselines scored the same way."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dxray.toyworld import scores


def _calls(truth, called, score=None, units=None):
    return [{"unit": (units or range(len(truth)))[i], "truth": t, "called": c,
             "score": None if score is None else score[i]} for i, (t, c) in enumerate(zip(truth, called, strict=True))]


def test_point_figures_of_a_small_confusion():
    # truth spurious: pairs 0, 1; called spurious: 0, 2 -> tp 1 (0), fn 1 (1), fp 1 (2), tn 2 (3, 4)
    calls = _calls([True, True, False, False, False], [True, False, True, False, False],
                   score=[0.0, 0.4, 0.1, 0.9, 0.5])
    m = scores.metrics(calls)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 2)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["false_positive_rate"] == pytest.approx(1 / 3)
    # core pairs' r (0.1, 0.9, 0.5) above the spurious pairs' (0.0, 0.4): 5 of 6 (core, spurious) pairs ordered
    assert m["auroc"] == pytest.approx(5 / 6)


def test_everything_core_scores_zero_f1_however_accurate_it_looks():
    calls = _calls([True] + [False] * 9, [True] + [False] * 9)  # dxray right everywhere; 1 spurious pair of 10
    base = scores.baselines(calls)["everything_core"]
    m = scores.metrics(base)
    assert sum(not c["called"] == c["truth"] for c in base) == 1  # "90% accurate"...
    assert m["f1"] == 0 and m["recall"] == 0 and m["false_positive_rate"] == 0 and m["precision"] is None
    assert scores.metrics(calls)["f1"] == 1


def test_shuffled_keeps_the_number_of_calls_and_control_needs_every_pair():
    calls = _calls([True, False, True, False, False, True], [True, True, False, False, False, True])
    out = scores.baselines(calls, control=lambda c: c["unit"] % 2 == 0)
    assert sum(c["called"] for c in out["shuffled"]) == sum(c["called"] for c in calls)
    assert [c["called"] for c in out["control_alone"]] == [True, False, True, False, True, False]
    assert "control_alone" not in scores.baselines(calls, control=lambda c: None if c["unit"] == 3 else True)
    assert "control_alone" not in scores.baselines(calls)


def test_intervals_resample_units_and_are_reproducible():
    # 12 classes of 4 pairs; dxray misses one spurious pair in every third class.
    truth, called, units = [], [], []
    for u in range(12):
        for j in range(4):
            truth.append(j < 2)
            called.append(j < 2 and not (u % 3 == 0 and j == 1))
            units.append(u)
    calls = _calls(truth, called, units=units)
    a, b = scores.with_intervals(calls, seed=1), scores.with_intervals(calls, seed=1)
    assert a == b
    lo, hi = a["recall_ci"]
    assert lo < a["recall"] < hi <= 1  # 20 / 24 recalled, uncertain across classes
    assert a["precision_ci"] == [1.0, 1.0]  # no false positive in any resample
    assert a["n_units"] == 12 and a["n"] == 48
    one_unit = scores.with_intervals(_calls([True, False], [True, False], units=[0, 0]))
    assert one_unit["recall"] == 1 and one_unit["recall_ci"] is None  # one unit: nothing to resample


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_f1_is_the_harmonic_mean_of_precision_and_recall(items):
    m = scores.metrics(_calls([t for t, _ in items], [c for _, c in items]))
    if m["precision"] and m["recall"]:
        assert m["f1"] == pytest.approx(2 * m["precision"] * m["recall"] / (m["precision"] + m["recall"]))
    elif m["tp"] == 0 and (m["fp"] or m["fn"]):
        assert m["f1"] == 0


def test_describe_names_every_figure_with_its_interval():
    calls = _calls([True, False] * 6, [True, False] * 5 + [False, False], score=[0.1, 0.8] * 6, units=list(range(12)))
    line = scores.describe("dxray", scores.with_intervals(calls))
    assert line.startswith("dxray: precision 1.00 [1.00, 1.00], recall 0.83 [")
    assert "F1 0.91 [" in line and "FPR 0.00 [0.00, 0.00]" in line and "AUROC of r 1.00" in line
    assert line.endswith("(12 pairs, 12 units)")
