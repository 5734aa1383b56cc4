"""The audit on Ray (``dxray audit`` / ``jobs/audit.py``): the same :class:`AuditJob` as ``dxray explain``,
the same config and tables; only how batches run differs.

preflight (no model loaded) → join or start Ray → rank features → plan, skip committed tasks →
explainer + segmenter actors → scheduler → verdicts, classes, manifest (last).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from dxray import progress as events
from dxray.config import Config
from dxray.distributed import scheduler
from dxray.distributed.actors import ExplainerActor, SegmenterActor
from dxray.distributed.cluster import connect
from dxray.distributed.layout import layout
from dxray.errors import DxrayError
from dxray.pipeline import rows
from dxray.pipeline.job import AuditJob, RunSummary
from dxray.pipeline.ranking import choose_ranker

log = logging.getLogger("dxray")

# The scheduler's stages, in the pipeline's stage labels (an explainer's own code raising is its batch's
# optimisation failing: Explainer.explain and package.package turn every other failure into the task's error).
STAGES = {scheduler.EXPLAIN: rows.OPTIMISE, scheduler.SEGMENT: rows.SEGMENT, scheduler.SCHEDULE: rows.SCHEDULE}


def run_distributed(cfg: Config, address: str | None = None, progress: events.Hook | None = None, *,
                    actors: tuple[type, type] = (ExplainerActor, SegmenterActor)) -> RunSummary:
    """The audit on Ray. ``actors``: the explainer and segmenter classes (``benchmarks/scale.py`` runs the
    real driver with simulated ones of the same interface)."""
    import ray

    cfg = _pin_storage(cfg)
    job = AuditJob(cfg, "audit")
    job.preflight()  # every check that needs no model, storage reachability included
    _check(cfg)
    emit = progress or events.silent
    emit(events.Preflighted())  # Ray starts next
    where = connect(cfg.cluster, address)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    n, gpe = layout(cfg, gpus, scales_up=where != "local")
    if gpe and not gpus:
        log.warning("dxray: the cluster has no GPU yet; %d explainer(s) of %g GPU wait for the autoscaler to add GPU "
                    "nodes (cluster.gpus_per_explainer=0 runs them on CPUs)", n, gpe)
    job.prepare(ranker(cfg, gpus))
    emit(job.planned(explainers=n, cluster=where))
    segmenters = 0  # started in this session (none when every task was committed before)
    if job.todo:
        with _actors(cfg, job.sink.run_id, n, gpe, gpus, actors) as (explainers, segs):
            segmenters = len(segs)
            emit(events.ActorsStarted(n, gpe, segmenters))
            c = cfg.cluster
            sched = scheduler.Scheduler(explainers, segs, **_callables(job), in_flight_per_actor=c.in_flight_per_actor,
                                        task_retries=c.task_retries, log_every_s=c.log_every_s, progress=emit)
            for row in sched.run(job.todo, cfg.optimize.batch_tasks):
                job.count(row)
    return job.finish(f"ray ({where}): {n} explainer(s) x {gpe:g} GPU",
                      extra={"cluster": {"explainers": n, "gpus_per_explainer": gpe, "segmenters": segmenters}})


def _callables(job: AuditJob) -> dict:
    """What the scheduler calls: its items are TaskSpecs, its results Finished tasks (the explainer
    actors' ``run`` returns them with the images to score); every row goes through ``job.commit``."""

    def fail(spec, finished, stage: str, message: str) -> dict:
        stage = STAGES[stage]
        if finished is not None and stage == rows.SEGMENT:  # explained: its row, with the segmenter's error
            return rows.brief(job.commit(finished, None, rows.error_text(stage, message)))
        return rows.brief(job.commit(rows.error_row(job.sink.run_id, spec, stage, message)))

    return {"explain": lambda actor, specs: actor.run.options(num_returns=2).remote(specs),
            "score": lambda actor, images, finished: actor.score.remote(images, [f.prompts for f in finished]),
            "needs_scoring": lambda finished: bool(finished.prompts),
            "commit": lambda finished, scores: rows.brief(job.commit(finished, scores)), "fail": fail}


@contextmanager
def _actors(cfg: Config, run_id: str, n: int, gpe: float, gpus: float,
            classes: tuple[type, type]) -> Iterator[tuple[list, list]]:
    """The run's explainer and segmenter actors, once one of each kind is ready; killed on the way out."""
    import ray

    c = cfg.cluster
    opts = dict(max_restarts=-1, max_task_retries=0)
    explainers, segmenters = [], []
    try:
        explainer_cls, segmenter_cls = classes
        explainers = [ray.remote(explainer_cls).options(
            num_gpus=gpe, num_cpus=c.cpus_per_explainer, name=f"dxray-explainer-{run_id}-{i}",
            **opts).remote(cfg, run_id) for i in range(n)]
        if cfg.segment.enabled:
            segmenters = [ray.remote(segmenter_cls).options(
                num_gpus=c.gpus_per_segmenter if gpus or gpe else 0, num_cpus=c.cpus_per_segmenter,
                name=f"dxray-segmenter-{run_id}-{i}", **opts).remote(cfg) for i in range(c.segmenters)]
        _first_ready(explainers, "explainer")
        _first_ready(segmenters, "segmenter")
        yield explainers, segmenters
    finally:
        for actor in explainers + segmenters:
            ray.kill(actor, no_restart=True)


def _check(cfg: Config) -> None:
    if cfg.segment.enabled and cfg.cluster.segmenters == 0:
        raise DxrayError("cluster.segmenters is 0 but segment.enabled is true; set cluster.segmenters >= 1 "
                         "or segment.enabled=false")


def ranker(cfg: Config, gpus: float):
    """The audit's ranker (:func:`dxray.pipeline.ranking.choose_ranker`): over the image folder it runs on Ray Data
    in the cluster the audit already joined; ranking by weights loads the classifier on the driver's CPU."""
    from dxray import models
    from dxray.distributed.rank import OnRay, default_actors

    return choose_ranker(cfg.targets, lambda: models.load_classifier(cfg.classifier, device="cpu", cache_dir=cfg.cache_dir),
                         on_ray=lambda: OnRay(cfg, default_actors(cfg.cluster, gpus)))


def _pin_storage(cfg: Config) -> Config:
    """Resolve the S3 endpoint and region from the driver's environment into the config the actors
    get, so worker nodes without those variables write to the same place. Credentials are not copied:
    workers take theirs from their own environment or instance role."""
    import os

    from dxray.storage.fs import endpoint_url

    region = cfg.storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"endpoint_url": endpoint_url(cfg.storage), "region": region})})


def _first_ready(actors: list, what: str) -> None:
    """Wait until one actor of a kind has loaded its models: a constructor that fails (a bad model
    path, a missing package on the workers) is a one-line error, not a run of failed tasks. The
    others join as they come up (an autoscaling cluster may still be adding their nodes)."""
    import ray

    if not actors:
        return
    refs = [a.ready.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=1)
    try:
        ray.get(ready[0])
    except Exception as err:
        cause = getattr(err, "cause", None) or err
        cause = getattr(cause, "cause", None) or cause
        first = next((ln for ln in reversed(str(cause).splitlines()) if ln.strip()), type(cause).__name__)
        raise DxrayError(f"the {what} actor failed to start: {first.strip()}") from None
