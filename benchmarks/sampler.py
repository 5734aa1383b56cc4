"""Seconds per optimisation step, side by side with the diffusers pipeline's own (no-grad) sampling.

One optimisation step = encode the soft prompt + 4 LCM steps with gradients + decode + classifier +
backward + AdamW step. The baseline is ``LatentConsistencyModelPipeline.__call__`` on the same
modules, prompt embeddings and resolution (no gradients): the ratio says what differentiability costs.

    python benchmarks/sampler.py --size tiny
    python benchmarks/sampler.py --size sd15 --resolution 256 --checkpointing

Models are random-weight architectures built from configs: same compute as the real weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _models import classifier_for, components

from dxray.generator import LCMGenerator
from dxray.objectives import class_ce
from dxray.optimize import OptimizeSettings, Target, optimize

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3, help="timed optimisation steps (after one warm-up)")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = args.resolution or (64 if args.size == "tiny" else 256)
    parts = components(args.size)
    gen = LCMGenerator(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], parts["scheduler"],
                       resolution=res, checkpointing=args.checkpointing)
    clf = classifier_for(args.size)
    target = [Target(class_ce(0), "{}", 1, "random", 0, 0)]

    optimize(gen, clf, target, OptimizeSettings(steps=2))  # warm-up: the first backward passes are slow
    t0 = time.perf_counter()
    optimize(gen, clf, target, OptimizeSettings(steps=args.steps))
    step_s = (time.perf_counter() - t0) / args.steps

    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond = gen.encode([gen.soft_prompt("{}", 1)], [gen.init_rows(1, "random", 0)]).detach()
    kw = dict(prompt_embeds=cond, num_inference_steps=4, guidance_scale=1.0, height=res, width=res, output_type="pt")
    pipe(**kw)  # warm-up
    pipe(**kw)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        pipe(**kw)
    base_s = (time.perf_counter() - t0) / args.steps

    out = {"size": args.size, "resolution": res, "batch": 1, "lcm_steps": 4, "checkpointing": args.checkpointing,
           "opt_step_s": round(step_s, 3), "pipeline_sample_s": round(base_s, 3), "ratio": round(step_s / base_s, 2),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    name = f"sampler-{args.size}-{res}{'-ckpt' if args.checkpointing else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.size}@{res}px ckpt={args.checkpointing}: optimisation step {step_s:.3f} s, "
          f"pipeline sampling {base_s:.3f} s, ratio {step_s / base_s:.2f}x")


if __name__ == "__main__":
    main()
