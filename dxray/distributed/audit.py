"""The audit on Ray (``dxray audit`` / ``jobs/audit.py``): same config, same tables as ``dxray explain``.

validate (no model loaded) → join or start Ray → rank features → plan, skip committed tasks →
explainer + segmenter actors → scheduler → verdicts, classes, manifest (last).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from dxray import audit
from dxray.config import Config
from dxray.distributed.actors import ExplainerActor, SegmenterActor
from dxray.distributed.cluster import connect
from dxray.distributed.scheduler import SEGMENT, Scheduler
from dxray.errors import DxrayError

log = logging.getLogger("dxray")


def layout(cfg: Config, cluster_gpus: float, scales_up: bool = False) -> tuple[int, float]:
    """(explainer count, GPUs per explainer): as many explainers of ``gpus_per_explainer`` as fit beside
    the segmenters. A fractional request must fit on one GPU (Ray never splits an actor across GPUs),
    so packing is per GPU. A CPU-only cluster gets one CPU explainer unless told otherwise; on a cluster
    that ``scales_up`` (one we joined, not a local one) explicit ``cluster.explainers`` keep their GPUs even
    while it has none, so the autoscaler adds GPU nodes for them."""
    import math

    c = cfg.cluster
    gpe = c.gpus_per_explainer if cluster_gpus > 0 or (scales_up and c.explainers is not None) else 0.0
    if c.explainers is not None:
        return c.explainers, gpe
    if gpe == 0:
        return 1, 0.0
    gpus = int(cluster_gpus + 1e-9)
    segs = c.segmenters if cfg.segment.enabled and c.gpus_per_segmenter > 0 else 0
    gps = c.gpus_per_segmenter
    if gpe >= 1:
        n = int((gpus - math.ceil(segs * gps - 1e-9)) / gpe + 1e-9)
    else:
        per = [int(1 / gpe + 1e-9)] * gpus  # explainers on each GPU
        free = [1 - k * gpe for k in per]
        for _ in range(segs):  # each segmenter into a GPU's leftover, else in place of an explainer
            fits = [g for g in range(gpus) if free[g] + 1e-9 >= gps]
            if not fits:
                g = max(range(gpus), key=lambda g: (per[g], free[g]), default=None)
                if g is None or per[g] == 0:
                    break
                per[g] -= 1
                free[g] += gpe
                fits = [g] if free[g] + 1e-9 >= gps else []
            if fits:
                free[fits[0]] -= gps
        n = sum(per)
    if n < 1:
        raise DxrayError(f"cluster has {cluster_gpus:g} GPU(s): no room for an explainer of {gpe:g} GPU beside "
                         f"{c.segmenters} segmenter(s) of {c.gpus_per_segmenter:g}; lower cluster.gpus_per_explainer "
                         f"or set cluster.explainers (an autoscaling cluster adds nodes on demand)")
    return n, gpe


def _check(cfg: Config) -> None:
    if cfg.segment.enabled and cfg.cluster.segmenters == 0:
        raise DxrayError("cluster.segmenters is 0 but segment.enabled is true; set cluster.segmenters >= 1 "
                         "or segment.enabled=false")


def _ranking_inputs(cfg: Config):
    """(image ranker, classifier) for ``audit.prepare``: classifier actors on Ray Data rank over the
    image folder; weight ranking needs the final layer, loaded on the driver's CPU."""
    t = cfg.targets
    if t.feature_source == "images":
        from dxray.distributed.rank import rank_features_distributed

        def on_ray(todo: list[int]):
            return [r for r in rank_features_distributed(cfg).ranked if r.class_index in todo]

        return on_ray, None
    if t.feature_source == "weights" and t.top_k:
        from dxray import classifiers

        c = cfg.classifier
        return None, classifiers.load_classifier(audit.classifier_spec(cfg), **audit.classifier_kwargs(cfg),
                                                 input_size=c.input_size, final_layer=c.final_layer, device="cpu",
                                                 allow_pickle=c.allow_pickle)
    return None, None


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


