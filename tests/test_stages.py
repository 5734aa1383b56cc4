"""A failing stage reads the same in the tasks table whichever runner hit it: in-process (``dxray explain``)
or on Ray (the explainer actor's code and the Ray runner's scheduler callbacks)."""

import pytest

from dxray.pipeline.job import AuditJob
from dxray.pipeline.local import LocalRunner, run
from dxray.pipeline.ranking import choose_ranker
from dxray.storage.sink import RunSink

ONE_TASK = ["targets.classes=[0]", "targets.top_k=0", "sample.baseline=false"]


def _config(tiny_config, *overrides):
    from conftest import TINY_YAML

    from dxray.config import load_config

    base = [f"output={tiny_config.output}", f"cache_dir={tiny_config.cache_dir}", "optimize.steps=2", "sample.k=2",
            "device=cpu"]
    return load_config(TINY_YAML, [*base, *ONE_TASK, *overrides])


def _block_images(cfg) -> None:
    """A file where the run's images/ folder goes: every image write fails, for real."""
    root = RunSink(cfg.output, cfg.resolved_run_id()).root
    from pathlib import Path

    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "images").write_text("not a folder")


def _errors(cfg) -> list[str]:
    table = RunSink(cfg.output, cfg.resolved_run_id()).read_table("tasks")
    return table.column("error").to_pylist()


def test_a_failed_image_write_reads_the_same_in_process_and_on_an_explainer_actor(tiny_config):
    from dxray.distributed.actors import ExplainerActor

    cfg = _config(tiny_config)
    _block_images(cfg)
    summary = run(cfg)
    assert (summary.ok, summary.failed) == (0, 1)
    [in_process] = _errors(cfg)

    actor = ExplainerActor(cfg, cfg.resolved_run_id())  # the class Ray runs, called directly
    job = AuditJob(cfg, "audit")
    job.prepare(choose_ranker(cfg.targets, lambda: actor.explainer.classifier))
    [finished], [images] = actor.run(job.specs)
    on_ray = finished.task_row["error"]
    assert images == [] and finished.sample_rows == []
    for error in (in_process, on_ray):
        assert error.startswith("writing images failed: "), error
    assert in_process.split(":")[:2] == on_ray.split(":")[:2]  # same label, same exception type


def test_a_failed_segmentation_reads_the_same_in_process_and_through_the_ray_runner(tiny_config):
    from dxray.distributed import scheduler
    from dxray.distributed.audit import _callables
    from dxray.pipeline.package import package

    cfg = _config(tiny_config)
    runner = LocalRunner(cfg)

    def broken(images, prompts):  # a segmenter whose model raises: a fault no real input makes on demand
        raise RuntimeError("CUDA error: device-side assert triggered")

    runner.segmenter = broken
    summary = run(cfg, runner=runner)
    assert (summary.ok, summary.failed) == (0, 1)
    [in_process] = _errors(cfg)
    assert in_process == "segmentation failed: RuntimeError: CUDA error: device-side assert triggered"

    # The Ray runner gets the same failure from the scheduler as (stage, message) with the explained task.
    ray_cfg = _config(tiny_config, "run_id=on-ray")
    job = AuditJob(ray_cfg, "audit")
    job.prepare(choose_ranker(cfg.targets, lambda: runner.classifier))
    [outcome] = runner.explainer.explain(job.todo)
    finished, images = package(outcome, job.sink)
    assert images and finished.prompts
    row = _callables(job)["fail"](job.todo[0], finished, scheduler.SEGMENT,
                                  "RuntimeError: CUDA error: device-side assert triggered")
    assert row["error"] == in_process and row["status"] == "error"
    # The optimisation result is kept in the committed row (the scheduler gets a brief copy of it).
    [stored] = job.sink.read_table("tasks").to_pylist()
    assert stored["task_id"] == row["task_id"] and stored["error"] == in_process
    assert stored["final_loss"] == pytest.approx(finished.task_row["final_loss"]) and stored["loss_curve"]


@pytest.mark.parametrize(("stage", "message", "expected"), [
    ("explain", "DxrayError: unknown layer 'x'", "optimisation failed: DxrayError: unknown layer 'x'"),
    ("schedule", "gave up after 4 attempts: explainer 0 failed (ActorDiedError)",
     "gave up after 4 attempts: explainer 0 failed (ActorDiedError)"),
])
def test_the_ray_runners_other_failures_get_the_pipelines_labels(tiny_config, tmp_path, stage, message, expected):
    from dxray.distributed.audit import _callables
    from dxray.pipeline.ranking import rank_features
    from dxray.pipeline.tasks import plan

    cfg = _config(tiny_config)
    job = AuditJob(cfg, "audit", sink=RunSink(str(tmp_path), "r"))
    info = job.preflight()
    [spec] = plan(cfg, info, rank_features(cfg.targets, None))
    row = _callables(job)["fail"](spec, None, stage, message)
    assert (row["status"], row["error"], row["task_id"]) == ("error", expected, spec.task_id)
    assert RunSink(str(tmp_path), "r").read_table("tasks").column("error").to_pylist() == [expected]
