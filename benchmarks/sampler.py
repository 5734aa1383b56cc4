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

from dxray.explain import OptimizeSettings, Target, optimize
from dxray.generator import LCMGenerator
from dxray.objectives import class_ce
from dxray.tiny import tiny_clip_tokenizer, tiny_lcm_components

RESULTS = Path(__file__).parent / "results"


def sd15_components() -> dict:
    """SD1.5 / LCM-Dreamshaper-v7 sized UNet, VAE and CLIP ViT-L/14 text encoder (random weights)."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()  # ids differ from real CLIP's; compute does not
    unet = UNet2DConditionModel(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, time_cond_proj_dim=256)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu",
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok, "scheduler": sched}


def classifier_for(size: str):
    import torchvision

    from dxray.classifiers import Classifier

    if size == "tiny":
        from dxray.tiny import tiny_classifier

        model, _ = tiny_classifier()
        return Classifier(model, final_layer="classifier.1", class_names=["a", "b"], input_size=(64, 64),
                          mean=(0.5,) * 3, std=(0.5,) * 3, hf=True)
    return Classifier(torchvision.models.resnet50(weights=None), final_layer="fc",
                      class_names=[f"c{i}" for i in range(1000)], input_size=(224, 224),
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3, help="timed optimisation steps (after one warm-up)")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = args.resolution or (64 if args.size == "tiny" else 256)
    parts = tiny_lcm_components() if args.size == "tiny" else sd15_components()
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
