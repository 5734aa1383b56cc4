"""A cluster that grows, shrinks and loses nodes: the audit under a real Ray autoscaler on this machine.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``, ``ray start --head --autoscaling-config=FILE``,
tests/fixtures/fake_cluster.yaml) runs the real autoscaler (the monitor process on the head): it
starts each worker "node" as a real raylet on this machine when tasks or actors wait for resources no
node has, and stops it after the idle timeout. The head is CPU-only, as in cluster/aws.yaml; the worker
type carries one logical GPU, so explainer actors (1 GPU each) can only run on nodes the autoscaler adds.
The job goes in with ``ray job submit``, as on a real cluster.

What the fake provider does not do (real GPUs, boot latency, spot notices, separate hosts) is in the
README's "Run on a cluster".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest
import yaml
from conftest import ROOT, TINY_YAML

pytestmark = pytest.mark.timeout(600)
FIXTURE = ROOT / "tests" / "fixtures" / "fake_cluster.yaml"
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
WORKER_TYPE = "gpu_worker"
FAST = ["optimize.steps=2", "sample.k=2", "device=cpu", "cluster.log_every_s=2"]
# The cluster's clocks, shortened for a test: the autoscaler updates every second (default 5 s) and
# terminates (and, if work waits, replaces) a node whose raylet has not reported for 10 s (default 30 s);
# the GCS health-checks raylets every second (default 3 s) and declares a node dead after 5 failed checks.
CLUSTER_ENV = {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",
               "RAY_health_check_period_ms": "1000"}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class FakeCluster:
    temp: str  # the cluster's --temp-dir: every process of this cluster (head and workers) names it
    dashboard: str  # http://127.0.0.1:PORT (jobs and the state API)
    env: dict
    log: list = field(default_factory=list)  # (seconds since submit, alive worker node ids) snapshots

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, limit=1000, raise_on_missing_output=False)

    def workers(self, alive: bool = True) -> list:
        """The autoscaler's worker nodes (every node but the head), alive ones or all."""
        return [n for n in self.nodes() if not n.is_head_node and (n.state == "ALIVE" or not alive)]

    def monitor_log(self) -> str:
        return (Path(self.temp) / "session_latest" / "logs" / "monitor.log").read_text(errors="replace")

    def submit(self, *args: str) -> str:
        """`ray job submit --no-wait ... python jobs/audit.py TINY ARGS`; returns the job id.

        The working dir is ``local://`` this checkout, used in place on every node. Uploading it (``--working-dir
        .``, what the README does on a real cluster) breaks here: every fake node unpacks the package into the
        head's one session folder, and each new node's runtime-env agent deletes and re-extracts it
        (``overwrite=True`` in Ray's working_dir plugin) under the running driver and actors, whose working
        directory then no longer exists (FileNotFoundError from os.getcwd in an actor's imports)."""
        deadline = time.monotonic() + 300
        while True:  # the head's job agent comes up some seconds after `ray start` returns
            job = subprocess.run([RAY, "job", "submit", "--no-wait", f"--address={self.dashboard}",
                                  "--working-dir", f"local://{ROOT}", "--", sys.executable, "jobs/audit.py", str(TINY_YAML),
                                  *args], env=self.env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        [job_id] = set(re.findall(r"raysubmit_\w+", job.stdout + job.stderr))
        return job_id

    def wait(self, job_id: str, timeout: float, each=None) -> str:
        """Poll the job to its end, recording the alive worker nodes each second (and calling ``each``)."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self.log.append((time.monotonic() - start, sorted(n.node_id for n in self.workers())))
            if each is not None:
                each()
            status = client.get_job_status(job_id)
            if status.is_terminal():
                return client.get_job_logs(job_id)
            time.sleep(1.0)
        client.stop_job(job_id)
        pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s; log tail:\n{client.get_job_logs(job_id)[-3000:]}")

    def status(self, job_id: str):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard).get_job_status(job_id)


def _start(cache_dir) -> FakeCluster:
    port, dash, agent, agent_grpc, client, runtime_env, metrics = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="dxr-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    config = yaml.safe_load(FIXTURE.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"  # else the provider's nodes look for port 6379
    (Path(temp) / "autoscaling.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DXRAY_CACHE=str(cache_dir), RAY_FAKE_CLUSTER="1",
               **CLUSTER_ENV)
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                            "--num-cpus=0", "--num-gpus=0", "--object-store-memory=100000000",
                            f"--temp-dir={temp}", "--disable-usage-stats",
                            f"--autoscaling-config={temp}/autoscaling.yaml",
                            # free ports of its own: the session's Ray (and others' tests) hold the defaults
                            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                            f"--ray-client-server-port={client}", f"--runtime-env-agent-port={runtime_env}",
                            f"--metrics-export-port={metrics}"],
                           env=env, capture_output=True, text=True, timeout=180)
    cluster = FakeCluster(temp, f"http://127.0.0.1:{dash}", env)
    if start.returncode != 0:
        _stop_cluster(temp)
        pytest.fail(f"ray start failed: {start.stderr[-3000:]}")
    return cluster


def _stop_cluster(temp) -> None:
    """Stop only the processes of the cluster under ``temp``, the autoscaler's worker nodes included (they
    use the head's temp dir); ``ray stop`` would also stop this session's own Ray."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and str(temp) in " ".join(p.info["cmdline"] or []):
                procs.append(p)
                p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)  # a throw-away cluster: no need to wait for a clean exit
    for p in alive:
        p.kill()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_cluster(cache_dir):
    cluster = _start(cache_dir)
    try:
        yield cluster
    finally:
        _stop_cluster(cluster.temp)


