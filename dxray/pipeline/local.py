"""The in-process runner (``dxray explain``, the embedded default): the explainer and the segmenter
live in this process and run the job's batches one after another."""

from __future__ import annotations

from collections.abc import Iterator

from dxray import progress as events
from dxray.config import Config
from dxray.pipeline.explainer import Explainer
from dxray.pipeline.job import AuditJob, RunSummary
from dxray.pipeline.package import package
from dxray.pipeline.ranking import choose_ranker
from dxray.pipeline.rows import SEGMENT, Finished, error_text, segmentation_columns
from dxray.pipeline.tasks import TaskSpec
from dxray.storage.sink import RunSink


class LocalRunner:
    """An explainer and a segmenter in this process: runs one batch, yields what each task needs committed."""

    def __init__(self, cfg: Config, generator=None, classifier=None):
        from dxray import models

        self.cfg = cfg
        self.explainer = Explainer(cfg, generator, classifier)
        self.generator, self.classifier = self.explainer.generator, self.explainer.classifier
        self.segmenter = models.load_segmenter(cfg.segment, device=self.generator.device,
                                               cache_dir=cfg.cache_dir) if cfg.segment.enabled else None

    def run_batch(self, specs: list[TaskSpec], sink: RunSink,
                  on_step=None) -> Iterator[tuple[Finished, list[dict] | None, str | None]]:
        """Optimise and sample a batch, write each task's images and score them:
        (finished, scores, error) per task, for :meth:`AuditJob.commit`."""
        for outcome in self.explainer.explain(specs, on_step=on_step):
            done, images = package(outcome, sink)
            scores, error = None, None
            if images:
                try:
                    scores = segmentation_columns(self.segmenter, images, done.prompts)
                except Exception as err:  # this task's error; the batch goes on
                    error = error_text(SEGMENT, err)
            yield done, scores, error


def run(cfg: Config, progress: events.Hook | None = None, runner: LocalRunner | None = None) -> RunSummary:
    """The whole audit in this process (no cluster needed); ``progress`` gets :mod:`dxray.progress`'s events."""
    job = AuditJob(cfg, "explain")
    job.preflight()
    emit = progress or events.silent
    emit(events.Preflighted())  # models load next
    runner = runner or LocalRunner(cfg)
    job.prepare(choose_ranker(cfg.targets, lambda: runner.classifier))
    emit(job.planned())
    size = cfg.optimize.batch_tasks
    for start in range(0, len(job.todo), size):
        batch = job.todo[start:start + size]
        for done, scores, error in runner.run_batch(batch, job.sink, on_step=_step_events(cfg.optimize.steps, batch, emit)):
            row = job.commit(done, scores, error)
            job.count(row)
            emit(events.task_event(row))
    return job.finish(str(runner.generator.device))


def _step_events(steps: int, batch: list[TaskSpec], emit: events.Hook):
    names = ", ".join(f"{s.kind}:{s.class_index if s.kind != 'neuron' else s.layer}" for s in batch)

    def on_step(step, results):
        losses = [r.loss_curve[-1] for r in results if r.loss_curve]
        emit(events.Step(step + 1, steps, names, sum(losses) / len(losses) if losses else float("nan")))

    return on_step
