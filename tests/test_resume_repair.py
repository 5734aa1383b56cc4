"""The repairs dxray advises work when followed to the letter (issue 30): a read error names a damaged part and
says "delete it and re-run the run's command"; doing exactly that leaves the run whole again (every task, k
samples each, the same verdicts and classes). A task whose samples are gone is not committed: the resume does it
again. And a run is never finished with fewer samples than its committed tasks hold."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_YAML
from test_run_readers import _one_error_line
from typer.testing import CliRunner

from dxray.errors import DxrayError
from dxray.pipeline.ranking import choose_ranker
from dxray.storage.sink import RunSink

K = 2  # sample.k of the runs below


def _overrides(out, cache_dir) -> list[str]:
    return [f"output={out}", f"cache_dir={cache_dir}", "optimize.steps=1", f"sample.k={K}", "device=cpu"]


def _cli(*args):
    from dxray.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _run_command(out, cache_dir):
    """The run's command, as its user typed it (the same config and overrides each time)."""
    return _cli("explain", TINY_YAML, *_overrides(out, cache_dir), "-q")


def _state(root: Path) -> dict:
    """What a whole run holds, read the way dxray reads it: its tasks, samples per task, verdicts and classes."""
    sink = RunSink(str(root.parent), root.name)
    tasks = sink.read_table("tasks").to_pylist()
    samples = sink.read_table("samples", columns=["task_id", "seed", "class_prob", "object_fraction"]).to_pylist()
    return {
        "tasks": sorted((t["task_id"], t["status"], t["kind"], t["class_index"], t["feature_index"]) for t in tasks),
        "samples": sorted((s["task_id"], s["seed"], s["class_prob"], s["object_fraction"]) for s in samples),
        "verdicts": sink.read_table("verdicts").to_pylist(),
        "classes": sink.read_table("classes").to_pylist(),
    }


def _assert_whole(root: Path, before: dict) -> None:
    """The run holds what the original did: the same tasks, K samples each with the same scores, the same verdicts.
    Scores to float precision: a task redone alone (or on a Ray actor, with other torch thread counts) is batched
    otherwise than the first time, which moves a probability in its 8th digit."""
    now = _state(root)
    assert now["tasks"] == before["tasks"]
    assert [s[:2] for s in now["samples"]] == [s[:2] for s in before["samples"]]
    assert [x for s in now["samples"] for x in s[2:]] == pytest.approx([x for s in before["samples"] for x in s[2:]],
                                                                       abs=1e-4)
    key = ("class_index", "feature_index", "template", "n_samples", "verdict")
    assert [[v[k] for k in key] for v in now["verdicts"]] == [[v[k] for k in key] for v in before["verdicts"]]
    assert [v["mean_object_fraction"] for v in now["verdicts"]] == \
           pytest.approx([v["mean_object_fraction"] for v in before["verdicts"]], abs=1e-4)
    assert [[v[k] for k in ("class_index", "n_features", "n_spurious")] for v in now["classes"]] == \
           [[v[k] for k in ("class_index", "n_features", "n_spurious")] for v in before["classes"]]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("repair") / "out"
    res = _run_command(out, cache_dir)
    assert res.exit_code == 0, res.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    state = _state(root)
    assert len(state["tasks"]) == 4 and {t[1] for t in state["tasks"]} == {"ok"}
    assert len(state["samples"]) == 4 * K and state["verdicts"] and state["classes"]
    return root, state


def _copy(base_run, tmp_path) -> Path:
    root = tmp_path / "out" / base_run[0].name
    shutil.copytree(base_run[0], root)
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_utf8(path: Path) -> None:
    """A flipped byte in the first task id: a readable Parquet file whose text is not UTF-8."""
    table = pq.read_table(path)
    values = [v.encode() for v in table["task_id"].to_pylist()]
    values[0] = b"\xff" + values[0][1:]
    offsets = np.cumsum([0, *map(len, values)], dtype=np.int32)
    column = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                                pa.py_buffer(b"".join(values))])
    i = table.schema.get_field_index("task_id")
    pq.write_table(table.set_column(i, table.schema.field(i), column), path)


