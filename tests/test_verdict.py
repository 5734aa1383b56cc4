import pyarrow as pa
import pytest

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
