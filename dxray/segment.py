"""Object fraction of generated images: Grounding DINO boxes -> SAM masks -> r.

r = object pixels / all pixels, where the object is the union of the SAM masks
of every box Grounding DINO finds for the class prompt (paper Sec. 3, "spurious
feature discovery"). Masks are stored as COCO-style uncompressed RLE.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dxray.errors import DxrayError


@dataclass
class Segmentation:
    object_fraction: float  # union-mask pixels / all pixels (0.0 when nothing is detected)
    mask_rle: list[int]  # COCO uncompressed RLE counts, column-major, first count = background run
    boxes: list[list[float]]  # xyxy, pixels of the input image, one per kept detection
    box_scores: list[float]


def detection_prompt(class_name: str) -> str:
    """Grounding DINO query for a class name: "Tench, Tinca tinca" -> "tench."."""
    lemma = class_name.split(",")[0].strip().lower().rstrip(".").strip()
    if not lemma:
        raise DxrayError(f"empty class name {class_name!r}: cannot build a detection prompt")
    return lemma + "."


def rle_encode(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts of a 2-D boolean mask (column-major, background run first)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def rle_decode(counts: list[int], height: int, width: int) -> np.ndarray:
    """Inverse of :func:`rle_encode`."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {height}x{width}={height * width}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape((height, width), order="F")


def union_fraction(masks, height: int, width: int) -> tuple[np.ndarray, float]:
    """Union of N masks (overlaps counted once) and its fraction of the image."""
    union = np.zeros((height, width), dtype=bool)
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != union.shape:
            raise ValueError(f"mask shape {mask.shape} != image shape {union.shape}")
        union |= mask
    return union, float(union.mean()) if union.size else 0.0


def boxes_mask(boxes, height: int, width: int) -> np.ndarray:
    """Union of filled xyxy boxes (pixel coordinates, rounded, clipped to the image)."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        xs = np.clip(np.rint([x0, x1]), 0, width).astype(int)
        ys = np.clip(np.rint([y0, y1]), 0, height).astype(int)
        mask[ys[0] : ys[1], xs[0] : xs[1]] = True
    return mask


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _load(ref: str, what: str, *classes):
    """from_pretrained every class from one hub id / folder."""
    if ref.startswith(("/", "./", "../", "~")):
        if not Path(ref).expanduser().is_dir():
            raise DxrayError(f"{what} folder not found: {ref}")
        ref = str(Path(ref).expanduser())
    try:
        return [cls.from_pretrained(ref, local_files_only=_offline()) for cls in classes]
    except (OSError, ValueError) as e:
        from dxray.generator import hub_reason

        reason = hub_reason(e, 200)
        raise DxrayError(f"cannot load {what} {ref!r}: {reason}") from e


class Segmenter:
    """Holds Grounding DINO + SAM (Ray-Data-style stateful holder: load in __init__, work in __call__)."""

    def __init__(self, detector: str, sam: str | None, *, device="cpu", box_threshold=0.35, text_threshold=0.25,
                 batch_size=4):
        from transformers import (
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
            SamModel,
            SamProcessor,
        )

        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise DxrayError(f"segment.{name} must be in [0, 1], got {value!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DxrayError(f"segment.batch_size must be a positive integer, got {batch_size!r}")
        self.device, self.batch_size = torch.device(device), batch_size
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.processor, self.detector = _load(detector, "detector",
                                              AutoProcessor, AutoModelForZeroShotObjectDetection)
        self.detector.to(self.device).eval()
        self.sam_processor = self.sam = None
        if sam is not None:
            self.sam_processor, self.sam = _load(sam, "SAM", SamProcessor, SamModel)
            self.sam.to(self.device).eval()
        # transformers renamed box_threshold -> threshold in the post-processing
        params = inspect.signature(self.processor.post_process_grounded_object_detection).parameters
        self._threshold_kw = "threshold" if "threshold" in params else "box_threshold"

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> list[Segmentation]:
        """One Segmentation per H x W x 3 uint8 image; prompts[i] is the query for images[i]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        images = [np.asarray(image) for image in images]
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"expected H x W x 3 images, got shape {image.shape}")
        # a list of prompts without any "." would be merged into one query by the processor
        prompts = [p.strip().lower().rstrip(".") + "." for p in prompts]
        out: list[Segmentation] = []
        for i in range(0, len(images), self.batch_size):
            out += self._batch(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
        return out

    @torch.no_grad()
    def _batch(self, images, prompts) -> list[Segmentation]:
        # 1. detect: boxes in input-image pixels, clipped to the image
        sizes = [image.shape[:2] for image in images]
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device)
        detections = self.processor.post_process_grounded_object_detection(
            self.detector(**inputs), inputs["input_ids"], target_sizes=sizes, text_threshold=self.text_threshold,
            **{self._threshold_kw: self.box_threshold},
        )
        boxes, scores = [], []
        for (h, w), det in zip(sizes, detections, strict=True):
            limit = torch.tensor([w, h, w, h], dtype=det["boxes"].dtype)
            boxes.append(torch.minimum(det["boxes"].float().cpu().clamp(min=0), limit).tolist())
            scores.append(det["scores"].float().cpu().tolist())
        # 2. masks: SAM on every image with >= 1 box, or the filled boxes when SAM is off
        masks = [[] for _ in images]
        found = [i for i, b in enumerate(boxes) if b]
        if found and self.sam is None:
            for i in found:
                masks[i] = [boxes_mask(boxes[i], *sizes[i])]
        elif found:
            n = max(len(boxes[i]) for i in found)  # pad with copies of the first box: the union is unchanged
            sam_inputs = self.sam_processor(
                images=[images[i] for i in found], input_boxes=[boxes[i] + boxes[i][:1] * (n - len(boxes[i])) for i in found],
                return_tensors="pt",
            )
            pred = self.sam(pixel_values=sam_inputs["pixel_values"].to(self.device),
                            input_boxes=sam_inputs["input_boxes"].to(self.device), multimask_output=False).pred_masks
            upscaled = self.sam_processor.post_process_masks(
                pred.float().cpu(), sam_inputs["original_sizes"].cpu(), sam_inputs["reshaped_input_sizes"].cpu())
            for i, m in zip(found, upscaled, strict=True):
                masks[i] = m[: len(boxes[i]), 0].numpy()
        # 3. r = union of masks / all pixels
        out = []
        for (h, w), m, b, s in zip(sizes, masks, boxes, scores, strict=True):
            union, r = union_fraction(m, h, w)
            out.append(Segmentation(r, rle_encode(union), b, s))
        return out
