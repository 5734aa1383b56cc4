"""Model holders for Ray: load in ``__init__``, work in methods on plain data.

They are plain classes (unit-testable without a cluster); the runner wraps them with
``ray.remote``. Neither assumes CUDA: ``device: auto`` takes the GPU Ray assigned, if any.
"""

from __future__ import annotations

from dxray.config import Config
from dxray.pipeline.explainer import Explainer
from dxray.pipeline.package import package
from dxray.pipeline.rows import Finished, segmentation_columns
from dxray.pipeline.tasks import TaskSpec
from dxray.quiet import quiet_libraries
from dxray.storage.sink import RunSink


class ExplainerActor:
    """Generator + classifier pinned on one device for the actor's lifetime. Optimises a batch of
    tasks, writes their full-size images, and returns (rows, images to score) as two objects so the
    images travel to a segmenter through the object store, never through the driver."""

    def __init__(self, cfg: Config, run_id: str):
        quiet_libraries()
        self.cfg = cfg
        self.explainer = Explainer(cfg)
        self.sink = RunSink(cfg.output, run_id, storage=cfg.storage)

    def ready(self) -> str:
        return str(self.explainer.generator.device)

    def run(self, specs: list[TaskSpec]) -> tuple[list[Finished], list[list]]:
        done = [package(outcome, self.sink) for outcome in self.explainer.explain(specs)]
        return [f for f, _ in done], [images for _, images in done]


class SegmenterActor:
    """Grounding DINO + SAM (or a preset's exact segmenter): scores the images of a batch."""

    def __init__(self, cfg: Config):
        quiet_libraries()
        from dxray import models
        from dxray.generator import resolve_device

        self.segmenter = models.load_segmenter(cfg.segment, device=resolve_device(cfg.device), cache_dir=cfg.cache_dir)

    def ready(self) -> bool:
        return True

    def score(self, images: list[list], prompts: list[list[str] | None]) -> list[list[dict] | None]:
        """Per task: the segmentation columns of each image, or None when the task is not scored."""
        # Arrays from the object store are read-only views; the processors want writable ones.
        return [segmentation_columns(self.segmenter, [i.copy() for i in imgs], p) if p and imgs else None
                for imgs, p in zip(images, prompts, strict=True)]