def _scheduler_callables(cfg: Config, sink) -> dict:
    """What the scheduler calls: its items are ``audit.TaskSpec``s, its results ``audit.Finished``
    (the actors' ``run`` returns them with the images to score), and every row goes through
    ``audit.commit``. A failure's (stage, message) becomes the task's error text."""

    def explain(actor, specs):
        return actor.run.options(num_returns=2).remote(specs)

    def score(actor, images, finished):
        return actor.score.remote(images, [f.prompt for f in finished])

    def fail(spec, finished, stage: str, message: str) -> dict:
        if stage == SEGMENT:  # the task is explained: its row, with the segmenter's error
            return audit.commit(sink, finished, None, f"segmentation failed: {message}")
        return audit.commit(sink, audit.Finished(audit._task_row(sink.run_id, spec, cfg, None, message), [], None))

    return {"explain": explain, "score": score, "needs_scoring": lambda finished: bool(finished.prompt),
            "commit": lambda finished, scores: audit.commit(sink, finished, scores), "fail": fail}


def run_distributed(cfg: Config, address: str | None = None, progress=None) -> audit.RunSummary:
    import ray

    started = datetime.now(UTC)
    info = audit.preflight(cfg)  # every check that needs no model, storage reachability included
    cfg = _pin_storage(cfg)
    _check(cfg)
    emit = progress or (lambda event, data: None)
    where = connect(cfg.cluster, address)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    n, gpe = layout(cfg, gpus, scales_up=where != "local")
    if gpe and not gpus:
        log.warning("dxray: the cluster has no GPU yet; %d explainer(s) of %g GPU wait for the autoscaler to add GPU "
                    "nodes (cluster.gpus_per_explainer=0 runs them on CPUs)", n, gpe)
    image_ranker, classifier = _ranking_inputs(cfg)
    p = audit.prepare(cfg, info, classifier, image_ranker, started=started)
    summary = p.summary()
    emit("plan", {"planned": len(p.specs), "skipped": summary.skipped, "todo": len(p.todo), "root": summary.root,
                  "explainers": n, "cluster": where})
    c = cfg.cluster
    explainers, segmenters = [], []
    try:
        if p.todo:
            opts = dict(max_restarts=-1, max_task_retries=0)
            explainers = [ray.remote(ExplainerActor).options(
                num_gpus=gpe, num_cpus=c.cpus_per_explainer, name=f"dxray-explainer-{p.sink.run_id}-{i}",
                **opts).remote(cfg, p.sink.run_id) for i in range(n)]
            if cfg.segment.enabled:
                segmenters = [ray.remote(SegmenterActor).options(
                    num_gpus=c.gpus_per_segmenter if gpus or gpe else 0, num_cpus=c.cpus_per_segmenter,
                    name=f"dxray-segmenter-{p.sink.run_id}-{i}", **opts).remote(cfg) for i in range(c.segmenters)]
            _first_ready(explainers, "explainer")
            _first_ready(segmenters, "segmenter")
            emit("actors", {"explainers": n, "gpus_per_explainer": gpe, "segmenters": len(segmenters)})
            sched = Scheduler(explainers, segmenters, **_scheduler_callables(cfg, p.sink),
                              in_flight_per_actor=c.in_flight_per_actor, task_retries=c.task_retries,
                              log_every_s=c.log_every_s, progress=emit)
            for row in sched.run(p.todo, cfg.optimize.batch_tasks):
                audit.count(summary, row)
    finally:
        for actor in explainers + segmenters:
            ray.kill(actor, no_restart=True)
    audit.finalize(cfg, p, summary, "audit", f"ray ({where}): {n} explainer(s) x {gpe:g} GPU",
                   extra={"cluster": {"explainers": n, "gpus_per_explainer": gpe, "segmenters": len(segmenters)}})
    return summary
