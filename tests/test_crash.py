"""Crashes of the driver, for real: ``kill -9`` in the middle of a commit, and two drivers on one output.

Each ``dxray audit`` runs as its own process with its own local Ray (logical GPU, ``device=cpu``) under a
temp dir of its own, so its Ray processes can be found and stopped without touching anyone else's. The
run is read back with pyarrow.dataset, DuckDB and Polars over the documented glob
(``{run}/{table}/*.parquet``) and with ``RunSink.read_table``, which stay exact whatever compaction does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, TINY_YAML

from dxray.config import load_config
from dxray.storage.sink import RunSink

pytestmark = pytest.mark.timeout(600)
FAST = ["optimize.steps=2", "sample.k=2", "device=cpu", "cluster.local_gpus=1", "cluster.local_cpus=2",
        "optimize.batch_tasks=1"]
COMMITTED = ("tasks", "samples")  # the tables the driver commits, task by task
READERS = ("pyarrow", "duckdb", "polars", "read_table")


class Audit:
    """``dxray audit`` as a process of its own (a session leader) with its own local Ray under a fresh temp
    dir; stdout and stderr go to files (``log()`` reads stderr so far)."""

    def __init__(self, out: Path, cache, logs: Path, *extra: str):
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="dxr-", dir="/tmp")) / "ray"  # socket paths: < 107 bytes
        self.stderr = logs.with_suffix(".err")
        env = dict(os.environ, DXRAY_CACHE=str(cache), PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled",
                   RAY_TMPDIR=str(self.ray_tmp))
        env.pop("RAY_ADDRESS", None)
        args = ["audit", str(TINY_YAML), f"output={out}", f"cache_dir={cache}", *FAST, *extra, "--quiet"]
        with open(logs.with_suffix(".out"), "w") as stdout, open(self.stderr, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "dxray", *args], cwd=ROOT, env=env, text=True,
                                         stdout=stdout, stderr=stderr, start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for_a_commit(self, root: Path, timeout: float = 400) -> None:
        """Until the run's first task row is committed, with the driver still running."""
        start = time.monotonic()
        while not list((root / "tasks").glob("part-*.parquet")) and self.proc.poll() is None:
            assert time.monotonic() - start < timeout, f"no task committed in {timeout:.0f} s"
            time.sleep(0.05)
        assert self.proc.poll() is None, self.log()[-3000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dxray audit did not finish in {timeout:.0f} s; stderr:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Kill what is left: the process group and every process of its local Ray."""
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
        procs = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and str(self.ray_tmp) in " ".join(p.info["cmdline"] or []):
                    procs.append(p)
                    p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.ray_tmp.parent, ignore_errors=True)


def _plan(out: Path, cache, *extra: str) -> tuple[int, int, str]:
    """(tasks, samples, run id) the audit plans, computed from the config, not read from the run."""
    cfg = load_config(TINY_YAML, [f"output={out}", f"cache_dir={cache}", *FAST, *extra])
    t = cfg.targets
    tasks = len(t.classes) * ((1 if t.class_task else 0) + t.top_k) * len(cfg.prompt.templates)
    return tasks, tasks * cfg.sample.k, cfg.resolved_run_id()


def _temps(root: Path) -> list[Path]:
    """The sink's temporary files (``.{name}.{pid}-{hex}.tmp``, see RunSink._atomic) in the committed tables."""
    return [p for t in COMMITTED if (root / t).is_dir() for p in (root / t).iterdir() if p.name.endswith(".tmp")]


def _readers(root: Path) -> dict[str, dict[str, int]]:
    """Row counts of the committed tables by every reader, over the documented glob. Each must read
    only whole files: a half-written part would fail them (or add rows)."""
    import duckdb
    import polars as pl

    counts: dict[str, dict[str, int]] = {}
    for table in COMMITTED:
        glob = f"{root}/{table}/*.parquet"
        dataset = ds.dataset(root / table, format="parquet")
        assert not [f for f in dataset.files if not f.endswith(".parquet") or "/." in f], dataset.files
        counts[table] = {
            "pyarrow": dataset.count_rows(),
            "duckdb": duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0],
            "polars": pl.scan_parquet(glob).select(pl.len()).collect().item(),
            "read_table": RunSink(str(root.parent), root.name).read_table(table).num_rows,
        }
        for f in dataset.files:  # and every file a reader sees is a whole Parquet file
            pq.read_metadata(f)
    return counts


def _exactly_once(root: Path, n_tasks: int, n_samples: int, folder_too: bool = True) -> None:
    """Every planned task once, with status ok, and each of its samples once (one per seed): read by
    ``RunSink.read_table`` and (``folder_too``) by pyarrow.dataset over the table folder."""
    sink = RunSink(str(root.parent), root.name)
    reads = [lambda t, c: sink.read_table(t, columns=c)]
    if folder_too:
        reads.append(lambda t, c: ds.dataset(root / t, format="parquet").to_table(columns=c))
    for read in reads:
        tasks = read("tasks", ["task_id", "status"]).to_pylist()
        samples = read("samples", ["task_id", "seed"]).to_pylist()
        assert len(tasks) == len({t["task_id"] for t in tasks}) == n_tasks
        assert all(t["status"] == "ok" for t in tasks)
        assert len(samples) == len({(s["task_id"], s["seed"]) for s in samples}) == n_samples
        assert {s["task_id"] for s in samples} == {t["task_id"] for t in tasks}


def _stopped(pid: int) -> None:
    """Wait until every thread of ``pid`` is stopped: a signal is delivered asynchronously, and a commit
    thread may still move its file into place just after kill() returns."""
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
        if all(s in "tTZX" for s in states):  # stopped (or exiting)
            return
        time.sleep(0.001)


def _kill_mid_commit(audit: Audit, root: Path, deadline: float) -> bool:
    """SIGKILL the driver while one of its commit threads has a part half written (a sink temp file on
    disk): poll for a temp file, freeze the driver (SIGSTOP), and kill it if the temp is still there;
    else let it go on and look again. Returns whether a commit was caught mid-write (if none was by the
    deadline, the driver is killed anyway)."""
    while time.monotonic() < deadline and audit.proc.poll() is None:
        if _temps(root):
            os.kill(audit.pid, signal.SIGSTOP)
            _stopped(audit.pid)
            if _temps(root):
                os.kill(audit.pid, signal.SIGKILL)
                return True
            os.kill(audit.pid, signal.SIGCONT)
    if audit.proc.poll() is None:
        os.kill(audit.pid, signal.SIGKILL)
    return False


def test_kill_9_of_the_driver_mid_commit_then_the_same_command_completes_exactly_once(tmp_path, cache_dir):
    out = tmp_path / "out"
    extra = ["targets.top_k=3"]  # 8 tasks: 16 commits (a samples part, then a task row, per task)
    n_tasks, n_samples, run_id = _plan(out, cache_dir, *extra)
    root = out / run_id
    first = Audit(out, cache_dir, tmp_path / "first", *extra)
    try:
        first.wait_for_a_commit(root)
        caught = _kill_mid_commit(first, root, deadline=time.monotonic() + 60)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        first.stop()
    assert caught, "the driver was never caught with a part half written"
    left = _temps(root)
    assert left and all(p.name.startswith(".") for p in left), left  # the half file: hidden, never renamed
    committed = RunSink(str(out), run_id).committed_task_ids()
    assert 0 < len(committed) < n_tasks, "the kill came too late to test a resume"
    crashed = _readers(root)  # the crashed run reads cleanly: only whole parts, no temp file
    assert crashed["tasks"] == dict.fromkeys(crashed["tasks"], len(list((root / "tasks").glob("part-*.parquet"))))
    assert len(set(crashed["samples"].values())) == 1, crashed

    second = Audit(out, cache_dir, tmp_path / "second", *extra)
    try:
        assert second.wait(timeout=400) == 0, second.log()[-3000:]
    finally:
        second.stop()
    assert f"{len(committed)} skipped" in second.log()
    _exactly_once(root, n_tasks, n_samples)
    assert _readers(root) == {"tasks": dict.fromkeys(READERS, n_tasks), "samples": dict.fromkeys(READERS, n_samples)}
    assert (root / "manifest.json").is_file()


@pytest.fixture(scope="module")
def two_drivers(tmp_path_factory, cache_dir):
    """Two ``dxray audit`` of one config on one output, started together. So that the interleaving that
    matters happens every time, not by luck of timing: B is frozen (SIGSTOP) as soon as it has planned
    (its first progress line) and thawed once A has finished (committed everything, compacted, written
    the manifest), so B commits every task it planned after A's finish, over A's compacted files."""
    tmp = tmp_path_factory.mktemp("two-drivers")
    out = tmp / "out"
    n_tasks, n_samples, run_id = _plan(out, cache_dir, "cluster.log_every_s=0.2")
    a = Audit(out, cache_dir, tmp / "a", "cluster.log_every_s=0.2")
    b = Audit(out, cache_dir, tmp / "b", "cluster.log_every_s=0.2")
    try:
        start, planned = time.monotonic(), None
        while planned is None and b.proc.poll() is None:
            assert time.monotonic() - start < 400, "B never started its tasks"
            if m := re.search(r"dxray: \d+/(\d+) tasks finished", b.log()):
                os.kill(b.pid, signal.SIGSTOP)
                planned = int(m[1])
            time.sleep(0.05)
        assert planned is not None, b.log()[-3000:]
        rc_a = a.wait(timeout=400)
        os.kill(b.pid, signal.SIGCONT)
        rc_b = b.wait(timeout=400)
    finally:
        for audit in (a, b):
            if audit.proc.poll() is None:
                os.kill(audit.pid, signal.SIGCONT)
            audit.stop()
    return {"root": out / run_id, "n_tasks": n_tasks, "n_samples": n_samples, "b_planned": planned,
            "rc": (rc_a, rc_b), "logs": (a.log(), b.log())}


def test_two_drivers_on_the_same_output_both_finish_and_the_run_holds_each_task_once(two_drivers):
    r = two_drivers
    assert r["rc"] == (0, 0), r["logs"]
    assert r["b_planned"] > 0, "B planned after A had committed everything: nothing was written twice"
    _exactly_once(r["root"], r["n_tasks"], r["n_samples"], folder_too=False)  # RunSink.read_table: dxray's reader
    assert (r["root"] / "manifest.json").is_file()


def test_two_drivers_on_the_same_output_leave_each_row_once_for_glob_readers(two_drivers):
    """B's late parts sit beside A's compacted files until B's own finish deletes them (read_table skips
    them meanwhile): once both are done, a glob over the folder sees every row once too."""
    r = two_drivers
    assert r["rc"] == (0, 0), r["logs"]
    assert _readers(r["root"]) == {"tasks": dict.fromkeys(READERS, r["n_tasks"]),
                                   "samples": dict.fromkeys(READERS, r["n_samples"])}
