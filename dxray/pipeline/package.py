"""A task's outcome made ready to commit: its full-size images written to the run (the one place a task's PNGs are
written, on whichever runner or actor explained it) and its rows built (:mod:`dxray.pipeline.rows`)."""

from __future__ import annotations

import numpy as np

from dxray.optimize import Sample
from dxray.pipeline.rows import WRITE, Finished, Outcome, error_row, sample_rows, task_row
from dxray.pipeline.tasks import TaskSpec
from dxray.storage.images import encode_png


def write_images(spec: TaskSpec, samples: list[Sample], write) -> list[str]:
    """Each held-out image's full-size PNG, stored by ``write(relative path, bytes) -> uri``; their uris."""
    return [write(f"images/{spec.task_id}/{s.seed:010d}.png", encode_png(s.image)) for s in samples]


def package(outcome: Outcome, sink) -> tuple[Finished, list]:
    """Write the task's full-size images and build its rows; returns them and the images to score.
    A failure to write is the task's error (stage ``write``), never the batch's."""
    spec = outcome.spec
    if outcome.error is not None:
        return Finished(task_row(sink.run_id, spec, outcome.result, outcome.error), [], None), []
    try:
        rows = sample_rows(sink.run_id, spec, outcome.samples, write_images(spec, outcome.samples, sink.write_bytes))
    except Exception as err:
        return error_row(sink.run_id, spec, WRITE, err, outcome.result), []
    images = [s.image for s in outcome.samples] if spec.prompts else []
    row = task_row(sink.run_id, spec, outcome.result, None)
    seen = [s.penultimate for s in outcome.samples if s.penultimate is not None]
    if seen:  # the segmenter control: its plain pictures' mean penultimate features
        row["control_activations"] = np.mean(seen, axis=0).astype(np.float32).tolist()
    return Finished(row, rows, spec.prompts), images