def _node_processes(cluster: FakeCluster, node_id: str) -> list[psutil.Process]:
    """Every process of one worker node: its raylet (``--node_id=ID``) and what the raylet started (its
    workers, the actors among them, and its agents, which name the node or the raylet's socket)."""
    raylet = None
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if cmd and cmd[0].endswith("/raylet") and f"--node_id={node_id}" in cmd and cluster.temp in " ".join(cmd):
                raylet = p
        except psutil.Error:
            pass
    assert raylet is not None, f"no raylet for node {node_id}"
    return [raylet, *raylet.children(recursive=True)]


def _tables(root: Path) -> tuple[list, list]:
    tasks = ds.dataset(root / "tasks", format="parquet").to_table(columns=["task_id", "status"]).to_pylist()
    samples = ds.dataset(root / "samples", format="parquet").to_table(columns=["task_id", "seed"]).to_pylist()
    return tasks, samples


def _plan(overrides: list[str]) -> tuple[int, str]:
    """(tasks planned, run id) of the audit with these overrides, computed here, not read from the run."""
    from dxray.config import load_config

    cfg = load_config(TINY_YAML, overrides)
    t = cfg.targets
    return len(t.classes) * ((1 if t.class_task else 0) + t.top_k), cfg.resolved_run_id()


def _explainer_actors(cluster: FakeCluster, run_id: str) -> dict:
    """name -> state (node_id, pid: where it runs or ran last) of the run's explainer actors."""
    from ray.util.state import list_actors

    return {a.name: a for a in list_actors(address=cluster.dashboard, limit=10_000, detail=True,
                                           raise_on_missing_output=False)
            if (a.name or "").startswith(f"dxray-explainer-{run_id}-")}


