import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dxray.errors import DxrayError
from dxray.storage.schemas import to_table
from dxray.verdict import decide


def _tables():
    tasks = [
        {"run_id": "r", "task_id": "c3", "kind": "class", "class_index": 3, "class_name": "bee", "template": "{}", "status": "ok"},
        {"run_id": "r", "task_id": "f3a", "kind": "feature", "class_index": 3, "class_name": "bee", "feature_index": 10,
         "feature_rank": 1, "template": "{}", "status": "ok"},
        {"run_id": "r", "task_id": "f3b", "kind": "feature", "class_index": 3, "class_name": "bee", "feature_index": 20,
         "feature_rank": 2, "template": "{}", "status": "ok"},
        {"run_id": "r", "task_id": "f3c", "kind": "feature", "class_index": 3, "class_name": "bee", "feature_index": 30,
         "feature_rank": 3, "template": "{}", "status": "error", "error": "boom"},
        {"run_id": "r", "task_id": "f5a", "kind": "feature", "class_index": 5, "class_name": "sled", "feature_index": 7,
         "feature_rank": 1, "template": "{}", "status": "ok"},
    ]
    r = {"c3": [0.0, 0.2], "f3a": [0.5, 0.7, 0.6], "f3b": [0.1, 0.0, 0.2], "f3c": [0.9], "f5a": [0.25, None, 0.35]}
    samples = [{"run_id": "r", "task_id": t, "seed": i, "object_fraction": v}
               for t, vals in r.items() for i, v in enumerate(vals)]
    return to_table("tasks", tasks), to_table("samples", samples)


def test_verdicts_from_hand_made_fractions():
    verdicts, classes = decide(*_tables(), delta=0.3, run_id="r")
    got = {(v["class_index"], v["feature_index"]): v for v in verdicts}
    assert set(got) == {(3, 10), (3, 20), (5, 7)}  # the failed task is left out
    assert got[(3, 10)]["mean_object_fraction"] == pytest.approx(0.6)
    assert got[(3, 10)]["std_object_fraction"] == pytest.approx((0.02 / 3) ** 0.5)
    assert got[(3, 10)]["verdict"] == "core" and got[(3, 20)]["verdict"] == "spurious"
    assert got[(5, 7)]["n_samples"] == 2 and got[(5, 7)]["mean_object_fraction"] == pytest.approx(0.3)
    assert got[(5, 7)]["verdict"] == "core"  # mean r >= delta is core, at the boundary too
    by_class = {c["class_index"]: c for c in classes}
    assert by_class[3]["class_object_fraction"] == pytest.approx(0.1)
    assert (by_class[3]["n_spurious"], by_class[3]["n_features"]) == (1, 2)
    assert by_class[5]["class_object_fraction"] is None and by_class[5]["n_spurious"] == 0
    to_table("verdicts", verdicts), to_table("classes", classes)  # rows fit the published schemas


def test_another_delta_changes_only_the_verdicts():
    tasks, samples = _tables()
    low, _ = decide(tasks, samples, 0.05, "r")
    high, classes = decide(tasks, samples, 0.65, "r")
    assert all(v["verdict"] == "core" for v in low)
    assert all(v["verdict"] == "spurious" for v in high) and {c["n_spurious"] for c in classes} == {2, 1}
    assert [v["mean_object_fraction"] for v in low] == [v["mean_object_fraction"] for v in high]


@pytest.mark.parametrize("delta", [-0.1, 1.5])
def test_delta_outside_unit_interval(delta):
    with pytest.raises(DxrayError, match=r"verdict.delta must be in \[0, 1\]"):
        decide(*_tables(), delta=delta, run_id="r")


def test_no_scored_samples_gives_no_verdicts():
    tasks, samples = _tables()
    empty = samples.set_column(samples.schema.get_field_index("object_fraction"), "object_fraction",
                               pa.nulls(samples.num_rows, pa.float32()))
    verdicts, classes = decide(tasks, empty, 0.3, "r")
    assert verdicts == [] and classes == []


# -- uncertainty (issue 19): bootstrap interval and confidence of every verdict -------------------------------------


def _pairs(values: dict[tuple[int, int], list[float | None]], template="{}"):
    """tasks + samples tables with one ok feature task per (class, feature) and its r values."""
    tasks, samples = [], []
    for (c, f), rs in values.items():
        tid = f"t{c}-{f}-{template}"
        tasks.append({"run_id": "r", "task_id": tid, "kind": "feature", "class_index": c, "class_name": f"c{c}",
                      "feature_index": f, "feature_rank": 1, "template": template, "status": "ok"})
        samples += [{"run_id": "r", "task_id": tid, "seed": i, "object_fraction": r} for i, r in enumerate(rs)]
    return tasks, samples


UNCERTAINTY = ("mean_object_fraction_low", "mean_object_fraction_high", "confidence", "low_confidence",
               "bootstrap_resamples", "bootstrap_seed")


def _uncertain(verdicts):
    return {(v["class_index"], v["feature_index"], v["template"]): tuple(v[k] for k in UNCERTAINTY) for v in verdicts}


