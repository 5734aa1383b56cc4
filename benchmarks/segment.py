"""Segmentation scoring throughput (images/s), Grounding DINO + SAM side by side with Grounding DINO alone.

    python benchmarks/segment.py --model tiny --images 32 --size 128
    python benchmarks/segment.py --sam-backends --images 4 --size 512 --batch 2 --repeats 1
    python benchmarks/segment.py --sam-backends --sam-size small --images 16 --size 128 --batch 4 --repeats 3

The baseline (boxes as masks, no SAM) shows what the SAM stage costs. With --model tiny the models
are the tiny random ones of the demo preset: a plumbing figure, not the real models' cost.

--sam-backends compares the two SAM backends at real ViT-B size with random weights (the same compute as
sam_vit_b_01ec64.pth / facebook/sam-vit-base): transformers' SamModel (SamConfig's defaults are ViT-B) and the
segment-anything package's registry-built vit_b loaded from a saved .pth (segment.sam=segment-anything:vit_b:PATH),
behind the same tiny Grounding DINO, so both get the same boxes (--sam-threshold, default 0.5).

--concepts N (issue 20) prices naming concepts: the same images scored for the class object alone and with the
first N concepts of segment.concepts=default in one extra detector query, whose boxes share SAM's image encoding
with the object's. Real sizes with random weights: Grounding DINO at grounding-dino-tiny's architecture
(GroundingDinoConfig's defaults: Swin-T, BERT-base, 800 px) and SAM ViT-B (1024 px).

    python benchmarks/segment.py --concepts 16 --images 4 --size 512 --batch 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dxray.segment import Segmenter

RESULTS = Path(__file__).parent / "results"


def throughput(seg: Segmenter, images, prompts, repeats: int) -> float:
    seg(images[:4], prompts[:4])  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seg(images, prompts)
        rates.append(len(images) / (time.perf_counter() - t0))
    return statistics.median(rates)


def sam_pair(cache: str, size: str) -> tuple[str, str]:
    """A SAM with random weights for each backend: a transformers folder and a segment-anything .pth.
    "vit_b": the real ViT-B (SamConfig's defaults; the registry's vit_b). "small": the vit_b layout with a
    2-block, 64-wide encoder at 256 px (tests/test_segment_anything.py's), registered as the registry's vit_b
    for this process: a plumbing figure for a CPU that cannot run ViT-B at 1024 px in reasonable time."""
    import segment_anything
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    if size == "small":
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from test_segment_anything import small_vit_b

        segment_anything.sam_model_registry["vit_b"] = small_vit_b
        config = SamConfig(vision_config=SamVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                         mlp_dim=256, image_size=256, global_attn_indexes=[1]),
                           prompt_encoder_config=SamPromptEncoderConfig(image_size=256))
        image_processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256},
                                            mask_size={"longest_edge": 64}, mask_pad_size={"height": 64, "width": 64})
    else:
        config, image_processor = SamConfig(), SamImageProcessor()  # 1024 px, as sam-vit-base
    folder = Path(cache) / "sam-transformers"
    SamModel(config).save_pretrained(folder)
    SamProcessor(image_processor=image_processor).save_pretrained(folder)
    pth = Path(cache) / "sam_random.pth"
    torch.save(segment_anything.sam_model_registry["vit_b"]().state_dict(), pth)
    return str(folder), f"segment-anything:vit_b:{pth}"


def sam_backends(args, images, prompts) -> None:
    from dxray.models.tiny_segment import ensure_tiny_grounding_dino

    cache = tempfile.mkdtemp(prefix="dxray-bench-")
    detector = str(ensure_tiny_grounding_dino(cache))
    hf, package = sam_pair(cache, args.sam_size)
    kw = dict(box_threshold=args.sam_threshold, batch_size=args.batch)
    boxes = [len(r.boxes) for r in Segmenter(detector, None, **kw)(images, prompts)]
    rates = {name: throughput(Segmenter(detector, sam, **kw), images, prompts, args.repeats)
             for name, sam in (("transformers", hf), ("segment_anything", package))}
    out = {"sam": f"{args.sam_size} (random weights)", "detector": "tiny", "images": args.images, "size": args.size,
           "batch": args.batch, "repeats": args.repeats, "boxes_per_image": round(statistics.mean(boxes), 1),
           "transformers_images_per_s": round(rates["transformers"], 3),
           "segment_anything_images_per_s": round(rates["segment_anything"], 3),
           "ratio": round(rates["segment_anything"] / rates["transformers"], 2),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"segment-sam-backends-{args.sam_size}-{args.size}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"SAM {args.sam_size}, images {args.size}px, batch {args.batch}, {out['boxes_per_image']} boxes/image: transformers "
          f"{rates['transformers']:.3f} images/s, segment-anything {rates['segment_anything']:.3f} images/s "
          f"(ratio {out['ratio']:.2f})")


def real_grounding_dino(cache: str) -> str:
    """A Grounding DINO of grounding-dino-tiny's size (random weights, the tiny preset's tokenizer), saved."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )

    from dxray.models.tiny_segment import tiny_detector_processor

    tiny = tiny_detector_processor()
    processor = GroundingDinoProcessor(image_processor=type(tiny.image_processor)(), tokenizer=tiny.tokenizer)
    torch.manual_seed(0)
    config = GroundingDinoConfig(text_config=BertConfig(vocab_size=len(tiny.tokenizer)))
    folder = Path(cache) / "grounding-dino-real-size"
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def top_boxes(k: int) -> type:
    """A Segmenter that keeps each detector query's k best boxes (ties: the first ones)."""

    class TopBoxes(Segmenter):
        def _detect(self, images, prompts, sizes):
            boxes, scores, labels = super()._detect(images, prompts, sizes)
            keep = [sorted(range(len(s)), key=lambda j: -s[j])[:k] for s in scores]
            return ([[b[j] for j in kj] for b, kj in zip(boxes, keep, strict=True)], [[s[j] for j in kj] for s, kj in zip(scores, keep, strict=True)],
                    [[lab[j] for j in kj] for lab, kj in zip(labels, keep, strict=True)])

    return TopBoxes