@pytest.fixture(scope="module")
def shrinking_run(fake_cluster, tmp_path_factory, cache_dir) -> dict:
    """One audit submitted to the cluster while it has no worker node, with ``cluster.explainers=2``; one
    of its two GPU nodes is lost mid-run; then the cluster is watched until it is back to no worker node.

    The loss: once tasks are being committed and both explainers are up, every process of explainer 0's
    node (raylet, actor, agents) is SIGKILLed, as when a spot node is taken away. So that the run cannot
    simply finish on the surviving node before the autoscaler acts, explainer 1 is frozen (SIGSTOP) at the
    same moment and thawed once the lost explainer, restarted on a new node, has committed a task."""
    c = fake_cluster
    record: dict = {"workers_at_start": c.workers(),
                    "gpus_at_start": sum(n.resources_total.get("GPU", 0) for n in c.nodes())}
    out = tmp_path_factory.mktemp("shrinking") / "out"
    overrides = [f"output={out}", f"cache_dir={cache_dir}", *FAST, "cluster.explainers=2", "targets.top_k=5",
                 "optimize.batch_tasks=1"]  # 12 tasks, one a batch
    n, run_id = _plan(overrides)
    job_id = c.submit(*overrides)
    state: dict = {}

    def parts() -> int:
        return len(list(out.glob("run-*/tasks/part-*.parquet")))

    def lose_a_node_mid_run():
        if not state and parts():  # committing, and (below) both explainers up: both have batches in flight
            actors = _explainer_actors(c, run_id)
            if len(actors) < 2 or any(a.state != "ALIVE" for a in actors.values()):
                return
            [victim, survivor] = sorted(actors)  # explainer 0's node goes, explainer 1 is frozen
            state.update(placed={name: a.node_id for name, a in actors.items()},
                         before={w.node_id: w for w in c.workers()}, log_before=list(c.log))
            for p in _node_processes(c, actors[victim].node_id):
                _signal(p, signal.SIGKILL)
            frozen = psutil.Process(actors[survivor].pid)
            _signal(frozen, signal.SIGSTOP)
            state.update(victim=victim, node=actors[victim].node_id, frozen=frozen, at=time.monotonic(),
                         parts=parts())
        elif state and "back" not in state:  # the lost explainer restarted (models loaded) on a new node
            a = _explainer_actors(c, run_id)[state["victim"]]
            if a.state == "ALIVE" and a.node_id not in state["before"]:
                state.update(back=time.monotonic() - state["at"], parts_when_back=parts())
        if state and "thawed" not in state:
            # thaw once the restarted explainer has committed a task on its own (or give up waiting)
            if ("back" in state and parts() > state["parts_when_back"]) or time.monotonic() - state["at"] > 180:
                _signal(state["frozen"], signal.SIGCONT)
                state.update(thawed=time.monotonic() - state["at"],
                             by_replacement=parts() - state.get("parts_when_back", parts()))

    try:
        logs = c.wait(job_id, timeout=360, each=lose_a_node_mid_run)
    finally:
        if "frozen" in state:
            _signal(state["frozen"], signal.SIGCONT)
    record.update(state=state, logs=logs, status=c.status(job_id).name, n=n, run_id=run_id,
                  roots=list(out.glob("run-*")), nodes={w.node_id: w for w in c.workers(alive=False)})
    deadline = time.monotonic() + 120  # idle_timeout_minutes is 0.1: the nodes should go within seconds
    while c.workers() and time.monotonic() < deadline:
        time.sleep(1.0)
    record.update(workers_at_end=c.workers(), monitor_log=c.monitor_log())
    return record


def test_audit_scales_gpu_workers_up_from_zero_and_back_down(shrinking_run):
    r = shrinking_run
    assert r["workers_at_start"] == [] and r["gpus_at_start"] == 0, "the cluster must start with no GPU node"
    assert r["status"] == "SUCCEEDED", r["logs"][-3000:]
    n = r["n"]
    assert f"dxray: {n}/{n} tasks finished (0 failed" in r["logs"]
    state = r["state"]
    assert state, "the run ended before both explainers were up and committing"
    # up: the autoscaler added one GPU node per explainer (never more), and the explainers ran on them
    assert max(len(ids) for _, ids in state["log_before"]) == 2, state["log_before"]
    assert len(state["before"]) == 2 and all(w.resources_total.get("GPU") == 1 for w in state["before"].values())
    assert set(state["placed"].values()) == set(state["before"]), state["placed"]
    # down: every worker node removed once idle past idle_timeout_minutes, by the autoscaler's idle rule
    assert r["workers_at_end"] == []
    assert re.search(rf"Removing \d+ nodes of type {WORKER_TYPE} \(idle\)", r["monitor_log"])


def test_a_lost_worker_node_is_replaced_and_every_task_and_sample_lands_once(shrinking_run):
    r = shrinking_run
    state, n, logs = r["state"], r["n"], r["logs"]
    assert r["status"] == "SUCCEEDED", logs[-3000:]
    assert state and state["parts"] < n, "the node was lost too late to test anything"
    assert "re-submitting" in logs  # the lost node's batches in flight went round again
    assert f"dxray: {n}/{n} tasks finished (0 failed" in logs
    # the autoscaler replaced the node: a new GPU node, and the lost explainer restarted on it did work
    assert "back" in state, "the lost explainer never came back on a new node"
    assert state["by_replacement"] > 0, "the restarted explainer committed nothing while it alone could work"
    nodes = r["nodes"]
    assert nodes[state["node"]].state == "DEAD"
    new = set(nodes) - set(state["before"])
    assert new and all(nodes[i].resources_total.get("GPU") == 1 for i in new)
    [root] = r["roots"]
    tasks, samples = _tables(root)
    assert len(tasks) == len({t["task_id"] for t in tasks}) == n and all(t["status"] == "ok" for t in tasks)
    assert len(samples) == len({(s["task_id"], s["seed"]) for s in samples}) == n * 2


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass
