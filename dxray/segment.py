"""Object fraction of generated images: Grounding DINO boxes -> SAM masks -> r.

r = object pixels / all pixels, where the object is the union of the SAM masks
of every box Grounding DINO finds for the class prompt (paper Sec. 3, "spurious
feature discovery"). Masks are stored as COCO-style uncompressed RLE.

SAM runs on one of two backends behind the same interface: transformers' ``SamModel`` (a hub id or
folder) or the original ``segment-anything`` package (``segment-anything:vit_b:PATH.pth``, the
``sam_vit_*.pth`` checkpoints only that package reads; ``pip install 'dxray[sam]'``).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dxray.errors import DxrayError, load_errors
from dxray.weights import hub_reason, pickle_refusal, read_state_dict


@dataclass
class Segmentation:
    object_fraction: float  # union-mask pixels / all pixels (0.0 when nothing is detected)
    mask_rle: list[int]  # COCO uncompressed RLE counts, column-major, first count = background run
    boxes: list[list[float]]  # xyxy, pixels of the input image, one per kept detection
    box_scores: list[float]
    concept_fractions: list[float] | None = None  # per concept of the segmenter's vocabulary: its masks' coverage


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
    except pickle.UnpicklingError as e:  # a pytorch_model.bin holding pickled objects, refused weights-only
        raise DxrayError(pickle_refusal(f"{what} {ref!r}", ref, e, "re-save it as safetensors once, where you trust "
                                        "it (save_pretrained(folder, safe_serialization=True))")) from None
    except load_errors() as e:
        reason = hub_reason(e, 200)
        raise DxrayError(f"cannot load {what} {ref!r}: {reason}") from e


SAM_PACKAGE = "segment-anything"
SAM_PACKAGE_TYPES = ("vit_b", "vit_l", "vit_h")  # the sam_model_registry names of the released checkpoints
_SAM_FORMAT = f"{SAM_PACKAGE}:TYPE:PATH.pth with TYPE one of {', '.join(SAM_PACKAGE_TYPES)}"


def sam_package_ref(ref: str | None) -> tuple[str, str] | None:
    """(model type, checkpoint path) of a ``segment-anything:TYPE:PATH`` reference; None for a transformers
    hub id or folder (hub ids hold no colon)."""
    if not isinstance(ref, str) or not ref.startswith(SAM_PACKAGE + ":"):
        return None
    model_type, _, path = ref.removeprefix(SAM_PACKAGE + ":").partition(":")
    return model_type, path


def check_sam_package_ref(ref: str, missing: list[str] | None = None) -> None:
    """One-line errors, naming ``segment.sam``, for a ``segment-anything:`` reference: an unknown model type,
    a checkpoint that is not here, the package not installed. Loads nothing. With ``missing`` (a list: the
    dry run of a job meant for another machine) an absent checkpoint or package is listed there instead."""
    model_type, path = sam_package_ref(ref)
    if model_type not in SAM_PACKAGE_TYPES:
        raise DxrayError(f"segment.sam: unknown segment-anything model type {model_type!r} in {ref!r}; "
                         f"give {_SAM_FORMAT}")
    if not path:
        raise DxrayError(f"segment.sam: {ref!r} names no checkpoint; give {_SAM_FORMAT}")
    file = Path(path).expanduser()
    if not file.is_file():
        if missing is not None and not file.exists():
            missing.append(f"segment.sam {path}")
        else:
            what = "is a folder, not a checkpoint file" if file.is_dir() else "not found"
            raise DxrayError(f"segment.sam: SAM checkpoint {what}: {path}")
    if importlib.util.find_spec("segment_anything") is None:
        if missing is not None:
            missing.append(f"segment.sam package {SAM_PACKAGE}")
        else:
            raise DxrayError(f"segment.sam: {ref!r} needs the {SAM_PACKAGE} package, which is not installed: "
                             f"pip install 'dxray[sam]'")


def _fit_sam(model: torch.nn.Module, state: dict, path: str, model_type: str) -> None:
    """load_state_dict, but a checkpoint of another size (vit_h given as vit_b) is one line naming a tensor."""
    own = model.state_dict()
    wrong = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise DxrayError(f"segment.sam: checkpoint {path} is not a segment-anything {model_type}: {k} is "
                         f"{tuple(state[k].shape)} there, {tuple(own[k].shape)} in {model_type} "
                         f"({len(wrong)} tensors differ)")
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        raise DxrayError(f"segment.sam: checkpoint {path} does not fit segment-anything {model_type}: "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:3]}")
    model.load_state_dict(state)


def load_sam_package(ref: str, *, allow_pickle: bool = False):
    """The package's own model for ``segment-anything:TYPE:PATH``: built by its registry
    (``sam_model_registry[TYPE]()``, random weights), then the checkpoint loaded without running pickled
    code (the registry's ``checkpoint=`` argument would ``torch.load`` it with pickle), eval mode."""
    check_sam_package_ref(ref)
    from segment_anything import sam_model_registry

    model_type, path = sam_package_ref(ref)
    state = read_state_dict(path, allow_pickle, "set segment.allow_pickle=true only if you trust the file")
    model = sam_model_registry[model_type]()
    _fit_sam(model, state, path, model_type)
    return model.eval()


def _words(text: str) -> str:
    """" snow water " from "Snow. water!": lower-case words between single spaces, padded."""
    words = re.sub(r"[\W_]+", " ", str(text).lower()).split()
    return f" {' '.join(words)} "


class Segmenter:
    """Holds Grounding DINO + SAM (Ray-Data-style stateful holder: load in __init__, work in __call__)."""

    def __init__(self, detector: str, sam: str | None, *, device="cpu", box_threshold=0.35, text_threshold=0.25,
                 batch_size=4, allow_pickle=False, concepts: list[str] | None = None, dtype: str = "float32"):
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
        if dtype not in ("float32", "float16", "bfloat16"):
            raise DxrayError(f"segment.dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.device, self.batch_size = torch.device(device), batch_size
        self.dtype = getattr(torch, dtype)  # the detector's and SAM's forward passes run under autocast to it
        self.sam_boxes_per_call = 32  # SAM mask-decoder calls take at most this many boxes per image
        # context concepts: all of them in one detector query ("snow. water. grass."), one query per image
        self.concepts = [c.strip().lower() for c in concepts] if concepts else []
        self._concept_query = " ".join(f"{c}." for c in self.concepts)
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        if sam_package_ref(sam):
            check_sam_package_ref(sam)  # before the detector loads
        self.processor, self.detector = _load(detector, "detector",
                                              AutoProcessor, AutoModelForZeroShotObjectDetection)
        self.detector.to(self.device).eval()
        # sam_backend "transformers": sam is a SamModel, sam_processor its SamProcessor;
        # "segment-anything": sam is the package's Sam, sam_transform its ResizeLongestSide
        self.sam_processor = self.sam = self.sam_transform = self.sam_backend = None
        if sam_package_ref(sam):
            from segment_anything.utils.transforms import ResizeLongestSide

            self.sam, self.sam_backend = load_sam_package(sam, allow_pickle=allow_pickle), SAM_PACKAGE
            self.sam_transform = ResizeLongestSide(self.sam.image_encoder.img_size)
            self.sam.to(self.device)
        elif sam is not None:
            self.sam_processor, self.sam = _load(sam, "SAM", SamProcessor, SamModel)
            self.sam.to(self.device).eval()
            self.sam_backend = "transformers"
        # transformers renamed box_threshold -> threshold in the post-processing
        params = inspect.signature(self.processor.post_process_grounded_object_detection).parameters
        self._threshold_kw = "threshold" if "threshold" in params else "box_threshold"

    def __call__(self, images: list[np.ndarray], prompts: list[str], with_concepts: bool = True) -> list[Segmentation]:
        """One Segmentation per H x W x 3 uint8 image; prompts[i] is the query for images[i]. With a concept
        vocabulary (and ``with_concepts``), each also gets every concept's coverage (``concept_fractions``)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        images = [np.asarray(image) for image in images]
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"expected H x W x 3 images, got shape {image.shape}")
        # a list of prompts without any "." would be merged into one query by the processor
        prompts = [p.strip().lower().rstrip(".") + "." for p in prompts]
        out: list[Segmentation] = []
        concepts = bool(self.concepts and with_concepts)
        for i in range(0, len(images), self.batch_size):
            out += self._batch(images[i : i + self.batch_size], prompts[i : i + self.batch_size], concepts)
        return out

    def _detect(self, images, prompts, sizes) -> tuple[list, list, list]:
        """Boxes (input-image pixels, clipped to the image), scores and phrase labels per image."""
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device)
        with self._autocast():
            outputs = self.detector(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()  # boxes in fp32
        detections = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], target_sizes=sizes, text_threshold=self.text_threshold,
            **{self._threshold_kw: self.box_threshold},
        )
        boxes, scores, labels = [], [], []
        for (h, w), det in zip(sizes, detections, strict=True):
            limit = torch.tensor([w, h, w, h], dtype=det["boxes"].dtype)
            boxes.append(torch.minimum(det["boxes"].float().cpu().clamp(min=0), limit).tolist())
            scores.append(det["scores"].float().cpu().tolist())
            text = det["text_labels"] if "text_labels" in det else det.get("labels")  # the older name
            labels.append(list(text) if text is not None else [""] * len(boxes[-1]))
        return boxes, scores, labels

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _owners(self, label: str) -> list[int]:
        """The concepts a detected phrase names ("snow. water." -> snow and water): whole words only, punctuation
        ignored on both sides (the tokenizer decodes "t-shirt" as "t - shirt")."""
        words = _words(label)
        return [k for k, c in enumerate(self.concepts) if _words(c) in words]

    @torch.no_grad()
    def _batch(self, images, prompts, concepts: bool) -> list[Segmentation]:
        # 1. detect: the class prompt's boxes; with concepts, the vocabulary's boxes (one query) after them
        sizes = [image.shape[:2] for image in images]
        boxes, scores, _ = self._detect(images, prompts, sizes)
        n_object = [len(b) for b in boxes]
        owners = [[] for _ in images]  # per image: the concepts of each concept box
        if concepts:
            found, _, labels = self._detect(images, [self._concept_query] * len(images), sizes)
            for i, (bs, ls) in enumerate(zip(found, labels, strict=True)):
                kept = [(b, self._owners(label)) for b, label in zip(bs, ls, strict=True) if self._owners(label)]
                boxes[i] = boxes[i] + [b for b, _ in kept]
                owners[i] = [o for _, o in kept]
        masks = self._masks(images, boxes, sizes)
        # 3. r = union of the object's masks / all pixels; a concept's coverage likewise
        out = []
        for i, ((h, w), m) in enumerate(zip(sizes, masks, strict=True)):
            union, r = union_fraction(m[: n_object[i]], h, w)
            seg = Segmentation(r, rle_encode(union), boxes[i][: n_object[i]], scores[i])
            if concepts:
                seg.concept_fractions = [
                    union_fraction([mk for mk, o in zip(m[n_object[i]:], owners[i], strict=True) if k in o], h, w)[1]
                    for k in range(len(self.concepts))]
            out.append(seg)
        return out

    def _masks(self, images, boxes, sizes) -> list[list[np.ndarray]]:
        """2. One mask per box: SAM over every image with >= 1 box (one image encoding for all its boxes), or the
        filled box when SAM is off."""
        masks = [[] for _ in images]
        found = [i for i, b in enumerate(boxes) if b]
        if found and self.sam is None:
            for i in found:
                masks[i] = [boxes_mask([b], *sizes[i]) for b in boxes[i]]
        elif found and self.sam_backend == SAM_PACKAGE:
            for i, m in zip(found, self._package_masks([images[i] for i in found], [boxes[i] for i in found]),
                            strict=True):
                masks[i] = m
        elif found:
            n = max(len(boxes[i]) for i in found)  # pad with copies of the first box: the union is unchanged
            sam_inputs = self.sam_processor(
                images=[images[i] for i in found], input_boxes=[boxes[i] + boxes[i][:1] * (n - len(boxes[i])) for i in found],
                return_tensors="pt",
            )
            with self._autocast():  # one image encoding per image, whatever its number of boxes
                embeddings = self.sam.get_image_embeddings(sam_inputs["pixel_values"].to(self.device))
            input_boxes = sam_inputs["input_boxes"].to(self.device)
            sizes_in = (sam_inputs["original_sizes"].cpu(), sam_inputs["reshaped_input_sizes"].cpu())
            parts = [[] for _ in found]
            # Boxes in chunks: the masks are upscaled to 1024 px before cropping (4 MB a box), so a detector that
            # keeps hundreds of boxes (a low box_threshold) would otherwise need gigabytes at once.
            for start in range(0, n, self.sam_boxes_per_call):
                with self._autocast():
                    pred = self.sam(image_embeddings=embeddings, input_boxes=input_boxes[:, start:start + self.sam_boxes_per_call],
                                    multimask_output=False).pred_masks
                for k, m in enumerate(self.sam_processor.post_process_masks(pred.float().cpu(), *sizes_in)):
                    parts[k].append(m[:, 0].numpy())
            for k, i in enumerate(found):
                masks[i] = list(np.concatenate(parts[k])[: len(boxes[i])])
        return masks

    def _package_masks(self, images, boxes) -> list[np.ndarray]:
        """segment-anything's batched path (``Sam.forward`` over a list of records, as in the package's
        batched-prompts example): one image-encoder call for the whole batch; ``SamPredictor`` would encode
        one image at a time. The records are built by hand because the package has no helper for them; the
        resize is the predictor's own (``ResizeLongestSide.apply_image``, then ``apply_boxes_torch``)."""
        records = []
        for image, b in zip(images, boxes, strict=True):
            size = image.shape[:2]
            pixels = torch.as_tensor(self.sam_transform.apply_image(image), device=self.device)
            records.append({"image": pixels.permute(2, 0, 1).contiguous(), "original_size": size,
                            "boxes": self.sam_transform.apply_boxes_torch(
                                torch.as_tensor(b, dtype=torch.float, device=self.device), size)})
        with self._autocast():
            return [o["masks"][:, 0].cpu().numpy() for o in self.sam(records, multimask_output=False)]
