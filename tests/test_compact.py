"""Compaction (dxray.storage.compact): once a run finishes, its per-task parts of tasks and samples become a
few large files, exactly once, and a kill -9 at any point of it loses nothing.

Every check reads the folder the ways analysts do (pyarrow.dataset on the folder, DuckDB and Polars
``*.parquet`` globs) and the way dxray does (``RunSink.read_table``, hence resume, report, redecide).
The crash tests stop a real compactor in a subprocess at a named point (``DXRAY_COMPACT_PAUSE``) and
kill it with SIGKILL there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, TINY_YAML

from dxray.errors import DxrayError
from dxray.storage.compact import compact_run, finish_pending
from dxray.storage.schemas import TABLES
from dxray.storage.sink import RunSink, replaced_parts

N_TASKS, K = 24, 3
FAILED = {3, 10, 17}  # task indices whose task row has status error (no samples, as AuditJob.commit writes them)
ORPHAN = "orphan00000000"  # samples written, then the crash came before the task row: not committed
ENGINES = ("pyarrow", "duckdb", "polars")
COMPACT = ("import sys; from dxray.storage.sink import RunSink; from dxray.storage.compact import compact_run; "
           "print(compact_run(RunSink(sys.argv[1], 'r'), target_bytes=int(sys.argv[2])))")


def _tid(i: int) -> str:
    return f"{i:02d}" + uuid.UUID(int=random.Random(i).getrandbits(128)).hex[:12]


def _task(i: int, status: str = "ok") -> dict:
    return {"run_id": "r", "task_id": _tid(i), "kind": "feature" if i % 4 else "class", "class_index": (i * 7) % 5,
            "class_name": f"c{(i * 7) % 5}", "feature_index": None if i % 4 == 0 else i, "feature_rank": i % 4 or None,
            "template": "{}", "status": status, "error": "optimisation failed: boom" if status == "error" else None,
            "steps": 2, "final_loss": 0.5, "loss_curve": [1.0, 0.5], "prompt_embedding": [[0.1 * i, 0.2]],
            "train_seeds": [i, i + 1], "seconds": 1.5}


def _samples(i: int, task_id: str | None = None) -> list[dict]:
    rng = random.Random(1000 + i)
    return [{"run_id": "r", "task_id": task_id or _tid(i), "class_index": (i * 7) % 5, "feature_index": i, "seed": s,
             "image_uri": f"images/{_tid(i)}/{s:010d}.png", "thumbnail": rng.randbytes(2000), "width": 64,
             "height": 64, "class_prob": 0.5, "object_fraction": rng.random(), "mask_rle": [1, 2, 3],
             "boxes": [[0.0, 1.0, 2.0, 3.0]], "box_scores": [0.9]} for s in range(K)]


def _commit(sink: RunSink, i: int, status: str) -> None:
    """As AuditJob.commit: the samples first, the task row last."""
    if status == "ok":
        sink.write_table("samples", _samples(i), part=_tid(i))
    sink.write_table("tasks", [_task(i, status)], part=_tid(i))


def _make_run(output: str) -> RunSink:
    sink = RunSink(output, "r")
    for i in range(N_TASKS):
        _commit(sink, i, "error" if i in FAILED else "ok")
    sink.write_table("samples", _samples(99, ORPHAN), part=ORPHAN)
    return sink


def _target(root: Path) -> int:
    """About four compacted samples files (and two tasks files) for the run of :func:`_make_run`."""
    return sum(p.stat().st_size for p in (root / "samples").glob("part-*.parquet")) // 4


def _rows(sink: RunSink, name: str) -> list[dict]:
    key = ("task_id",) if name == "tasks" else ("task_id", "seed")
    return sorted(sink.read_table(name).to_pylist(), key=lambda r: tuple(r[k] for k in key))


def _count(folder: Path, engine: str) -> int:
    if engine == "pyarrow":
        return ds.dataset(folder, format="parquet").count_rows()
    if engine == "duckdb":
        return duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchall()[0][0]
    return pl.scan_parquet(f"{folder}/*.parquet").select(pl.len()).collect().item()


def _counts(root: Path, name: str) -> dict[str, int]:
    return {engine: _count(root / name, engine) for engine in ENGINES}


def _in_flight_rows(root: Path, name: str) -> int:
    """Rows a globbing reader sees twice now: the sources still there of a compacted file already visible."""
    path = root / "_compaction" / f"{name}.json"
    if not path.exists():
        return 0
    rows = 0
    for entry in json.loads(path.read_text())["outputs"]:
        if (root / name / entry["file"]).exists():
            rows += sum(pq.read_metadata(root / name / s).num_rows for s in entry["sources"] if (root / name / s).exists())
    return rows


def _layout(root: Path) -> dict[str, list[dict]]:
    """{table/file: its rows} of every visible file of both tables."""
    return {f"{name}/{p.name}": pq.read_table(p).to_pylist() for name in ("tasks", "samples")
            for p in sorted((root / name).iterdir()) if not p.name.startswith((".", "_"))}


def _stat(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run before compaction (its rows, read by dxray) and the layout an uninterrupted compaction gives."""
    out = tmp_path_factory.mktemp("reference")
    sink = _make_run(str(out))
    before = {name: _rows(sink, name) for name in ("tasks", "samples")}
    target = _target(Path(sink.root))
    summary = compact_run(sink, target_bytes=target)
    return {"rows": before, "target": target, "layout": _layout(Path(sink.root)), "summary": summary}


