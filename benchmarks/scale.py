"""A full-ImageNet audit at its real size, simulated end to end (issue 18).

The real driver (``run_distributed``: preflight, plan, the scheduler, commits through the sink, finish),
resume, report and the analytics recipes of docs/analytics.md, over 1000 classes × (1 class + 5 feature
tasks) × 10 samples, on a local Ray. Only the model calls are simulated: the explainer actors are the real
``ExplainerActor`` with a stand-in for the generator + classifier that returns optimisation results and
images after a fixed simulated work time (the real ``package`` then writes full-size PNGs and builds the
rows), and the segmenter actors are the real ``SegmenterActor`` with a stand-in segmenter.

The run is interrupted half way (as a driver that is stopped), planned again (resume of a half-finished
run), resumed to the end, planned again (resume of a finished run) and finished again (finalize). Each
storage backend runs in its own process: local disk, then a SeaweedFS S3 server on loopback.

    python benchmarks/scale.py                      # both backends, 1000 classes (~10-20 min on 2 cores)
    python benchmarks/scale.py --classes 50 --storage local   # a quick look

Figures go to benchmarks/results/scale.json (see benchmarks/README.md for the table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS server helper and the analytics-doc runner
TARGETS = {"driver_ms_per_task": 5.0, "driver_peak_rss_mb": 2048, "plan_finished_s_s3": 30.0, "finalize_s": 60.0,
           "files_per_table": 16}


# -- simulated model calls (the real actor classes around them) -------------------------------------
class _Device:
    device = "cpu (simulated)"


class _SimExplainer:
    """Stands in for generator + classifier: one result per task and K images, after ``work`` s per task."""

    def __init__(self, cfg, work: float):
        self.cfg, self.work = cfg, work
        self.generator, self.classifier = _Device(), None

    def explain(self, specs, on_step=None):
        import torch

        from dxray.optimize import OptimizeResult, Sample
        from dxray.pipeline.rows import Outcome

        time.sleep(self.work * len(specs))
        out = []
        steps = self.cfg.optimize.steps
        for spec in specs:
            rng = np.random.default_rng(spec.seed)
            res = OptimizeResult(rows=torch.zeros(self.cfg.prompt.n_tokens, 768), init_seed=spec.seed,
                                 loss_curve=list(np.linspace(3.0, 0.5, steps)), prob_curve=[0.5] * steps,
                                 train_seeds=[[2**31 + i] for i in range(steps)], seconds=self.work)
            res.start_rows, res.baseline_prob = res.rows, 0.1
            samples = [Sample(seed, _image(rng, self.cfg.generator.resolution), float(rng.random()),
                              float(rng.random()) if spec.feature_index is not None else None)
                       for seed in self.cfg.sample.seed_list()]
            out.append(Outcome(spec, res, samples, None))
        return out


def _image(rng, side: int) -> np.ndarray:
    """A smooth image with an object-like block: a realistic shape and PNG size, cheap to make."""
    y, x = np.mgrid[0:side, 0:side]
    base = rng.integers(0, 256, 3)
    img = ((x[..., None] * base / side + y[..., None] * (255 - base) / side) / 2).astype(np.uint8)
    a, b = sorted(rng.integers(0, side, 2))
    img[a:b, a:b] = rng.integers(0, 256, 3)
    return img


def _sim_segment(images, prompts):
    from dxray.segment import Segmentation, rle_encode

    out = []
    for img in images:
        mask = img[..., 0] > 128
        out.append(Segmentation(float(mask.mean()), rle_encode(mask), [[0.0, 0.0, 10.0, 10.0]], [0.9]))
    return out


def _actor_classes(work: float):
    from dxray.distributed.actors import ExplainerActor, SegmenterActor
    from dxray.storage.sink import RunSink

    class SimExplainerActor(ExplainerActor):
        def __init__(self, cfg, run_id):  # the real actor, less the models
            self.cfg = cfg
            self.explainer = _SimExplainer(cfg, work)
            self.sink = RunSink(cfg.output, run_id, storage=cfg.storage)

    class SimSegmenterActor(SegmenterActor):
        def __init__(self, cfg):
            self.segmenter = _sim_segment

    return SimExplainerActor, SimSegmenterActor


# -- the run ----------------------------------------------------------------------------------------
def _config(output: str, classes: int, resolution: int):
    from dxray.config import load_config

    features = "{" + ", ".join(f"{c}: [{', '.join(str((c * 7 + r * 13) % 2048) for r in range(5))}]"
                               for c in range(classes)) + "}"
    return load_config(ROOT / "jobs" / "configs" / "imagenet_full.yaml", [
        f"output={output}", f"targets.classes={list(range(classes))}", f"targets.features={features}",
        "targets.feature_source=weights", "classifier.spec=torchvision:resnet50", "classifier.weights=DEFAULT",
        f"generator.resolution={resolution}", "device=cpu", "cluster.explainers=2", "cluster.gpus_per_explainer=0",
        "cluster.cpus_per_explainer=0", "cluster.cpus_per_segmenter=0", "cluster.segmenters=1",
        "cluster.local_gpus=0", "cluster.log_every_s=60",
        "segment.control=false"])  # the 6,000 tasks (the segmenter controls would add 1,000 cheap ones)


class _Stop(KeyboardInterrupt):
    pass


def _timed(f):
    t0, c0 = time.perf_counter(), time.process_time()
    out = f()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _plan_seconds(cfg) -> tuple[float, int]:
    from dxray.pipeline.job import AuditJob

    def plan():
        job = AuditJob(cfg, "audit")
        job.preflight()
        return len(job.prepare())

    todo, wall, _ = _timed(plan)
    return wall, todo


def _files(sink, table: str) -> int:
    from pyarrow import fs as pafs

    infos = sink.fs.get_file_info(pafs.FileSelector(f"{sink.root}/{table}", recursive=True))
    return sum(i.type == pafs.FileType.File for i in infos)


def _analytics(run: str, s3: bool) -> dict:
    import contextlib
    import io

    from test_analytics_docs import blocks, execute

    from dxray.runs import open_run

    has = {name: open_run(run).read_table(name, columns=["run_id"]) is not None for name in ("comparison",)}
    seconds = {}
    for block_id, _section, code in blocks():
        if (block_id.startswith("s3")) != s3:
            continue
        if any(f"/{name}/" in code and not there for name, there in has.items()):
            continue  # a block about `dxray compare`'s table: this run was compared with nothing
        with contextlib.redirect_stdout(io.StringIO()):
            _, wall, _ = _timed(lambda code=code: execute(code, run))
        seconds[block_id] = round(wall, 2)
    return seconds


def _rss_mb() -> int:
    """Peak resident memory of this (the driver's) process so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure(storage: str, classes: int, work: float, resolution: int) -> dict:
    from dxray import progress as ev
    from dxray.distributed.audit import run_distributed
    from dxray.report import build_report
    from dxray.runs import open_sink

    tmp = Path(tempfile.mkdtemp(prefix="dxray-scale-"))
    server = None
    if storage == "s3":  # before Ray starts: its workers inherit the credentials
        from s3server import S3Server

        server = S3Server(tmp / "weed").start()
        server.make_bucket("scale")
        os.environ.update(server.env())
        output = "s3://scale/audits"
    else:
        output = str(tmp / "out")
    try:
        cfg = _config(output, classes, resolution)
        actors = _actor_classes(work)
        total = classes * 6
        done = {"n": 0}

        steady = {"cpu": 0.0, "tasks": 0}  # driver CPU between a run's first and last committed task

        def stop_half_way(event):
            if isinstance(event, ev.TaskCommitted | ev.TaskFailed):
                done["n"] += 1
                track(event)
                if done["n"] >= total // 2:
                    raise _Stop

        def track(event, mark={}):  # noqa: B006 - one run's first-task mark
            if isinstance(event, ev.TaskCommitted | ev.TaskFailed):
                now = time.process_time()
                if "cpu" in mark:
                    steady["cpu"] += now - mark["cpu"]
                    steady["tasks"] += 1
                mark["cpu"] = now
            elif isinstance(event, ev.Done):
                mark.clear()

        first_wall = time.perf_counter()
        c0 = time.process_time()
        try:
            run_distributed(cfg, progress=stop_half_way, actors=actors)
        except _Stop:
            pass
        first_cpu, first_wall = time.process_time() - c0, time.perf_counter() - first_wall
        plan_half, todo_half = _plan_seconds(cfg)
        track(ev.Done(""))
        summary, second_wall, second_cpu = _timed(lambda: run_distributed(cfg, progress=track, actors=actors))
        rss = {"run": _rss_mb()}
        plan_done, todo_done = _plan_seconds(cfg)
        sink = open_sink(cfg)

        def finalize():
            from dxray.pipeline.job import AuditJob

            job = AuditJob(cfg, "audit")
            job.preflight()
            job.prepare()
            return job.finish("simulated")

        _, finalize_s, _ = _timed(finalize)
        rss["finalize"] = _rss_mb()
        files = {t: _files(sink, t) for t in ("tasks", "samples")}
        rows = {t: sink.read_table(t, columns=["task_id"]).num_rows for t in ("tasks", "samples")}
        report_dir = tmp / "report"
        report_dir.mkdir()
        _, report_s, _ = _timed(lambda: build_report(sink.uri(""), report_dir / "report.html"))
        report_files = [p for p in report_dir.rglob("*") if p.is_file()]
        rss["report"] = _rss_mb()
        analytics = _analytics(sink.uri(""), storage == "s3")
        rss["analytics"] = _rss_mb()
        # The first run stops when its hook has seen half the tasks, but commits already started on the commit
        # threads still finish: it ran every task the second run found done (done["n"] undercounts them).
        tasks_run = (total - todo_half) + summary.ok + summary.failed
        return {
            "storage": "SeaweedFS S3 on 127.0.0.1" if server else "local disk", "classes": classes, "tasks": total,
            "samples_per_task": cfg.sample.k, "simulated_work_s_per_task": work, "image_px": resolution,
            "tasks_committed": tasks_run, "rows": rows, "failed": summary.failed,
            "driver_ms_per_task": round((first_cpu + second_cpu) / tasks_run * 1e3, 2),
            "driver_ms_per_task_steady": round(steady["cpu"] / max(steady["tasks"], 1) * 1e3, 2),
            "wall_ms_per_task": round((first_wall + second_wall) / tasks_run * 1e3, 2),
            "driver_peak_rss_mb": rss["run"], "peak_rss_mb_after": rss,
            "plan_half_finished_s": round(plan_half, 2), "todo_half_finished": todo_half,
            "plan_finished_s": round(plan_done, 2), "todo_finished": todo_done,
            "finalize_s": round(finalize_s, 2), "files_per_table": files,
            "report_s": round(report_s, 2), "report_bytes": sum(p.stat().st_size for p in report_files),
            "report_files": len(report_files),
            "report_largest_bytes": max((p.stat().st_size for p in report_files), default=0),
            "analytics_s": analytics,
        }
    finally:
        import ray

        ray.shutdown()
        if server:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--storage", default="local,s3", help="local, s3 or both (comma-separated)")
    ap.add_argument("--work", type=float, default=0.0, help="simulated model seconds per task (0: driver-bound)")
    ap.add_argument("--resolution", type=int, default=128,
                    help="side of the simulated images; the driver sees only 64-px thumbnails at any size")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="scale.json")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.child:  # one backend in this process (Ray and the S3 credentials are per process)
        print(json.dumps(measure(a.child, a.classes, a.work, a.resolution)))
        return
    runs = []
    for storage in a.storage.split(","):
        cmd = [sys.executable, __file__, "--child", storage, "--classes", str(a.classes), "--work", str(a.work),
               "--resolution", str(a.resolution)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"scale.py --child {storage} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1], indent=1), flush=True)
    doc = {"benchmark": "scale", "targets": TARGETS, "runs": runs,
           "command": f"python benchmarks/scale.py --classes {a.classes} --storage {a.storage}",
           "machine": f"{os.cpu_count()} CPU cores"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / a.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
