"""The audit on a real local Ray (logical GPUs on this CPU machine), writing to a real S3 server.

Faults are made for real: an explainer actor is killed, the driver is interrupted, the S3
server is stopped and restarted on the same data.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import ROOT, TINY_YAML

from dxray import progress as ev
from dxray.config import load_config
from dxray.errors import DxrayError

pytestmark = pytest.mark.timeout(900)
FAST = ["optimize.steps=2", "sample.k=2", "device=cpu", "cluster.log_every_s=2"]


def _config(output, cache_dir, *extra):
    return load_config(TINY_YAML, [f"output={output}", f"cache_dir={cache_dir}", *FAST, *extra])


def _tasks(root, fs=None):
    return ds.dataset(f"{root}/tasks", format="parquet", filesystem=fs).to_table().to_pylist()


def _expected(cfg):
    """The plan, computed independently of the run: classes x (class task + top-k features) x templates."""
    t = cfg.targets
    per_class = (1 if t.class_task else 0) + t.top_k
    return len(t.classes) * per_class * len(cfg.prompt.templates)


def test_audit_writes_every_table_to_s3_readable_by_pyarrow_polars_duckdb(ray_local, s3, cache_dir):
    from s3server import count_rows

    from dxray.distributed.audit import run_distributed
    from dxray.storage.fs import filesystem

    cfg = _config(f"s3://{s3.bucket}/audits", cache_dir)
    summary = run_distributed(cfg)
    n = _expected(cfg)
    assert (summary.planned, summary.ok, summary.failed) == (n, n, 0)
    root = f"s3://{s3.bucket}/audits/{summary.run_id}"
    k = cfg.sample.k
    for engine in ("pyarrow", "polars", "duckdb"):
        assert count_rows(s3, f"{root}/tasks", engine) == n, engine
        assert count_rows(s3, f"{root}/samples", engine) == n * k, engine
        assert count_rows(s3, f"{root}/verdicts", engine) == len(cfg.targets.classes) * cfg.targets.top_k, engine
        assert count_rows(s3, f"{root}/classes", engine) == len(cfg.targets.classes), engine
    fs, path = filesystem(root, cfg.storage)
    samples = ds.dataset(f"{path}/samples", filesystem=fs).to_table(columns=["image_uri", "object_fraction"]).to_pylist()
    assert all(s["object_fraction"] is not None for s in samples)
    some = samples[0]["image_uri"]
    assert some.startswith(f"s3://{s3.bucket}/audits/{summary.run_id}/images/")
    with fs.open_input_stream(some.removeprefix("s3://")) as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    manifest = fs.open_input_stream(f"{path}/manifest.json").read().decode()
    assert s3.secret_key not in manifest and s3.access_key not in manifest
    assert '"dxray_command": "audit"' in manifest


def test_killed_explainer_actor_is_replaced_and_every_task_runs_once(ray_local, tmp_path, cache_dir):
    from dxray.distributed.audit import run_distributed

    cfg = _config(tmp_path / "out", cache_dir, "optimize.batch_tasks=1", "targets.top_k=2",
                  "cluster.in_flight_per_actor=2")
    events = []
    killed = []

    def progress(event):
        events.append(event)
        if isinstance(event, ev.TaskCommitted | ev.TaskFailed) and not killed:  # the first commit: both explainers have work queued
            actor = ray_local.get_actor(f"dxray-explainer-{cfg.resolved_run_id()}-0")
            ray_local.kill(actor, no_restart=False)  # a real crash; Ray restarts the actor
            killed.append(time.monotonic())

    summary = run_distributed(cfg, progress=progress)
    assert killed and any(isinstance(e, ev.Retried) for e in events)
    n = _expected(cfg)
    assert (summary.ok, summary.failed) == (n, 0)
    tasks = _tasks(summary.root)
    ids = [t["task_id"] for t in tasks]
    assert len(ids) == len(set(ids)) == n
    samples = ds.dataset(f"{summary.root}/samples").to_table(columns=["task_id", "seed"]).to_pylist()
    pairs = [(s["task_id"], s["seed"]) for s in samples]
    assert len(pairs) == len(set(pairs)) == n * cfg.sample.k


def _files(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()]


def _finish(proc, timeout: float) -> str:
    """Wait for a `_cli` process and return its stderr; kill its whole session if it outlives ``timeout``."""
    try:
        return proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _cli(*args, cache, env=None):
    full = dict(os.environ, DXRAY_CACHE=str(cache), PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled", **(env or {}))
    full.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "dxray", *args], cwd=ROOT, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_interrupted_driver_resumes_without_duplicates_or_recomputation(tmp_path, cache_dir):
    out = tmp_path / "out"
    args = ["audit", str(TINY_YAML), f"output={out}", f"cache_dir={cache_dir}", *FAST, "optimize.batch_tasks=1",
            "targets.top_k=2", "cluster.local_gpus=1", "cluster.local_cpus=2", "--quiet"]
    first = _cli(*args, cache=cache_dir)
    deadline = time.monotonic() + 400
    tasks_dir = None
    while time.monotonic() < deadline and first.poll() is None:
        parts = list(out.glob("run-*/tasks/part-*.parquet"))
        if parts:
            tasks_dir = parts[0].parent
            break
        time.sleep(0.2)
    assert tasks_dir is not None, first.communicate()
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C to the whole process group, as a terminal does
    first.communicate(timeout=120)
    # Compared by row, not by file: the finished run compacts the parts away. `seconds` is wall time, so a
    # recomputed task would differ.
    before = {t["task_id"]: (t["seconds"], t["loss_curve"]) for t in _tasks(tasks_dir.parent) if t["status"] == "ok"}
    cfg = _config(out, cache_dir, "targets.top_k=2")
    n = _expected(cfg)
    assert 0 < len(before) < n, "the interrupt came too late to test a resume"
    second = _cli(*args, cache=cache_dir)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    assert f"{len(before)} skipped" in stderr
    after = {t["task_id"]: (t["seconds"], t["loss_curve"]) for t in _tasks(tasks_dir.parent)}
    assert all(after[task] == row for task, row in before.items())  # committed tasks were not recomputed
    tasks = _tasks(tasks_dir.parent)
    assert len(tasks) == len({t["task_id"] for t in tasks}) == n and all(t["status"] == "ok" for t in tasks)
    samples = ds.dataset(tasks_dir.parent / "samples").to_table(columns=["task_id", "seed"]).to_pylist()
    assert len({(s["task_id"], s["seed"]) for s in samples}) == len(samples) == n * 2


def test_s3_outage_mid_run_loses_nothing(ray_local, s3, cache_dir):
    from dxray.distributed.audit import run_distributed

    cfg = _config(f"s3://{s3.bucket}/outage", cache_dir, "optimize.batch_tasks=1", "targets.top_k=2",
                  "storage.retry_seconds=120")
    outage = []

    def progress(event):
        if isinstance(event, ev.TaskCommitted | ev.TaskFailed) and not outage:
            # Mid-run, on the driver's thread: for 5 s, commits (on their threads) and the actors'
            # image writes hit a dead endpoint; then the server comes back on the same data.
            s3.stop()
            time.sleep(5.0)
            s3.start()
            outage.append(True)

    summary = run_distributed(cfg, progress=progress)
    n = _expected(cfg)
    assert outage and (summary.ok, summary.failed) == (n, 0)
    from dxray.storage.fs import filesystem

    fs, path = filesystem(summary.root, cfg.storage)
    assert len(_tasks(path, fs)) == n
    assert ds.dataset(f"{path}/samples", filesystem=fs).count_rows() == n * cfg.sample.k


@pytest.mark.parametrize("case", ["bad-key", "no-bucket", "wrong-credentials"])
def test_bad_input_is_one_line_before_any_model_or_ray(case, s3, tmp_path):
    """Checked by what the run leaves behind, not by timing it: a fresh cache with nothing built in it
    (the tiny models are built on first use) and no Ray session under RAY_TMPDIR."""
    cache, ray_tmp = tmp_path / "cache", tmp_path / "ray"
    args = ["audit", str(TINY_YAML), f"output=s3://{s3.bucket}/x", f"cache_dir={cache}", "--quiet"]
    env = {"RAY_TMPDIR": str(ray_tmp)}
    if case == "bad-key":
        args.append("optimize.stpes=3")
    elif case == "no-bucket":
        args[2] = "output=s3://no-such-bucket-dxray/x"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-0123456789"
    proc = _cli(*args, cache=cache, env=env)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    expect = {"bad-key": "optimize.stpes", "no-bucket": "no-such-bucket-dxray", "wrong-credentials": "credentials"}[case]
    assert expect in lines[0]
    assert "wrong-secret" not in stderr and s3.secret_key not in stderr
    assert not stdout
    assert not _files(cache), "a model was built before the input was checked"
    assert not ray_tmp.exists(), "Ray was started before the input was checked"


def test_a_good_audit_builds_models_and_starts_ray_where_the_bad_input_test_looks(tmp_path):
    """The other side of the test above: a valid run does leave models in the cache and a Ray session
    under RAY_TMPDIR, so the absence of both there means something."""
    cache = tmp_path / "cache"
    ray_tmp = Path(tempfile.mkdtemp(prefix="dxr-", dir="/tmp")) / "ray"  # short: Ray's socket paths must fit 107 bytes
    proc = _cli("audit", str(TINY_YAML), f"output={tmp_path / 'out'}", f"cache_dir={cache}", *FAST, "--quiet",
                cache=cache, env={"RAY_TMPDIR": str(ray_tmp)})
    stderr = _finish(proc, timeout=400)
    built, started = _files(cache), ray_tmp.exists()
    shutil.rmtree(ray_tmp.parent, ignore_errors=True)
    assert proc.returncode == 0, stderr
    assert built and started


def test_actor_larger_than_the_local_ray_is_a_one_line_error_not_a_hang(tmp_path, cache_dir):
    """A local Ray never grows, so an explainer asking for more CPUs than it has would wait forever."""
    args = ["audit", str(TINY_YAML), f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}", *FAST,
            "cluster.local_cpus=1", "cluster.cpus_per_explainer=2", "--quiet"]
    proc = _cli(*args, cache=cache_dir)
    stderr = _finish(proc, timeout=300)
    assert proc.returncode == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("error: cluster.cpus_per_explainer=2 but the local Ray has 1 CPU(s): lower it "
                         "(or raise cluster.local_cpus)"), stderr


def test_ray_job_submit_runs_the_audit_on_a_started_cluster(tmp_path, cache_dir):
    """`ray start --head` on loopback, `ray job submit ... python jobs/audit.py`, SUCCEEDED, output checked."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = 6390 + os.getpid() % 500
    dash = 8300 + os.getpid() % 500
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DXRAY_CACHE=str(cache_dir))
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="dxr-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                            "--num-cpus=2", "--num-gpus=1", f"--temp-dir={temp}", "--disable-usage-stats",
                            # its own job-agent port: the session's Ray already holds the default 52365
                            f"--dashboard-agent-listen-port={dash + 1}"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr
    try:
        out = tmp_path / "out"
        agent_deadline = time.monotonic() + 300
        while True:  # the head's job agent comes up some seconds after `ray start` returns (longer on a busy box)
            job = subprocess.run([ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir",
                                  str(ROOT), "--", sys.executable, "jobs/audit.py", str(TINY_YAML), f"output={out}",
                                  f"cache_dir={cache_dir}", *FAST],
                                 env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr or time.monotonic() > agent_deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        [job_id] = set(re.findall(r"raysubmit_\w+", job.stdout + job.stderr))
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
        logs = client.get_job_logs(job_id)
        assert "dxray: 4/4 tasks finished (0 failed" in logs  # the summary line reaches `ray job logs`
        [root] = list(out.glob("run-*"))
        cfg = _config(out, cache_dir)
        assert len(_tasks(root)) == _expected(cfg)
        assert (root / "manifest.json").is_file()
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp) -> None:
    """Stop only the cluster under ``temp`` (``ray stop`` would also stop this session's own Ray)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(p.info["cmdline"] or []):
                procs.append(p)
                p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


def test_audit_ranks_features_over_an_image_folder_on_ray(ray_local, tmp_path, cache_dir, monkeypatch):
    """feature_source=images: the audit ranks on Ray Data, writes the ranking, then explains those features."""
    from test_rank_distributed import write_images

    from dxray.distributed.audit import run_distributed

    write_images(tmp_path / "imgs", folders=2, per_folder=3)
    cfg = _config(tmp_path / "out", cache_dir, "targets.feature_source=images",
                  f"targets.feature_images.path={tmp_path / 'imgs'}", "targets.feature_images.select=labelled")
    from dxray.storage.sink import RunSink

    writes = []  # every write of the ranking, on the driver (a spy that writes as it would)
    write = RunSink.write_table

    def spy(self, name, *args, **kwargs):
        if name == "feature_ranking":
            writes.append(self.run_id)
        return write(self, name, *args, **kwargs)

    monkeypatch.setattr(RunSink, "write_table", spy)
    summary = run_distributed(cfg)
    assert (summary.ok, summary.failed) == (_expected(cfg), 0)
    assert len(writes) == 1  # the audit writes the ranking once; the Ray ranker only returns it
    ranking = ds.dataset(f"{summary.root}/feature_ranking").to_table().to_pylist()
    assert {(r["class_index"], r["source"], r["n_images"]) for r in ranking} == {(0, "images-labelled", 3),
                                                                               (1, "images-labelled", 3)}
    features = {(t["class_index"], t["feature_index"]) for t in _tasks(summary.root) if t["kind"] == "feature"}
    assert features == {(r["class_index"], r["feature_index"]) for r in ranking}


@pytest.mark.parametrize(("gpus", "overrides", "expected"), [
    (8, ["cluster.gpus_per_explainer=0.75", "cluster.gpus_per_segmenter=0.25"], 8),  # one per GPU, segmenter in a leftover
    (8, ["cluster.gpus_per_explainer=0.5", "cluster.gpus_per_segmenter=0.25"], 15),  # two per GPU, one gives way
    (2, ["cluster.gpus_per_explainer=1"], 2),  # CPU segmenter (the default)
    (4, ["cluster.gpus_per_explainer=1", "cluster.gpus_per_segmenter=0.5", "cluster.segmenters=2"], 3),
    (4, ["cluster.gpus_per_explainer=2"], 2),
    (0, [], 1),  # CPU-only cluster: one CPU explainer
    (8, ["cluster.explainers=3"], 3),  # explicit (an autoscaling cluster)
])
def test_layout_packs_explainers_per_gpu(gpus, overrides, expected, tmp_path):
    from dxray.distributed.layout import layout

    n, _ = layout(load_config(TINY_YAML, [f"output={tmp_path}", *overrides]), gpus)
    assert n == expected


@pytest.mark.parametrize(("scales_up", "explainers", "expected"), [
    (True, ["cluster.explainers=8"], (8, 0.75)),  # joined cluster at 0 GPUs: the autoscaler adds GPU nodes for them
    (False, ["cluster.explainers=8"], (8, 0.0)),  # a local cluster without GPUs never gets any: CPU explainers
    (True, [], (1, 0.0)),  # no explicit count: nothing to scale for, one CPU explainer
])
def test_layout_keeps_gpu_requests_on_a_cluster_that_scales_from_zero(scales_up, explainers, expected, tmp_path):
    from dxray.distributed.layout import layout

    cfg = load_config(TINY_YAML, [f"output={tmp_path}", "cluster.gpus_per_explainer=0.75", *explainers])
    assert layout(cfg, 0, scales_up=scales_up) == expected


def test_layout_with_no_room_is_a_one_line_error(tmp_path):
    from dxray.distributed.layout import layout

    cfg = load_config(TINY_YAML, [f"output={tmp_path}", "cluster.gpus_per_explainer=1", "cluster.gpus_per_segmenter=0.25"])
    with pytest.raises(DxrayError, match="no room for an explainer"):
        layout(cfg, 1)


def test_explicit_features_load_no_classifier_on_the_driver(tmp_path):
    """Ranking by weights loads the classifier on the driver; with every class's features given, nothing is ranked."""
    from dxray.distributed.audit import ranker

    missing = f"classifier.spec=hf:{tmp_path / 'no-such-classifier'}"
    cfg = load_config(TINY_YAML, [f"output={tmp_path}", missing, "targets.features={0: [1], 1: [2]}"])
    assert ranker(cfg, 0) is None
    half = load_config(TINY_YAML, [f"output={tmp_path}", missing, "targets.features={0: [1]}"])
    with pytest.raises(DxrayError, match="no-such-classifier"):
        ranker(half, 0)  # class 1 is ranked by weights: the classifier is loaded (and is not there)
