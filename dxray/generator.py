"""A differentiable Latent Consistency Model sampler.

The diffusers pipelines run ``__call__`` under ``no_grad``, so this module keeps
their pieces (tokenizer, text encoder, UNet, VAE, ``LCMScheduler.step``,
guidance-scale embedding) and unrolls the sampling loop itself, with gradients
through every step and the decoder.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from dxray import prompts
from dxray.errors import DxrayError, load_errors
from dxray.prompts import SoftPrompt
from dxray.weights import hub_reason, pickle_refusal

StepHook = Callable[[int, torch.Tensor], torch.Tensor]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DxrayError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DxrayError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DxrayError(f"device {device!r} requested but this PyTorch has no MPS (Apple GPU) support")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DxrayError(f"device {device!r} is not supported (auto, cpu, cuda, cuda:N, mps)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def check_model_ref(ref: str, what: str) -> None:
    """A reference that looks like a local path must exist (hub ids are checked when loaded); a URL is
    neither (from_pretrained takes hub ids and folders) and is refused before anything loads."""
    if "://" in ref:
        from dxray.storage import redact_text

        raise DxrayError(f"{what} {redact_text(ref)!r} is a URL; give a hub id (org/name) or a local folder")
    if ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().exists():
        raise DxrayError(f"{what} folder not found: {ref}")


def _holds_bin(ref: str) -> bool:
    """True for a local folder with a ``.bin`` checkpoint in it or one level down (a pipeline's parts)."""
    root = Path(ref).expanduser()
    return root.is_dir() and any([*root.glob("*.bin"), *root.glob("*/*.bin")])


# Advice that only makes sense beside a traceback, which the CLI's one-line errors never show (diffusers:
# "Please check out the root cause in the stacktrace above.").


def guidance_embedding(w: float, dim: int) -> torch.Tensor:
    """LCM guidance-scale embedding (1 × dim), as in the LCM text2img pipeline (w = scale - 1)."""
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), embedding_dim=dim)


def training_seed(base: int, step: int, sample: int, samples_per_step: int) -> int:
    """Seed of training noise; always >= 2**31, so it never collides with a held-out seed."""
    return 2**31 + (base * 1_000_003 + step * samples_per_step + sample) % 2**31