SPREAD = {(1, 10): [0.0, 0.1, 0.5, 0.3, 0.2, 0.9, 0.4, 0.25], (1, 11): [0.6, 0.7, 0.2, 0.4],
          (2, 10): [0.05, 0.5, 0.1, 0.45, 0.3], (3, 30): [0.3, 0.31, 0.29]}


@settings(max_examples=15, deadline=None)
@given(st.randoms(use_true_random=False))
def test_bootstrap_is_reproducible_whatever_the_row_order(rnd):
    tasks, samples = _pairs(SPREAD)
    reference = _uncertain(decide(to_table("tasks", tasks), to_table("samples", samples), 0.3, "run-a")[0])
    rnd.shuffle(tasks)
    rnd.shuffle(samples)
    shuffled = decide(to_table("tasks", tasks), to_table("samples", samples), 0.3, "run-a")[0]
    assert _uncertain(shuffled) == reference


def test_bootstrap_seed_follows_the_run_and_the_pair():
    tasks, samples = (to_table(n, rows) for n, rows in zip(("tasks", "samples"), _pairs(SPREAD), strict=True))
    a, b = (_uncertain(decide(tasks, samples, 0.3, run)[0]) for run in ("run-a", "run-b"))
    assert a == _uncertain(decide(tasks, samples, 0.3, "run-a")[0])  # same run: same figures
    assert len({v[5] for v in a.values()}) == len(a)  # every pair has its own seed
    assert all(a[k][5] != b[k][5] for k in a)  # another run draws other resamples ...
    assert a[(1, 10, "{}")][:2] != b[(1, 10, "{}")][:2]  # ... so the interval's ends move (a little)
    assert all(a[k][4] == 1000 for k in a)