DAMAGE = {"truncated": (_truncate, "is not a readable Parquet file"),
          "not UTF-8": (_not_utf8, "holds text that is not UTF-8")}


@pytest.mark.parametrize("table, damage", [("samples", "truncated"), ("tasks", "truncated"), ("verdicts", "truncated"),
                                           ("classes", "truncated"), ("samples", "not UTF-8"), ("tasks", "not UTF-8")])
def test_the_advised_repair_of_a_damaged_part_makes_the_run_whole(table, damage, base_run, tmp_path, cache_dir):
    root = _copy(base_run, tmp_path)
    [part] = (root / table).glob("*.parquet")  # compacted at finish: one file per table
    spoil, says = DAMAGE[damage]
    spoil(part)
    readers = [["report", root, "-o", tmp_path / "r.html"]]
    if table in ("tasks", "samples"):  # what a resume reads (it writes verdicts and classes anew)
        readers.append(["explain", TINY_YAML, *_overrides(tmp_path / "out", cache_dir), "-q"])
    for command in readers:
        line = _one_error_line(_cli(*command))
        # The advice, followed literally: delete the part the line names, re-run the run's command.
        named = re.search(rf"run \S+: (\S+) {says} .*; delete it and re-run the run's command", line)
        assert named and named[1] == f"{table}/{part.name}", line
    (root / named[1]).unlink()
    res = _run_command(tmp_path / "out", cache_dir)
    assert res.exit_code == 0, res.stderr
    _assert_whole(root, base_run[1])  # every task, K samples each, the same verdicts and classes
    assert json.loads((root / "manifest.json").read_text())["rows"]["samples"] == 4 * K
    assert _cli("report", root, "-o", tmp_path / "r.html").exit_code == 0


def test_a_task_whose_samples_are_gone_is_done_again(base_run, tmp_path, cache_dir, caplog):
    """The samples of every task deleted (the folder, not one part): the resume does all of them again and says so,
    rather than skipping them as done and deciding from no samples."""
    root = _copy(base_run, tmp_path)
    shutil.rmtree(root / "samples")
    res = _run_command(tmp_path / "out", cache_dir)
    assert res.exit_code == 0, res.stderr
    assert "4 task(s) marked done have fewer than sample.k=2 samples" in caplog.text
    assert "4 ok, 0 failed, 0 skipped" in res.stderr and f"{4 * K} samples" in res.stderr
    _assert_whole(root, base_run[1])
    again = _run_command(tmp_path / "out", cache_dir)  # whole now: nothing left to do
    assert again.exit_code == 0 and "0 ok, 0 failed, 4 skipped" in again.stderr, again.stderr


def test_a_run_is_not_finished_with_fewer_samples_than_its_committed_tasks(base_run, tmp_path, cache_dir):
    """Samples lost while a run works (after its plan, before its finish): the finish refuses in one line and
    writes no verdicts, classes or manifest from them; re-running the command, as the line says, repairs it."""
    from dxray import models
    from dxray.config import load_config
    from dxray.pipeline.job import AuditJob

    root = _copy(base_run, tmp_path)
    cfg = load_config(TINY_YAML, _overrides(tmp_path / "out", cache_dir))
    decided = {rel: (root / rel).read_bytes() for rel in ("verdicts/part-all.parquet", "classes/part-all.parquet",
                                                          "manifest.json")}
    job = AuditJob(cfg, "explain")
    job.preflight()
    assert job.prepare(choose_ranker(cfg.targets, lambda: models.load_classifier(cfg.classifier, device="cpu", cache_dir=cfg.cache_dir))) == []
    [lost] = (root / "samples").glob("*.parquet")
    lost.unlink()
    with pytest.raises(DxrayError) as err:
        job.finish("cpu")
    line = str(err.value)
    assert "\n" not in line and "4 committed task(s) have fewer than sample.k=2 samples" in line
    assert "re-run the run's command" in line
    assert {rel: (root / rel).read_bytes() for rel in decided} == decided  # left as they were
    res = _run_command(tmp_path / "out", cache_dir)
    assert res.exit_code == 0, res.stderr
    _assert_whole(root, base_run[1])