def test_compaction_writes_few_files_with_every_row_once(tmp_path, reference):
    sink = _make_run(str(tmp_path))
    root = Path(sink.root)
    committed = sink.committed_task_ids()
    assert len(list((root / "samples").iterdir())) == N_TASKS - len(FAILED) + 1
    (tmp_path / "parts").mkdir()
    for name in ("tasks", "samples"):
        shutil.copy(root / name / f"part-{_tid(0)}.parquet", tmp_path / "parts" / f"{name}-0.parquet")

    summary = compact_run(sink, target_bytes=reference["target"])
    ok = N_TASKS - len(FAILED)
    assert summary == {"tasks": {"files": 2, "rows": ok, "parts": len(FAILED), "new_files": 2, "new_rows": ok},
                       "samples": {"files": 4, "rows": ok * K, "parts": 1, "new_files": 4, "new_rows": ok * K}}
    for name in ("tasks", "samples"):
        assert _rows(sink, name) == reference["rows"][name]  # every column of every row, once
        total = len(reference["rows"][name])
        assert _counts(root, name) == dict.fromkeys(ENGINES, total)
    assert sink.committed_task_ids() == committed
    # What is left on its own: the failed tasks' rows (a retry overwrites them) and the orphan samples.
    assert sorted(p.name for p in (root / "tasks").glob("part-*")) == sorted(f"part-{_tid(i)}.parquet" for i in FAILED)
    assert [p.name for p in (root / "samples").glob("part-*")] == [f"part-{ORPHAN}.parquet"]
    assert not [p for p in root.rglob(".*")]  # no temporaries
    for path in root.glob("*/compact-*.parquet"):  # the schema a part has: types, descriptions, schema version
        part = next((tmp_path / "parts").glob(f"{path.parent.name}-*.parquet"))
        assert pq.read_schema(path).equals(pq.read_schema(part), check_metadata=True), path
        assert pq.read_schema(path).names == TABLES[path.parent.name].names
    # Each samples file covers a range of classes, in order.
    ranges = [(min(c), max(c)) for c in (pq.read_table(p, columns=["class_index"])["class_index"].to_pylist()
                                         for p in sorted((root / "samples").glob("compact-*")))]
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False)) and ranges[0][0] < ranges[-1][1]
    assert _layout(root) == reference["layout"]  # deterministic


