"""Segmentation scoring throughput (images/s), Grounding DINO + SAM side by side with Grounding DINO alone.

    python benchmarks/segment.py --model tiny --images 32 --size 128
    python benchmarks/segment.py --sam-backends --images 4 --size 512 --batch 2 --repeats 1

The baseline (boxes as masks, no SAM) shows what the SAM stage costs. With --model tiny the models
are the tiny random ones of the demo preset: a plumbing figure, not the real models' cost.

--sam-backends compares the two SAM backends at real ViT-B size with random weights (the same compute as
sam_vit_b_01ec64.pth / facebook/sam-vit-base): transformers' SamModel (SamConfig's defaults are ViT-B) and the
segment-anything package's registry-built vit_b loaded from a saved .pth (segment.sam=segment-anything:vit_b:PATH),
behind the same tiny Grounding DINO, so both get the same boxes (--sam-threshold, default 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def real_size_sams(cache: str) -> tuple[str, str]:
    """A ViT-B SAM with random weights for each backend: a transformers folder and a segment-anything .pth."""
    from segment_anything import sam_model_registry
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    folder = Path(cache) / "sam-vit-b-transformers"
    SamModel(SamConfig()).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)  # 1024 px, as sam-vit-base
    pth = Path(cache) / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), pth)
    return str(folder), f"segment-anything:vit_b:{pth}"


def sam_backends(args, images, prompts) -> None:
    from dxray.models.tiny_segment import ensure_tiny_grounding_dino

    cache = tempfile.mkdtemp(prefix="dxray-bench-")
    detector = str(ensure_tiny_grounding_dino(cache))
    hf, package = real_size_sams(cache)
    kw = dict(box_threshold=args.sam_threshold, batch_size=args.batch)
    boxes = [len(r.boxes) for r in Segmenter(detector, None, **kw)(images, prompts)]
    rates = {name: throughput(Segmenter(detector, sam, **kw), images, prompts, args.repeats)
             for name, sam in (("transformers", hf), ("segment_anything", package))}
    out = {"sam": "vit_b (random weights)", "detector": "tiny", "images": args.images, "size": args.size,
           "batch": args.batch, "repeats": args.repeats, "boxes_per_image": round(statistics.mean(boxes), 1),
           "transformers_images_per_s": round(rates["transformers"], 3),
           "segment_anything_images_per_s": round(rates["segment_anything"], 3),
           "ratio": round(rates["segment_anything"] / rates["transformers"], 2),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"segment-sam-backends-{args.size}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"SAM vit_b @ {args.size}px, batch {args.batch}, {out['boxes_per_image']} boxes/image: transformers "
          f"{rates['transformers']:.3f} images/s, segment-anything {rates['segment_anything']:.3f} images/s "
          f"(ratio {out['ratio']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="'tiny' or DETECTOR,SAM (hub ids or folders)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sam-backends", action="store_true",
                    help="compare transformers' SAM with segment-anything's at ViT-B size (random weights)")
    ap.add_argument("--sam-threshold", type=float, default=0.5, help="box threshold of --sam-backends")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    prompts = ["goldfish.", "tabby cat."] * (args.images // 2) + ["goldfish."] * (args.images % 2)
    if args.sam_backends:
        return sam_backends(args, images, prompts)
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