def concepts_cost(args, images, prompts) -> None:
    from dxray.config import DEFAULT_CONCEPTS

    cache = tempfile.mkdtemp(prefix="dxray-bench-")
    detector = real_grounding_dino(cache)
    sam, _ = sam_pair(cache, "vit_b")
    concepts = list(DEFAULT_CONCEPTS[: args.concepts])
    # Random weights score all 900 queries of a query near 1.0, so no threshold leaves a trained detector's handful
    # of boxes: keep each query's --boxes best, as a trained one at box_threshold 0.35 roughly does.
    kw = dict(box_threshold=0.0, batch_size=args.batch)
    TopBoxes = top_boxes(args.boxes)
    named = TopBoxes(detector, sam, concepts=concepts, **kw)
    found = named(images, prompts)
    concept_boxes = [len(b) for b in TopBoxes(detector, None, **kw)._detect(
        images, [named._concept_query] * len(images), [i.shape[:2] for i in images])[0]]
    rates = {"object": throughput(TopBoxes(detector, sam, **kw), images, prompts, args.repeats),
             "object_and_concepts": throughput(named, images, prompts, args.repeats)}
    out = {"detector": "grounding-dino-tiny size (random weights)", "sam": "vit_b (random weights)",
           "concepts": len(concepts), "images": args.images, "size": args.size, "batch": args.batch,
           "repeats": args.repeats, "boxes_kept_per_query": args.boxes,
           "object_boxes_per_image": round(statistics.mean(len(r.boxes) for r in found), 1),
           "concept_query_boxes_per_image": round(statistics.mean(concept_boxes), 1),
           "object_images_per_s": round(rates["object"], 4),
           "object_and_concepts_images_per_s": round(rates["object_and_concepts"], 4),
           "cost_ratio": round(rates["object"] / rates["object_and_concepts"], 2),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"segment-concepts-{len(concepts)}-{args.size}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(concepts)} concepts, images {args.size}px: object only {rates['object']:.4f} images/s, with concepts "
          f"{rates['object_and_concepts']:.4f} images/s: {out['cost_ratio']:.2f}x the cost")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="'tiny' or DETECTOR,SAM (hub ids or folders)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sam-backends", action="store_true",
                    help="compare transformers' SAM with segment-anything's at ViT-B size (random weights)")
    ap.add_argument("--sam-size", choices=["vit_b", "small"], default="vit_b", help="SAM size of --sam-backends")
    ap.add_argument("--sam-threshold", type=float, default=0.5, help="box threshold of --sam-backends")
    ap.add_argument("--concepts", type=int, default=0, help="price naming this many concepts (real-size models)")
    ap.add_argument("--boxes", type=int, default=10, help="boxes each detector query keeps with --concepts (random weights keep all 900)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    prompts = ["goldfish.", "tabby cat."] * (args.images // 2) + ["goldfish."] * (args.images % 2)
    if args.sam_backends:
        return sam_backends(args, images, prompts)
    if args.concepts:
        return concepts_cost(args, images, prompts)
    cache = tempfile.mkdtemp(prefix="dxray-bench-")
    if args.model == "tiny":
        from dxray.models.tiny_segment import ensure_tiny_grounding_dino, ensure_tiny_sam

        detector, sam = str(ensure_tiny_grounding_dino(cache)), str(ensure_tiny_sam(cache))
    else:
        detector, sam = args.model.split(",")
    kw = dict(box_threshold=0.35, batch_size=args.batch)
    full = throughput(Segmenter(detector, sam, **kw), images, prompts, args.repeats)
    boxes = throughput(Segmenter(detector, None, **kw), images, prompts, args.repeats)
    out = {"model": args.model, "images": args.images, "size": args.size, "batch": args.batch,
           "dino_sam_images_per_s": round(full, 1), "dino_only_images_per_s": round(boxes, 1),
           "ratio": round(full / boxes, 2), "threads": torch.get_num_threads(), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"segment-{args.model.replace('/', '_').replace(',', '+')}-{args.size}.json").write_text(
        json.dumps(out, indent=2) + "\n")
    print(f"{args.model} @ {args.size}px, batch {args.batch}: GDINO+SAM {full:.1f} images/s, "
          f"GDINO only {boxes:.1f} images/s (ratio {full / boxes:.2f})")


if __name__ == "__main__":
    main()
