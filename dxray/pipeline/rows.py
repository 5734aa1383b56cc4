"""Rows of the run's tables, built from a task and what became of it: the task row, its sample rows
(pointing at its full-size images, which :mod:`dxray.pipeline.package` writes), the segmentation columns, and
the one error row both runners write when a stage fails.

A failure is labelled by the stage it happened in, with the same words on both runners:

==========  =================================================================
stage       the ``error`` column reads
==========  =================================================================
optimise    ``optimisation failed: <one line>`` (incl. a non-finite loss)
sample      ``sampling failed: <one line>``
write       ``writing images failed: <one line>``
segment     ``segmentation failed: <one line>``
schedule    the scheduler's own line (``gave up after 4 attempts: ...``, ``every explainer actor died: ...``)
==========  =================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from dxray.errors import one_line
from dxray.optimize import OptimizeResult, Sample
from dxray.pipeline.tasks import TaskSpec
from dxray.storage.images import thumbnail_png

OPTIMISE, SAMPLE, WRITE, SEGMENT, SCHEDULE = "optimise", "sample", "write", "segment", "schedule"
LABELS = {OPTIMISE: "optimisation failed", SAMPLE: "sampling failed", WRITE: "writing images failed",
          SEGMENT: "segmentation failed", SCHEDULE: None}


def error_text(stage: str, err: BaseException | str) -> str:
    """The ``error`` column for a failure in ``stage``: its label and the error on one line."""
    text = err if isinstance(err, str) else one_line(err)
    label = LABELS[stage]
    return f"{label}: {text}" if label else text


@dataclass
class Outcome:
    """What the explainer made of one task: its best optimisation result and held-out samples;
    ``error`` is already labelled (:func:`error_text`)."""

    spec: TaskSpec
    result: OptimizeResult | None
    samples: list[Sample]
    error: str | None


@dataclass
class Finished:
    """A task ready to commit once its images are scored: the task row, its sample rows (images
    already written) and the detection prompts (None: nothing to score)."""

    task_row: dict
    sample_rows: list[dict]
    prompts: list[str] | None


def task_row(run_id: str, spec: TaskSpec, res: OptimizeResult | None, error: str | None) -> dict:
    row = {
        "run_id": run_id, "task_id": spec.task_id, "kind": spec.kind, "class_index": spec.class_index,
        "class_name": spec.class_name, "feature_index": spec.feature_index, "feature_rank": spec.feature_rank,
        "layer": spec.layer, "objective": spec.objective.description if spec.objective else None, "template": spec.template,
        "n_tokens": spec.n_tokens, "init": spec.init, "status": "error" if error else "ok", "error": error,
        "lr": spec.lr, "samples_per_step": spec.samples_per_step,
    }
    if res is not None:
        row |= {
            "steps": res.steps, "final_loss": res.final_loss, "loss_curve": res.loss_curve,
            "target_prob": res.target_prob, "stopped_early": res.stopped_early, "baseline_prob": res.baseline_prob,
            "prompt_embedding": res.rows.tolist(), "hard_prompt_text": res.text, "chosen_loss": res.chosen_loss,
            "train_seeds": [s[0] for s in res.train_seeds],
            "seconds": res.seconds,
        }
    return row


BRIEF = ("run_id", "task_id", "kind", "class_index", "class_name", "feature_index", "layer", "template", "status", "error")


def brief(row: dict) -> dict:
    """A committed task row without its bulky columns (prompt embedding, curves): what the progress events
    and the tally need. The scheduler keeps one per task, 6,000 for a full-ImageNet run."""
    return {k: row.get(k) for k in BRIEF}


def error_row(run_id: str, spec: TaskSpec, stage: str, err: BaseException | str,
              res: OptimizeResult | None = None) -> Finished:
    """A failed task, ready to commit: its task row (with the optimisation result when there is one)
    and no samples."""
    return Finished(task_row(run_id, spec, res, error_text(stage, err)), [], None)


def sample_rows(run_id: str, spec: TaskSpec, samples: list[Sample], uris: list[str]) -> list[dict]:
    """One row per held-out image, pointing at its full-size PNG (``uris``, in the samples' order)."""
    prompts = spec.prompts
    return [{
        "run_id": run_id, "task_id": spec.task_id, "class_index": spec.class_index,
        "feature_index": spec.feature_index, "seed": s.seed, "image_uri": uri,
        "thumbnail": thumbnail_png(s.image), "width": s.image.shape[1], "height": s.image.shape[0],
        "class_prob": s.class_prob, "feature_activation": s.feature_activation,
        "detection_prompt": prompts[0] if prompts else None,
        "candidate_prompts": prompts if prompts and len(prompts) > 1 else None,
    } for s, uri in zip(samples, uris, strict=True)]


def segmentation_columns(segmenter, images: list, prompts: list[str]) -> list[dict]:
    """Segmentation columns of each image: the first prompt's mask, boxes and r, and with several prompts
    (a class's candidates) every prompt's r, one segmenter call per prompt; with a concept vocabulary, every
    concept's coverage (scored once, with the first prompt)."""
    first, *others = [segmenter(images, [p] * len(images), **({} if k == 0 else {"with_concepts": False}))
                      for k, p in enumerate(prompts)]
    concepts = list(getattr(segmenter, "concepts", None) or []) or None
    rows = [{"object_fraction": g.object_fraction, "mask_rle": g.mask_rle, "boxes": g.boxes, "box_scores": g.box_scores,
             "concepts": concepts if g.concept_fractions is not None else None,
             "concept_fractions": g.concept_fractions} for g in first]
    if others:
        for i, row in enumerate(rows):
            row["candidate_object_fractions"] = [row["object_fraction"], *(o[i].object_fraction for o in others)]
    return rows