def test_interval_brackets_the_mean_and_shrinks_as_k_grows():
    widths = {}
    for k in (4, 16, 64, 300):  # 300 > 256: the wide-index path too
        tasks, samples = _pairs({(1, 10): [0.0, 1.0] * (k // 2)})
        (v,), _ = decide(to_table("tasks", tasks), to_table("samples", samples), 0.3, "run-k")
        assert v["mean_object_fraction"] == pytest.approx(0.5)
        assert v["mean_object_fraction_low"] < 0.5 < v["mean_object_fraction_high"]
        widths[k] = v["mean_object_fraction_high"] - v["mean_object_fraction_low"]
    assert widths[4] > widths[16] > widths[64] > widths[300]
    # the 95% interval of a mean of K fair coin flips is about 2 x 1.96 x 0.5 / sqrt(K) wide
    for k, w in widths.items():
        assert 1.5 < w * k ** 0.5 < 2.4, (k, w)


def test_confidence_is_the_share_of_resamples_that_agree():
    values = {(1, 10): [0.8, 0.9, 0.85, 0.95],  # far above delta: every resample says core
              (1, 11): [0.0, 0.05, 0.0, 0.02],  # far below: every resample says spurious
              (1, 12): [0.2, 0.4] * 4,  # mean 0.3 = delta: resamples split
              (1, 13): [0.7, None],  # one image: no spread to resample
              (2, 20): [0.1, 0.9, 0.1, 0.9, 0.1, 0.9]}  # mean 0.5, wide: core but not sure
    tasks, samples = _pairs(values)
    verdicts, classes = decide(to_table("tasks", tasks), to_table("samples", samples), 0.3, "run-c")
    got = {(v["class_index"], v["feature_index"]): v for v in verdicts}
    assert got[(1, 10)]["confidence"] == 1.0 and got[(1, 10)]["verdict"] == "core"
    assert got[(1, 11)]["confidence"] == 1.0 and got[(1, 11)]["verdict"] == "spurious"
    assert not got[(1, 10)]["low_confidence"] and not got[(1, 11)]["low_confidence"]
    # at the boundary the verdict is core and the resamples with mean >= 0.3 are (by symmetry) a bit over half
    assert got[(1, 12)]["verdict"] == "core" and 0.5 < got[(1, 12)]["confidence"] < 0.8 and got[(1, 12)]["low_confidence"]
    one = got[(1, 13)]
    assert one["n_samples"] == 1 and one["low_confidence"]
    assert one["confidence"] is None and one["mean_object_fraction_low"] is None and one["mean_object_fraction_high"] is None
    # mean of 6 draws of {0.1, 0.9} below 0.3 needs at most one 0.9: P = 7/64 ~ 0.11, so confidence ~ 0.89
    assert got[(2, 20)]["verdict"] == "core" and 0.85 < got[(2, 20)]["confidence"] < 0.93
    assert {c["class_index"]: c["n_low_confidence"] for c in classes} == {1: 2, 2: 0}
    to_table("verdicts", verdicts), to_table("classes", classes)  # the new columns fit the published schemas
    # another delta re-scores the same resamples: the interval stays, the confidence follows the verdict
    other, _ = decide(to_table("tasks", tasks), to_table("samples", samples), 0.5, "run-c")
    moved = {(v["class_index"], v["feature_index"]): v for v in other}
    assert moved[(1, 12)]["confidence"] == 1.0 and moved[(1, 12)]["verdict"] == "spurious"
    assert all(moved[k]["mean_object_fraction_low"] == got[k]["mean_object_fraction_low"] for k in got)


def test_without_uncertainty_the_columns_stay_null():
    tasks, samples = _pairs(SPREAD)
    verdicts, classes = decide(to_table("tasks", tasks), to_table("samples", samples), 0.3, "r", uncertainty=False)
    assert all(v.get(k) is None for v in verdicts for k in UNCERTAINTY)
    assert [v["verdict"] for v in verdicts] == [v["verdict"] for v in decide(
        to_table("tasks", tasks), to_table("samples", samples), 0.3, "r")[0]]
    assert all(c["n_low_confidence"] is None for c in classes)


@pytest.mark.parametrize(("probs", "explained", "call"), [
    ([0.9, 0.6], True, "biased"),  # mean 0.75: read as the class, the missing object is a finding
    ([0.5, 0.5], True, "biased"),  # the boundary counts as explained
    ([0.4, 0.3], False, "not explained"),  # mean 0.35: the optimisation found nothing, r says nothing
    ([None, None], None, "biased"),  # no probabilities (an older run): judged on r alone
])
def test_a_class_explanation_the_classifier_does_not_read_as_the_class_is_not_called_biased(probs, explained, call):
    from dxray.verdict import class_call

    tasks, samples = _tables()
    rows = samples.to_pylist()
    for row, p in zip([r for r in rows if r["task_id"] == "c3"], probs, strict=True):
        row["class_prob"] = p
    for row in rows:  # a feature's images read as the class do not count for the class explanation
        if row["task_id"] == "f3a":
            row["class_prob"] = 1.0
    _, classes = decide(tasks, to_table("samples", rows), delta=0.3, run_id="r")
    bee = next(c for c in classes if c["class_index"] == 3)
    assert bee["explained"] is explained
    assert bee["class_prob"] == (None if explained is None else pytest.approx(sum(probs) / 2))
    assert class_call(bee) == call
    assert class_call(bee | {"class_object_fraction": 0.3}) == ("not explained" if explained is False else "not biased")
    to_table("classes", classes)


@pytest.mark.parametrize(("acts_b", "explained", "call"), [
    ([3.0, 2.0, 2.5], True, "spurious"),  # mean 2.5 >= the plain pictures' 2.0: the object's absence is a finding
    ([2.0, 2.0, 2.0], True, "spurious"),  # reaching the control counts as explained
    ([1.0, 0.5, 1.5], False, "not explained"),  # mean 1.0 < 2.0: the optimisation found nothing, r says nothing
])
def test_a_feature_whose_images_do_not_reach_the_plain_pictures_is_not_explained(acts_b, explained, call):
    """Issue 31: each feature's images are compared with the class's segmenter-control images on the audited
    feature (tasks.control_activations); a feature's own index picks its control value, and a run without the
    control's activations keeps the r verdict."""
    tasks, samples = _tables()
    control = {"run_id": "r", "task_id": "k3", "kind": "control", "class_index": 3, "class_name": "bee",
               "template": "{}", "status": "ok", "control_activations": [0.0] * 10 + [9.0] + [0.0] * 9 + [2.0]}
    rows = samples.to_pylist() + [{"run_id": "r", "task_id": "k3", "seed": i, "object_fraction": 0.9} for i in range(2)]
    acts = {"f3a": [8.0, 9.5, 9.0], "f3b": acts_b, "f5a": [1.0, 1.0, 1.0]}
    seen = {}
    for row in rows:
        if row["task_id"] in acts:
            row["feature_activation"] = acts[row["task_id"]][seen.setdefault(row["task_id"], 0)]
            seen[row["task_id"]] += 1
    verdicts, classes = decide(to_table("tasks", [*tasks.to_pylist(), control]), to_table("samples", rows), 0.3, "r")
    got = {(v["class_index"], v["feature_index"]): v for v in verdicts}
    b = got[(3, 20)]
    assert b["mean_object_fraction"] == pytest.approx(0.1) and (b["explained"], b["verdict"]) == (explained, call)
    assert (b["mean_activation"], b["control_activation"]) == (pytest.approx(sum(acts_b) / 3), 2.0)
    a = got[(3, 10)]  # mean 8.83 below its own feature's 9.0: not explained though its r (0.6) says core
    assert (a["explained"], a["verdict"], a["control_activation"]) == (False, "not explained", 9.0)
    sled = got[(5, 7)]  # class 5 has no control: the r verdict stands
    assert (sled["control_activation"], sled["explained"], sled["verdict"]) == (None, None, "core")
    bee = next(c for c in classes if c["class_index"] == 3)
    assert (bee["n_spurious"], bee["n_not_explained"], bee["n_features"]) == (int(call == "spurious"), 2 - explained, 2)
    to_table("verdicts", verdicts), to_table("classes", classes)
