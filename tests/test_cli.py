"""The command line, end to end, as a user runs it (a real subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import ROOT, TINY_YAML
from PIL import Image

DXRAY = [sys.executable, "-m", "dxray"]


def run_cli(*args, cache, timeout=300):
    env = dict(os.environ, DXRAY_CACHE=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.run([*DXRAY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("cli") / "out"
    args = ["explain", str(TINY_YAML), f"output={out}", "optimize.steps=2", "sample.k=2", "device=cpu"]
    first = run_cli(*args, cache=cache_dir)
    assert first.returncode == 0, first.stderr
    second = run_cli(*args, cache=cache_dir)
    return out, first, second


def test_explain_writes_the_run_folder(demo_run):
    out, first, _ = demo_run
    [root] = [p for p in out.iterdir() if p.is_dir()]
    assert first.stdout.strip() == str(root)
    tasks = ds.dataset(root / "tasks", format="parquet").to_table().to_pylist()
    samples = ds.dataset(root / "samples", format="parquet").to_table().to_pylist()
    # tiny preset: 2 classes x (class task + top-1 feature task)
    assert sorted((t["kind"], t["class_index"]) for t in tasks) == [("class", 0), ("class", 1), ("feature", 0), ("feature", 1)]
    assert all(t["status"] == "ok" and t["steps"] == 2 and len(t["loss_curve"]) == 2 for t in tasks)
    feature = next(t for t in tasks if t["kind"] == "feature")
    assert feature["objective"] == f"class_ce({feature['class_index']}) - 1 * neuron('penultimate', {feature['feature_index']})"
    assert len(feature["prompt_embedding"]) == 1 and len(feature["prompt_embedding"][0]) == 32
    assert len(samples) == 4 * 2 and {s["seed"] for s in samples} == {0, 1}
    for s in samples:
        with Image.open(s["image_uri"]) as im:
            assert im.size == (64, 64)
        assert s["thumbnail"][:8] == b"\x89PNG\r\n\x1a\n" and 0 <= s["class_prob"] <= 1
    assert all(s["feature_activation"] is not None for s in samples if s["feature_index"] is not None)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["rows"] == {"tasks": 4, "samples": 8, "verdicts": 2, "classes": 2, "feature_ranking": 2,
                                "agreement": 0, "comparison": 0}  # written later, by `dxray agreement` / `compare`
    for s in samples:
        assert s["detection_prompt"] in ("goldfish.", "tabby cat.") and 0 <= s["object_fraction"] <= 1
        assert sum(s["mask_rle"]) == 64 * 64 and len(s["boxes"]) == len(s["box_scores"])
    verdicts = ds.dataset(root / "verdicts", format="parquet").to_table().to_pylist()
    ranking = ds.dataset(root / "feature_ranking", format="parquet").to_table().to_pylist()
    assert {(v["class_index"], v["feature_index"]) for v in verdicts} == {(r["class_index"], r["feature_index"]) for r in ranking}
    assert {v["verdict"] for v in verdicts} <= {"core", "spurious"} and all(r["source"] == "weights" for r in ranking)
    assert manifest["config"]["generator"]["model"] == "tiny" and manifest["versions"]["torch"]


def test_rerun_skips_committed_tasks(demo_run):
    out, _, second = demo_run
    assert second.returncode == 0, second.stderr
    assert "0 ok, 0 failed, 4 skipped" in second.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    assert ds.dataset(root / "tasks", format="parquet").count_rows() == 4  # nothing duplicated


@pytest.mark.parametrize("args, message", [
    (["explain", "missing.yaml"], "config file not found: missing.yaml"),
    (["explain", str(TINY_YAML), "optimize.lrr=1"], "unknown config key 'optimize.lrr'; valid keys: batch_tasks"),
    (["explain", str(TINY_YAML), "prompt.templates=[a texture]"], "must contain '{}' exactly once"),
    (["explain", str(TINY_YAML), "targets.classes=[5]"], "class index 5 out of range; the classifier has classes 0..1"),
    (["explain", str(TINY_YAML), "targets.neurons=[{layer: nope, unit: 0}]"], "unknown layer 'nope'; available: logits, penultimate"),
    (["explain", str(TINY_YAML), "optimize.steps=0"], "config field 'optimize.steps'"),
    (["explain", str(TINY_YAML), "optimize.lr=-0.1"], "config field 'optimize.lr'"),
    (["explain", str(TINY_YAML), "classifier.spec=foo"], "unknown classifier spec 'foo'"),
    (["explain", str(TINY_YAML), "generator.model=./no/such/folder"], "generator model folder not found"),
    (["explain", str(TINY_YAML), "verdict.delta=1.5"], "config field 'verdict.delta'"),
    (["explain", str(TINY_YAML), "segment.detector=./missing-dino"], "detector folder not found"),
    (["explain", str(TINY_YAML), "classifier.class_names=[' ', b]"], "empty class name"),
    (["explain", str(TINY_YAML), "targets.feature_source=images", "targets.feature_images.path=./no-images"],
     "feature image folder not found"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, args, message):
    cache = tmp_path / "cache"
    res = run_cli(*args, f"output={tmp_path / 'out'}", cache=cache, timeout=120)
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    assert not (cache / "tiny-lcm").exists()  # the generator was never built or loaded


def test_redecide_matches_a_fresh_run(demo_run, tmp_path, cache_dir):
    """Re-deciding with another delta from stored r equals a fresh run with that delta."""
    out, _, _ = demo_run
    [root] = [p for p in out.iterdir() if p.is_dir()]
    means = sorted(v["mean_object_fraction"] for v in ds.dataset(root / "verdicts").to_table().to_pylist())
    delta = round((means[0] + means[-1]) / 2, 4) if means[-1] > means[0] else 0.5
    res = run_cli("redecide", str(root), "--delta", str(delta), cache=cache_dir)
    assert res.returncode == 0, res.stderr
    fresh = tmp_path / "fresh"
    res = run_cli("explain", str(TINY_YAML), f"output={fresh}", "optimize.steps=2", "sample.k=2", "device=cpu",
                  f"verdict.delta={delta}", cache=cache_dir)
    assert res.returncode == 0, res.stderr
    for table in ("verdicts", "classes"):
        redecided = ds.dataset(root / table).to_table().to_pylist()
        fresh_rows = ds.dataset(fresh / root.name / table).to_table().to_pylist()
        assert redecided == fresh_rows and all(r["delta"] == pytest.approx(delta) for r in redecided)


def test_redecide_errors(tmp_path, cache_dir):
    res = run_cli("redecide", str(tmp_path / "nope"), "--delta", "0.3", cache=cache_dir)
    assert res.returncode == 2 and "error: no run found" in res.stderr and "Traceback" not in res.stderr


def _image_folder(root: Path, classes: list[int]) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    for c in classes:
        (root / str(c)).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return root


def test_image_folder_without_the_class_is_refused_before_any_work(tmp_path, cache_dir):
    folder = _image_folder(tmp_path / "imgs", [0])
    res = run_cli("explain", str(TINY_YAML), f"output={tmp_path / 'out'}", "targets.feature_source=images",
                  f"targets.feature_images.path={folder}", cache=cache_dir)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: feature image folder {folder} has no images for class 1" in res.stderr
    assert not (tmp_path / "out").exists()


def test_ranking_from_images_predicted_as_the_class(tmp_path, cache_dir):
    folder = _image_folder(tmp_path / "imgs", [0, 1])
    out = tmp_path / "out"
    res = run_cli("explain", str(TINY_YAML), f"output={out}", "targets.feature_source=images",
                  f"targets.feature_images.path={folder}", "targets.class_task=false", "optimize.steps=1",
                  "sample.k=1", "segment.enabled=false", "device=cpu", cache=cache_dir)
    assert res.returncode == 0, res.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    ranking = ds.dataset(root / "feature_ranking").to_table().to_pylist()
    assert {r["class_index"] for r in ranking} == {0, 1}
    images = sum(r["n_images"] for r in ranking)
    assert images == 6  # every image is assigned to the one class it is predicted as
    for r in ranking:
        assert r["source"] == "images-predicted" or r["source"] == f"weights (no images predicted as {r['class_index']})"
    assert not (root / "verdicts").exists()  # no segmentation, no verdicts
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["rows"]["verdicts"] == 0 and manifest["rows"]["feature_ranking"] == 2


def test_redecide_names_the_option_the_user_typed(demo_run, cache_dir):
    out, _, _ = demo_run
    [root] = [p for p in out.iterdir() if p.is_dir()]
    res = run_cli("redecide", str(root), "--delta", "1.5", cache=cache_dir)
    assert res.returncode == 2 and res.stderr.strip() == "error: --delta must be between 0 and 1, got 1.5"


@pytest.mark.parametrize("where", ["/proc/dxray-schemas", "FILE/sub"])
def test_an_unwritable_schema_folder_is_one_line(where, tmp_path, cache_dir):
    """/proc refuses new files even to root; a path under a file is refused by any OS."""
    (tmp_path / "FILE").write_text("a file")
    res = run_cli("schema", "--out", where.replace("FILE", str(tmp_path / "FILE")), cache=cache_dir)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("error: storage error:")


def test_ctrl_c_says_what_was_committed_and_the_same_command_resumes(tmp_path, cache_dir):
    import signal
    import time

    out = tmp_path / "out"
    args = ["explain", str(TINY_YAML), f"output={out}", "optimize.steps=15", "optimize.batch_tasks=1", "sample.k=1",
            "device=cpu"]
    env = dict(os.environ, DXRAY_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*DXRAY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/tasks/part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before a task was committed: give it more steps"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "re-running the same command resumes" in last
    committed = int(last.split("interrupted: ")[1].split()[0])
    assert committed == len(list(out.glob("*/tasks/part-*.parquet"))) >= 1
    again = run_cli(*args, cache=cache_dir)
    assert again.returncode == 0 and f"{committed} skipped" in again.stderr, again.stderr