def test_an_unfinished_run_is_finished_by_its_command_as_advised(base_run, tmp_path, cache_dir):
    """`redecide` on a run with no readable manifest says "re-run its command to finish it": that works."""
    root = _copy(base_run, tmp_path)
    (root / "manifest.json").write_text("{not json")
    line = _one_error_line(_cli("redecide", root, "--delta", "0.5"))
    assert "re-run its command to finish it" in line, line
    res = _run_command(tmp_path / "out", cache_dir)
    assert res.exit_code == 0, res.stderr
    _assert_whole(root, base_run[1])
    assert json.loads((root / "manifest.json").read_text())["rows"]["samples"] == 4 * K
    assert _cli("redecide", root, "--delta", "0.5").exit_code == 0


def test_the_ray_audit_makes_the_same_decision(base_run, tmp_path, cache_dir):
    """`dxray audit` (Ray actors) resumes through the same plan as `explain`: the tasks whose samples are gone are
    done again, the others skipped."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    root = _copy(base_run, tmp_path)
    sink = RunSink(str(root.parent), root.name)
    [part] = (root / "samples").glob("*.parquet")
    samples = sink.read_table("samples")
    lost = sorted(set(samples["task_id"].to_pylist()))[:2]
    part.unlink()  # two tasks' samples gone, two kept: written back as their own parts
    kept = samples.filter(pa.compute.invert(pa.compute.is_in(samples["task_id"], pa.array(lost))))
    for task_id in sorted(set(kept["task_id"].to_pylist())):
        pq.write_table(kept.filter(pa.compute.equal(kept["task_id"], task_id)), root / "samples" / f"part-{task_id}.parquet")
    res = subprocess.run([sys.executable, "-m", "dxray", "audit", TINY_YAML, *_overrides(tmp_path / "out", cache_dir),
                          "-q"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, DXRAY_CACHE=str(cache_dir)))
    assert res.returncode == 0, res.stderr
    assert "2 task(s) marked done have fewer than sample.k=2 samples" in res.stderr
    assert "2 ok, 0 failed, 2 skipped" in res.stderr and f"{4 * K} samples" in res.stderr, res.stderr
    _assert_whole(root, base_run[1])


def _unfinished(root: Path) -> None:
    """The run as an interrupted one leaves it: one part per committed task in tasks and samples, no compaction
    journal, no verdicts, classes or manifest yet."""
    for table in ("tasks", "samples"):
        [compacted] = (root / table).glob("*.parquet")
        rows = pq.read_table(compacted)
        compacted.unlink()
        for task_id in sorted(set(rows["task_id"].to_pylist())):
            pq.write_table(rows.filter(pa.compute.equal(rows["task_id"], task_id)),
                           root / table / f"part-{task_id}.parquet")
    for rel in ("_compaction", "verdicts", "classes", "manifest.json"):
        (shutil.rmtree if (root / rel).is_dir() else Path.unlink)(root / rel)


def test_one_truncated_samples_part_of_an_unfinished_run_is_repaired_as_advised(base_run, tmp_path, cache_dir):
    root = _copy(base_run, tmp_path)
    _unfinished(root)
    part = sorted((root / "samples").glob("part-*.parquet"))[1]
    _truncate(part)
    line = _one_error_line(_run_command(tmp_path / "out", cache_dir))
    named = re.search(r"run \S+: (\S+) is not a readable Parquet file .*; delete it and re-run the run's command", line)
    assert named and named[1] == f"samples/{part.name}", line
    (root / named[1]).unlink()
    res = _run_command(tmp_path / "out", cache_dir)
    assert res.exit_code == 0, res.stderr
    assert "1 ok, 0 failed, 3 skipped" in res.stderr, res.stderr
    _assert_whole(root, base_run[1])