class LCMGenerator:
    """Holds the LCM parts on one device and renders soft prompts into images, differentiably."""

    def __init__(self, tokenizer, text_encoder, unet, decoder, scheduler, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, steps: int = 4, guidance_scale: float = 1.0,
                 resolution: int = 512, original_inference_steps: int = 50, checkpointing: bool = False,
                 grad_steps: int | None = None):
        from diffusers import LCMScheduler

        if grad_steps is not None and not 1 <= grad_steps <= steps:
            raise DxrayError(f"generator.grad_steps {grad_steps} must be between 1 and generator.steps ({steps}), or null")

        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.text_encoder, self.unet, self.decoder = (
            m.to(self.device).eval().requires_grad_(False) for m in (text_encoder, unet, decoder)
        )
        scale = 2 ** (len(decoder.config.block_out_channels) - 1)
        if resolution % scale:
            raise DxrayError(f"generator.resolution {resolution} must be a multiple of {scale}")
        self.latent_shape = (unet.config.in_channels, resolution // scale, resolution // scale)
        self.resolution = resolution
        self.checkpointing = checkpointing
        self.grad_steps = grad_steps  # backprop through the last k sampler steps only (None: all)
        # 1. Timesteps and guidance, computed once.
        self.scheduler = LCMScheduler.from_config(scheduler.config)
        self.scheduler.set_timesteps(steps, device=self.device, original_inference_steps=original_inference_steps)
        self.steps = steps
        self.guidance_scale = guidance_scale
        proj = unet.config.time_cond_proj_dim
        self.w_embedding = guidance_embedding(guidance_scale - 1, proj).to(self.device, dtype) if proj else None
        self.uncond = None
        if not proj and guidance_scale > 1:  # LCM-LoRA: classic CFG against the empty prompt
            with torch.no_grad():
                empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
                self.uncond = self.text_encoder(input_ids=empty.to(self.device)).last_hidden_state

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, *, lora: str | None = None, tiny_vae: str | None = None,
                        device: str = "auto", dtype: str = "auto", **options) -> LCMGenerator:
        """Load an LCM checkpoint, or an SD1.5-family base plus an LCM-LoRA, from the hub or a folder."""
        from diffusers import AutoencoderTiny, DiffusionPipeline

        for ref, what in ((model, "generator model"), (lora, "LoRA"), (tiny_vae, "tiny VAE")):
            if ref:
                check_model_ref(ref, what)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, safety_checker=None,
                                                     requires_safety_checker=False)
            if lora:
                pipe.load_lora_weights(lora)
                pipe.fuse_lora()
                pipe.unload_lora_weights()
            decoder = AutoencoderTiny.from_pretrained(tiny_vae, dtype=torch_dtype) if tiny_vae else pipe.vae
        except pickle.UnpicklingError as err:  # a part saved as a pickled .bin, refused weights-only
            where = next((r for r in (model, lora, tiny_vae) if r and _holds_bin(r)), model)
            raise DxrayError(pickle_refusal(f"generator {where!r}", where, err, "re-save that part as safetensors "
                                            "once, where you trust it (save_pretrained(folder, "
                                            "safe_serialization=True))")) from None
        except load_errors() as err:
            raise DxrayError(f"cannot load generator {model!r}: {hub_reason(err)}") from None
        for part in ("tokenizer", "text_encoder", "unet", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise DxrayError(f"generator {model!r} has no {part}; expected an LCM or Stable Diffusion pipeline")
        pipe.tokenizer.model_max_length = prompts.MAX_LENGTH
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.unet, decoder, pipe.scheduler,
                   device=dev, dtype=torch_dtype, **options)

    # -- prompts ---------------------------------------------------------------------------------
    def soft_prompt(self, template: str, n_tokens: int) -> SoftPrompt:
        return SoftPrompt.build(self.tokenizer, template, n_tokens)

    def init_rows(self, n_tokens: int, init: str, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return prompts.init_rows(self.tokenizer, self.text_encoder, n_tokens, init, gen)

    @property
    def embedding_dim(self) -> int:
        return prompts.embedding_table(self.text_encoder).embedding_dim

    def encode(self, soft_prompts: Sequence[SoftPrompt], rows: Sequence[torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return prompts.encode(self.text_encoder, soft_prompts, rows)

    # -- sampling --------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda")

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial noise, drawn on the CPU per seed so an image depends on its seed alone."""
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])
        return (z * self.scheduler.init_noise_sigma).to(self.device, self.dtype), gens

    def generate(self, cond: torch.Tensor, seeds: Sequence[Sequence[int]], on_step: StepHook | None = None) -> torch.Tensor:
        """Images (P·S × 3 × H × W, in [0, 1]) for P conditionings, each with its own S seeds.

        Differentiable w.r.t. ``cond``. ``on_step(i, cond)`` may replace the conditioning
        seen by step i (tests use it to see each step's gradient). With ``grad_steps`` k, the first
        steps - k steps run under ``no_grad`` (same forward, no graph kept).
        """
        if cond.shape[0] != len(seeds):
            raise ValueError(f"{cond.shape[0]} conditionings but {len(seeds)} seed lists")
        per = {len(s) for s in seeds}
        if len(per) != 1 or 0 in per:
            raise ValueError("every conditioning needs the same, non-zero number of seeds")
        s = per.pop()
        flat = [int(x) for row in seeds for x in row]
        cond = cond.repeat_interleave(s, dim=0)
        latents, gens = self.initial_latents(flat)
        scheduler = copy.copy(self.scheduler)  # step counter is per call; tables are shared
        b = len(flat)
        w_emb = None if self.w_embedding is None else self.w_embedding.expand(b, -1)
        uncond = None if self.uncond is None else self.uncond.expand(b, -1, -1)
        denoised = latents
        grad = torch.is_grad_enabled()
        first_grad = len(scheduler.timesteps) - (self.grad_steps or len(scheduler.timesteps))
        with self._autocast():
            # 2. Unrolled LCM loop: every step keeps its graph (or only the last grad_steps do).
            for i, t in enumerate(scheduler.timesteps):
                c = on_step(i, cond) if on_step else cond

                def unet_step(x, c, t=t):  # t bound now: checkpoint's recompute must see this step's t
                    return self._predict(x, c, t, w_emb, uncond)

                with torch.set_grad_enabled(grad and i >= first_grad):
                    if self.checkpointing and torch.is_grad_enabled():
                        pred = checkpoint(unet_step, latents, c, use_reentrant=False)
                    else:
                        pred = unet_step(latents, c)
                    latents, denoised = scheduler.step(pred, t, latents, generator=gens, return_dict=False)
            # 3. Decode.
            image = self.decoder.decode(denoised / self.decoder.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _predict(self, x, c, t, w_emb, uncond):
        if uncond is None:
            return self.unet(x, t, encoder_hidden_states=c, timestep_cond=w_emb, return_dict=False)[0]
        both = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.to(c.dtype), c]),
                         return_dict=False)[0]
        u, v = both.chunk(2)
        return u + self.guidance_scale * (v - u)
