"""Model FLOPs counted on the meta device (shapes only: no weights, no memory, no compute), for an analytic cost.

``torch.utils.flop_counter.FlopCounterMode`` counts the matmuls and convolutions a forward and backward would run,
so an SD1.5-size generator's cost at 512 px is known on any machine in seconds. Hand-written only in that it
builds the configured architecture and runs one step of it; the counting is torch's.

- :func:`generator_flops`: one optimisation image-step of the configured generator (text encoder, the sampler's
  steps with gradients as configured, the decoder; forward + backward to the prompt rows) and one held-out sample
  (no gradients), without the classifier (:func:`dxray.classifiers.describe` counts it).
- :data:`PEAK_BF16_DENSE`: a named GPU's dense bf16 peak, for an estimate at a stated MFU (``estimate.gpu``,
  ``estimate.mfu``).
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Vendor dense (no sparsity) bf16 tensor-core peaks, FLOP/s: H100 / H200 SXM, A100 SXM, L40S.
PEAK_BF16_DENSE = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12}


def _parts(size: str) -> dict:
    if size == "tiny":
        from dxray.models.tiny import tiny_lcm_components

        return tiny_lcm_components()
    from dxray.models.real_size import sd15_parts
    from dxray.models.tiny import tiny_clip_tokenizer

    # the text encoder's cost depends on the 77-token length only, not on the real vocabulary (open_clip's wheel)
    return sd15_parts(time_cond_proj_dim=256, tokenizer=tiny_clip_tokenizer())


@functools.lru_cache(maxsize=8)
def generator_flops(size: str, resolution: int, steps: int = 4, grad_steps: int | None = None,
                    tiny_vae: bool = False) -> dict:
    """FLOPs of one image-step (one task, one noise sample; forward + backward, no checkpointing recompute) and of one
    no-grad sample of the ``tiny`` or ``sd15`` generator at ``resolution``, the classifier left out."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from dxray.generator import LCMGenerator

    with torch.device("meta"):
        parts = _parts(size)
        decoder = parts["vae"]
        if tiny_vae:
            from diffusers import AutoencoderTiny

            decoder = AutoencoderTiny() if size != "tiny" else AutoencoderTiny(
                encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                num_decoder_blocks=(1, 1))
    for m in (parts["unet"], decoder):
        with contextlib.suppress(AttributeError):  # AutoencoderTiny has no attention
            m.set_attn_processor(AttnProcessor())  # counted (FlopCounterMode skips the CPU SDPA kernel)
    gen = LCMGenerator(parts["tokenizer"], parts["text_encoder"], parts["unet"], decoder, parts["scheduler"],
                       device="meta", resolution=resolution, steps=steps, grad_steps=grad_steps)
    gen.scheduler.set_timesteps(steps, device="cpu", original_inference_steps=50)  # index tables stay real
    gen._autocast = contextlib.nullcontext  # no autocast on meta; FLOPs do not depend on the dtype
    rows = torch.zeros(1, gen.embedding_dim, device="meta", requires_grad=True)
    prompt = gen.soft_prompt("{}", 1)
    with FlopCounterMode(display=False) as step:
        gen.generate(gen.encode([prompt], [rows]), [[0]]).float().mean().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as nograd:
        gen.generate(gen.encode([prompt], [rows]), [[0]])
    return {"image_step": step.get_total_flops(), "sample": nograd.get_total_flops()}