def test_a_second_finish_changes_nothing_and_a_retried_task_is_compacted_once(tmp_path, reference):
    sink = _make_run(str(tmp_path))
    root = Path(sink.root)
    compact_run(sink, target_bytes=reference["target"])
    before = _stat(root)
    again = compact_run(sink, target_bytes=reference["target"])
    assert _stat(root) == before  # not a byte, not a timestamp
    assert again["tasks"]["new_files"] == again["samples"]["new_files"] == 0

    retried = min(FAILED)  # a resume tries the failed task again and it succeeds: its part is overwritten
    _commit(sink, retried, "ok")
    summary = compact_run(sink, target_bytes=reference["target"])
    assert (summary["tasks"]["new_files"], summary["tasks"]["new_rows"], summary["tasks"]["parts"]) == \
        (1, 1, len(FAILED) - 1)
    assert (summary["samples"]["new_files"], summary["samples"]["new_rows"]) == (1, K)
    assert (root / "tasks" / "compact-0002-0000.parquet").exists()
    tasks = sink.read_table("tasks").to_pylist()
    assert [t["status"] for t in tasks if t["task_id"] == _tid(retried)] == ["ok"]
    assert len(tasks) == N_TASKS == len({t["task_id"] for t in tasks})
    assert _tid(retried) in sink.committed_task_ids()
    n_samples = (N_TASKS - len(FAILED) + 2) * K
    for name, n in (("tasks", N_TASKS), ("samples", n_samples)):
        assert len(sink.read_table(name)) == n and _counts(root, name) == dict.fromkeys(ENGINES, n)


POINTS = ["tasks:journaled", "tasks:published", "tasks:half-deleted", "tasks:deleted", "tasks:done",
          "samples:journaled", "samples:published", "samples:half-deleted", "samples:deleted", "samples:done"]


