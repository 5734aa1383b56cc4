"""`dxray compare` (issue 20) on real tiny-preset runs: the same classifier at two deltas (features compared one
by one), a classifier with other weights over fewer classes (class level only), a baseline on S3, and the
release gate's exit codes. The toy world's known answer (the planted-bias classifier against one trained without
the bias) is in tests/test_toyworld.py."""

import json
import shutil
from html.parser import HTMLParser

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from conftest import TINY_YAML
from test_cli import run_cli
from test_report import _wait
from test_report import browser as browser  # noqa: F401 - the real-Chromium fixture

ARGS = ["optimize.steps=2", "sample.k=3", "device=cpu", "targets.top_k=2"]


def _table(root, name):
    return ds.dataset(root / name, format="parquet").to_table().to_pylist()


def _one_run(out):
    [root] = [p for p in out.iterdir() if p.is_dir()]
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """One tiny run (2 classes x (class task + top-2 features)), finished."""
    out = tmp_path_factory.mktemp("compare") / "out"
    res = run_cli("explain", str(TINY_YAML), f"output={out}", *ARGS, cache=cache_dir)
    assert res.returncode == 0, res.stderr
    return _one_run(out)


def _copy_at(run, folder, delta, cache_dir):
    """A copy of the run re-decided at delta (its own folder: the same run id)."""
    copy = folder / run.name
    shutil.copytree(run, copy)
    res = run_cli("redecide", str(copy), "--delta", str(delta), cache=cache_dir)
    assert res.returncode == 0, res.stderr
    return copy


class _Gates(HTMLParser):
    def __init__(self):
        super().__init__()
        self.gates, self.rows = {}, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "p" and "data-condition" in a:
            self.gates[a["data-condition"]] = a["data-failed"]
        if tag == "tr" and "data-change" in a:
            self.rows.append(a)


def test_verdicts_that_turned_spurious_fail_the_gate_and_the_reverse_passes(tiny_run, tmp_path, cache_dir, browser):
    """At delta 0 every feature is core and no class is biased; at delta 1 a feature is core only with r = 1. So
    A (delta 0) -> B (delta 1) turns exactly B's spurious features into "new spurious" and B's classes with r < 1
    into "newly biased" (those the classifier reads as the class: explained): both gates fail and name those
    classes. B -> A is all improvement: both gates pass."""
    a = _copy_at(tiny_run, tmp_path / "a", 0.0, cache_dir)
    b = _copy_at(tiny_run, tmp_path / "b", 1.0, cache_dir)
    res = run_cli("compare", str(a), str(b), "--fail-on", "new-spurious", "--fail-on", "class-bias", cache=cache_dir)
    verdicts_a, verdicts_b = _table(a, "verdicts"), _table(b, "verdicts")
    classes_b = _table(b, "classes")
    assert {v["verdict"] for v in verdicts_a} == {"core"}
    turned = {(v["class_index"], v["feature_index"]) for v in verdicts_b if v["verdict"] == "spurious"}
    # a class whose explanation the classifier does not read as the class (mean p < 0.5) is "not explained": never
    # called biased, so never newly biased either
    newly_biased = {c["class_index"] for c in classes_b if c["class_object_fraction"] < 1.0 and c["explained"]}
    assert turned and newly_biased  # a random tiny segmenter covers less than the whole image
    assert all((c["class_prob"] >= 0.5) == c["explained"] for c in classes_b)
    assert res.returncode == 1, res.stderr
    rows = [r for r in _table(b, "comparison")]
    features = [r for r in rows if r["level"] == "feature"]
    assert {(r["class_index"], r["feature_index"]) for r in features} == {(v["class_index"], v["feature_index"])
                                                                        for v in verdicts_b}
    assert {(r["class_index"], r["feature_index"]) for r in features if r["change"] == "new spurious"} == turned
    assert all(r["features_comparable"] and r["run_a"] == a.name and r["run_id"] == b.name for r in rows)
    by_class = {r["class_index"]: r for r in rows if r["level"] == "class"}
    assert {c for c, r in by_class.items() if r["change"] == "newly biased"} == newly_biased
    for c, r in by_class.items():
        assert r["n_new_spurious"] == sum(1 for k, _ in turned if k == c) and r["n_new_core"] == 0
        assert r["r_a"] == r["r_b"] and r["r_change"] == 0.0 and (r["delta_a"], r["delta_b"]) == (0.0, 1.0)
    for f in features:  # the bootstrap intervals travel with both verdicts
        assert f["r_low_a"] <= f["r_a"] <= f["r_high_a"] and f["r_low_b"] == f["r_low_a"]
    assert f"fail: new-spurious in {len({c for c, _ in turned})} classes" in res.stderr
    assert f"fail: class-bias in {len(newly_biased)} classes" in res.stderr
    assert "same classifier" in res.stderr

    page = _Gates()
    page.feed((b / f"comparison-vs-{a.name}.html").read_text(encoding="utf-8"))
    assert page.gates == {"new-spurious": "true", "class-bias": "true"}
    assert {int(r["data-class"]) for r in page.rows if r["data-change"] == "newly biased"} == newly_biased

    # In Chromium: the page's one script sorts the classes table (its policy lets nothing else run), no errors.
    browser.get((b / f"comparison-vs-{a.name}.html").as_uri())
    assert _wait(browser, "return document.readyState === 'complete'")
    order = "return Array.from(document.querySelectorAll('#classes-table tbody tr')).map(r => Number(r.dataset.class))"
    before = browser.execute_script(order)
    browser.find_element("css selector", "#classes-table th").click()  # class, ascending -> descending
    assert _wait(browser, "return document.querySelector('#classes-table th').getAttribute('aria-sort') === 'descending'")
    assert browser.execute_script(order) == sorted(before, reverse=True) != before
    assert browser.execute_script("return document.querySelectorAll('#features-table tbody tr').length") == len(turned)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    back = run_cli("compare", str(b), str(a), "--fail-on", "new-spurious", "--fail-on", "class-bias", cache=cache_dir)
    assert back.returncode == 0, back.stderr
    assert "pass: no new-spurious" in back.stderr and "pass: no class-bias" in back.stderr
    rows = _table(a, "comparison")
    assert {r["class_index"] for r in rows if r["change"] == "no longer biased"} == newly_biased
    assert {(r["class_index"], r["feature_index"]) for r in rows if r["change"] == "new core"} == turned


