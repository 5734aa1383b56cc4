"""Segmentation scoring throughput (images/s), Grounding DINO + SAM side by side with Grounding DINO alone.

    python benchmarks/segment.py --model tiny --images 32 --size 128

The baseline (boxes as masks, no SAM) shows what the SAM stage costs. With --model tiny the models
are the tiny random ones of the demo preset: a plumbing figure, not the real models' cost.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="'tiny' or DETECTOR,SAM (hub ids or folders)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="dxray-bench-")
    if args.model == "tiny":
        from dxray.models.tiny_segment import ensure_tiny_grounding_dino, ensure_tiny_sam

        detector, sam = str(ensure_tiny_grounding_dino(cache)), str(ensure_tiny_sam(cache))
    else:
        detector, sam = args.model.split(",")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    prompts = ["goldfish.", "tabby cat."] * (args.images // 2) + ["goldfish."] * (args.images % 2)
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