def _kill_at(point: str, output: str, target: int, mark: Path) -> None:
    """Run the compaction in a subprocess, wait for it to reach ``point`` and kill -9 it there."""
    env = dict(os.environ, DXRAY_COMPACT_PAUSE=point, DXRAY_COMPACT_PAUSE_MARK=str(mark))
    proc = subprocess.Popen([sys.executable, "-c", COMPACT, output, str(target)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a guard against a hang, not a timing check
        while not mark.exists():
            assert proc.poll() is None, f"the compactor ended before {point}: {proc.communicate()}"
            assert time.monotonic() < deadline, f"the compactor never reached {point}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_during_compaction_loses_nothing_and_the_rerun_finishes_it(point, tmp_path, reference):
    sink = _make_run(str(tmp_path / "out"))
    root = Path(sink.root)
    _kill_at(point, str(tmp_path / "out"), reference["target"], tmp_path / "mark")
    table = point.split(":")[0]
    # A temporary of the next file, as a kill in the middle of writing one leaves it.
    (root / table / ".compact-0001-0001.parquet.999-deadbeef.tmp").write_bytes(b"PAR1 half a file")

    # dxray's readers: every row exactly once, whatever the point.
    for name in ("tasks", "samples"):
        assert _rows(sink, name) == reference["rows"][name], (point, name)
    assert sink.committed_task_ids() == {_tid(i) for i in range(N_TASKS) if i not in FAILED}
    # Globbing readers: exactly once too, except in the window between a compacted file appearing and the
    # last of its parts being deleted, where that file's rows show twice (docs/analytics.md).
    doubled = {name: _in_flight_rows(root, name) for name in ("tasks", "samples")}
    in_window = point.endswith(("published", "half-deleted"))
    assert (doubled[table] > 0) == in_window and doubled[{"tasks": "samples", "samples": "tasks"}[table]] == 0
    for name in ("tasks", "samples"):
        assert _counts(root, name) == dict.fromkeys(ENGINES, len(reference["rows"][name]) + doubled[name])

    summary = compact_run(sink, target_bytes=reference["target"])  # the same command again
    for name in ("tasks", "samples"):
        assert _rows(sink, name) == reference["rows"][name]
        assert _counts(root, name) == dict.fromkeys(ENGINES, len(reference["rows"][name]))
        journal = json.loads((root / "_compaction" / f"{name}.json").read_text())
        assert all(e["done"] for e in journal["outputs"])
    assert _layout(root) == reference["layout"]  # the same files an uninterrupted compaction writes
    assert {n: (s["files"], s["rows"]) for n, s in summary.items()} == \
        {n: (s["files"], s["rows"]) for n, s in reference["summary"].items()}
    assert not [p for p in root.rglob(".*")]


def test_a_corrupt_part_stops_compaction_before_it_writes_anything(tmp_path, reference):
    sink = _make_run(str(tmp_path))
    root = Path(sink.root)
    part = root / "samples" / f"part-{_tid(5)}.parquet"
    part.write_bytes(part.read_bytes()[:100])
    before = sorted(p.name for p in (root / "samples").iterdir())
    with pytest.raises(DxrayError) as err:
        compact_run(sink, target_bytes=reference["target"])
    assert f"samples/{part.name}" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in (root / "samples").iterdir()) == before
    assert not (root / "_compaction" / "samples.json").exists()


def test_a_broken_journal_is_one_line(tmp_path, reference):
    sink = _make_run(str(tmp_path))
    compact_run(sink, target_bytes=reference["target"])
    (Path(sink.root) / "_compaction" / "tasks.json").write_text('{"outputs": [{"file": 3}]}')
    with pytest.raises(DxrayError, match=r"_compaction/tasks.json is not a readable compaction journal") as err:
        sink.committed_task_ids()
    assert "\n" not in str(err.value)


def test_a_compacted_file_deleted_by_hand_takes_its_rows_and_the_next_finish_forgets_it(tmp_path, reference):
    sink = _make_run(str(tmp_path))
    root = Path(sink.root)
    compact_run(sink, target_bytes=reference["target"])
    gone = root / "tasks" / "compact-0001-0000.parquet"
    lost = set(pq.read_table(gone)["task_id"].to_pylist())
    gone.unlink()
    assert sink.committed_task_ids() == {_tid(i) for i in range(N_TASKS) if i not in FAILED} - lost
    finish_pending(sink)  # a resume's prepare: the journal no longer names the file
    journal = json.loads((root / "_compaction" / "tasks.json").read_text())
    assert gone.name not in {e["file"] for e in journal["outputs"]}
    for i in range(N_TASKS):  # the resume recomputes the lost tasks; the next finish compacts them
        if _tid(i) in lost:
            sink.write_table("tasks", [_task(i)], part=_tid(i))
    compact_run(sink, target_bytes=reference["target"])
    assert _rows(sink, "tasks") == reference["rows"]["tasks"]
    assert _count(root / "tasks", "duckdb") == N_TASKS


def test_a_listing_a_compaction_changed_midway_is_not_settled():
    journal = {"outputs": [{"file": "compact-0001-0000.parquet", "sources": ["part-a.parquet", "part-b.parquet"]}]}
    both = {"part-a.parquet", "part-b.parquet"}
    assert replaced_parts(journal, both) == (set(), True)  # before the file appeared
    assert replaced_parts(journal, both | {"compact-0001-0000.parquet"}) == (both, True)  # the window
    assert replaced_parts(journal, {"compact-0001-0000.parquet"}) == (both, True)  # after
    assert replaced_parts(journal, {"part-b.parquet"}) == (set(), False)  # the file listed too early, a part too late


def test_on_s3_a_kill_9_mid_compaction_loses_nothing_and_the_rerun_finishes_it(s3, tmp_path):
    from s3server import count_rows

    output = f"s3://{s3.bucket}/compact-{uuid.uuid4().hex[:8]}"
    sink = RunSink(output, "r")
    for i in range(8):
        _commit(sink, i, "error" if i == 3 else "ok")
    expected = {name: _rows(sink, name) for name in ("tasks", "samples")}
    target = sum(i.size for i in sink.files("samples")) // 3
    _kill_at("samples:half-deleted", output, target, tmp_path / "mark")

    for name in ("tasks", "samples"):
        assert _rows(sink, name) == expected[name]
    journal = sink.read_journal("samples")
    [open_entry] = [e for e in journal["outputs"] if not e["done"]]
    left = {i.base_name for i in sink.files("samples")} & set(open_entry["sources"])
    assert 0 < len(left) < len(open_entry["sources"])
    for engine in ENGINES:  # the window, on S3: the open file's remaining parts are seen twice by a glob
        assert count_rows(s3, sink.uri("samples"), engine) == len(expected["samples"]) + K * len(left), engine

    summary = compact_run(sink, target_bytes=target)
    assert summary["samples"]["files"] == 3 and summary["samples"]["parts"] == 0 and summary["tasks"]["parts"] == 1
    for name in ("tasks", "samples"):
        assert _rows(sink, name) == expected[name]
        for engine in ENGINES:
            assert count_rows(s3, sink.uri(name), engine) == len(expected[name]), (name, engine)
    compacted = {name: [f"compact-0001-{n:04d}.parquet" for n in range(summary[name]["files"])] for name in summary}
    assert sorted(i.base_name for i in sink.files("tasks")) == [*compacted["tasks"], f"part-{_tid(3)}.parquet"]
    assert sorted(i.base_name for i in sink.files("samples")) == compacted["samples"]  # no temporaries either
    assert sink.committed_task_ids() == {_tid(i) for i in range(8) if i != 3}


def _cli(args: list[str], cache: Path, env: dict | None = None) -> subprocess.Popen:
    full = dict(os.environ, DXRAY_CACHE=str(cache), PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "dxray", *args], cwd=ROOT, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_a_real_run_compacts_at_finish_a_kill_9_there_and_a_resume_finish_it(tmp_path, cache_dir):
    """dxray explain, killed in its finish mid-compaction with one task failed; the same command again
    finishes the compaction, retries the failed task and compacts it; once more changes no data."""
    from dxray.config import load_config
    from dxray.pipeline.job import AuditJob
    from dxray.pipeline.tasks import plan

    out = tmp_path / "out"
    args = ["explain", str(TINY_YAML), f"output={out}", "optimize.steps=2", "sample.k=2", "device=cpu",
            "targets.classes=[0,1]", "targets.top_k=0", "prompt.templates=['{}','a photo of {}']",
            "sample.baseline=false", "--quiet"]
    cfg = load_config(TINY_YAML, [a for a in args[2:] if "=" in a])
    job = AuditJob(cfg, "explain")
    specs = plan(cfg, job.preflight(), [])
    assert len(specs) == 4
    root = out / cfg.resolved_run_id()
    (root / "images").mkdir(parents=True)
    blocker = root / "images" / specs[1].task_id  # a file where that task's image folder goes: its writes fail
    blocker.write_text("in the way")

    mark = tmp_path / "mark"
    first = _cli(args, cache_dir, {"DXRAY_COMPACT_PAUSE": "samples:published", "DXRAY_COMPACT_PAUSE_MARK": str(mark)})
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing check
        while not mark.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.exists(), first.communicate()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    sink = RunSink(str(out), cfg.resolved_run_id())
    assert not (root / "manifest.json").exists()  # not finished
    tasks = sink.read_table("tasks").to_pylist()
    assert sorted(t["status"] for t in tasks) == ["error", "ok", "ok", "ok"] and len({t["task_id"] for t in tasks}) == 4
    assert len(sink.read_table("samples")) == 6 and len(sink.committed_task_ids()) == 3
    assert _count(root / "samples", "duckdb") == 12  # the documented window: the file and all of its parts

    blocker.unlink()
    second = _cli(args, cache_dir)
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0 and "3 skipped" in stderr, stderr
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["compaction"] == {
        "tasks": {"files": 2, "rows": 4, "parts": 0, "new_files": 1, "new_rows": 1},
        "samples": {"files": 2, "rows": 8, "parts": 0, "new_files": 1, "new_rows": 2}}
    assert manifest["rows"]["tasks"] == 4 and manifest["rows"]["samples"] == 8
    for name, n in (("tasks", 4), ("samples", 8)):
        assert sorted(p.name for p in (root / name).iterdir()) == ["compact-0001-0000.parquet",
                                                                   "compact-0002-0000.parquet"]
        assert _counts(root, name) == dict.fromkeys(ENGINES, n) and len(sink.read_table(name)) == n
    assert {t["status"] for t in sink.read_table("tasks").to_pylist()} == {"ok"}

    kept = ("tasks/", "samples/", "_compaction/", "images/")  # feature_ranking, verdicts, classes are rewritten
    before = {k: v for k, v in _stat(root).items() if k.startswith(kept)}
    third = _cli(args, cache_dir)
    _, stderr = third.communicate(timeout=300)
    assert third.returncode == 0 and "4 skipped" in stderr, stderr
    assert {k: v for k, v in _stat(root).items() if k.startswith(kept)} == before  # no byte, no timestamp
    assert json.loads((root / "manifest.json").read_text())["compaction"]["samples"]["new_files"] == 0
    shutil.rmtree(out)