def test_another_classifier_is_compared_per_class_only_on_the_classes_both_audited(tiny_run, tmp_path, cache_dir):
    """A classifier with other weights: feature 3 is another unit, so no feature rows; one class in common."""
    from dxray.models.tiny import tiny_classifier

    model, processor = tiny_classifier(seed=1)
    model.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    out = tmp_path / "out"
    res = run_cli("explain", str(TINY_YAML), f"output={out}", *ARGS, f"classifier.spec=hf:{tmp_path / 'other'}",
                  "targets.classes=[1]", cache=cache_dir)
    assert res.returncode == 0, res.stderr
    other = _one_run(out)
    res = run_cli("compare", str(tiny_run), str(other), "--fail-on", "new-spurious", cache=cache_dir)
    assert res.returncode in (0, 1), res.stderr
    assert "features are not comparable" in res.stderr and "RUN_B lacks 1 of RUN_A's classes" in res.stderr
    rows = _table(other, "comparison")
    assert [r["level"] for r in rows] == ["class"] and rows[0]["class_index"] == 1
    assert rows[0]["features_comparable"] is False
    [ca] = [c for c in _table(tiny_run, "classes") if c["class_index"] == 1]
    [cb] = _table(other, "classes")
    more = cb["n_spurious"] - ca["n_spurious"]
    assert (rows[0]["n_new_spurious"], rows[0]["n_new_core"]) == (max(more, 0), max(-more, 0))
    assert (res.returncode == 1) == (more > 0)


def test_a_baseline_on_s3_is_compared_with_a_local_run(tiny_run, s3, cache_dir):
    """RUN_A read from a real S3 server; no credential reaches the output or the page."""
    prefix = f"compare-{tiny_run.name}"
    dest = f"{s3.bucket}/{prefix}/{tiny_run.name}"
    pafs.copy_files(str(tiny_run), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=pafs.S3FileSystem(endpoint_override=s3.endpoint_url, scheme="http",
                                                             access_key=s3.access_key, secret_key=s3.secret_key))
    res = run_cli("compare", f"s3://{dest}", str(tiny_run), "--fail-on", "class-bias", cache=cache_dir)
    assert res.returncode == 0, res.stderr
    rows = _table(tiny_run, "comparison")
    assert rows and all(r["change"] == "same" and r["r_change"] == 0.0 for r in rows)
    page = (tiny_run / f"comparison-vs-{tiny_run.name}.html").read_text(encoding="utf-8")
    assert s3.secret_key not in res.stderr + res.stdout + page


@pytest.mark.parametrize("args, message", [
    (["missing-run", "missing-run"], "no run found at missing-run"),
    (["RUN", "RUN", "--fail-on", "spurious"], "--fail-on must be one of new-spurious, class-bias, got 'spurious'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, cache_dir, args, message):
    res = run_cli("compare", *[str(tiny_run) if a == "RUN" else a for a in args], cache=cache_dir)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_an_unfinished_run_is_refused(tiny_run, tmp_path, cache_dir):
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    (copy / "manifest.json").unlink()
    res = run_cli("compare", str(tiny_run), str(copy), cache=cache_dir)
    assert res.returncode == 2 and "RUN_B" in res.stderr and "has not finished" in res.stderr, res.stderr
    json.loads((tiny_run / "manifest.json").read_text())  # the other run is untouched


def test_a_feature_not_explained_in_run_b_is_neither_new_spurious_nor_new_core(tmp_path):
    """Issue 31: RUN_B's feature 4 turned spurious (the gate fails on it), feature 7's images no longer reach the
    plain pictures' activation ("not explained": no evidence, so it does not fail the gate), feature 9 stays core."""
    from dxray.compare import Side, compare
    from dxray.storage.sink import RunSink

    clf = {"spec": "toy:cnn", "weights": None, "kwargs": None, "final_layer": None}
    klass = {"class_index": 1, "class_name": "c1", "template": "{}", "class_object_fraction": 0.9, "n_features": 3,
             "delta": 0.3, "explained": True}

    def side(label, verdicts):
        rows = [{"class_index": 1, "class_name": "c1", "feature_index": f, "feature_rank": i + 1, "template": "{}",
                 "mean_object_fraction": 0.5, "mean_object_fraction_low": None, "mean_object_fraction_high": None,
                 "delta": 0.3, "verdict": v} for i, (f, v) in enumerate(verdicts.items())]
        return Side(label, RunSink(str(tmp_path), label), [klass | {"n_spurious": sum(v == "spurious" for v in
                                                                                         verdicts.values())}], rows, clf)

    got = compare(side("a", {4: "core", 7: "core", 9: "core"}),
                  side("b", {4: "spurious", 7: "not explained", 9: "core"}))
    assert [(r["feature_index"], r["verdict_b"], r["change"]) for r in got.feature_rows()] == [
        (4, "spurious", "new spurious"), (7, "not explained", "not explained"), (9, "core", "same")]
    [row] = got.class_rows()
    assert (row["n_new_spurious"], row["n_new_core"]) == (1, 0)
    assert [r["class_index"] for r in got.offenders("new-spurious")] == [1]  # the class row offends, once
