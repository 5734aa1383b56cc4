"""Tiny random models for the demo preset and the tests.

They are built from configs (diffusers' ``get_dummy_components`` style), saved
with ``save_pretrained`` into a cache folder on first use, and then loaded back
through the same ``from_pretrained`` code path real models take.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dxray.cache import build_once, cache_root

TINY_CLASSES = ["goldfish", "tabby cat"]
TINY_RESOLUTION = 64


def tiny_clip_tokenizer():
    """A CLIP tokenizer with a character-level vocabulary (no merges): real ids for BOS/EOS/PAD."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_lcm_components(seed: int = 0, time_cond_proj_dim: int | None = 32) -> dict:
    """Tiny UNet + VAE + CLIP text encoder + tokenizer + LCM scheduler, random weights."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=TINY_RESOLUTION // 2,
        in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=4, attention_head_dim=4, time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=4, sample_size=TINY_RESOLUTION,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def tiny_classifier(num_labels: int = 2, names: list[str] | None = None, seed: int = 0):
    """A tiny transformers ResNet classifier and its image processor (random weights)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    names = names or TINY_CLASSES[:num_labels]
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        num_labels=num_labels, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )
    processor = ViTImageProcessor(size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return ResNetForImageClassification(config).eval(), processor


def ensure_tiny_lcm(cache_dir=None) -> Path:
    """Path of the tiny LCM pipeline folder, built on first use."""
    from diffusers import LatentConsistencyModelPipeline

    def build(folder: Path) -> None:
        pipe = LatentConsistencyModelPipeline(**tiny_lcm_components(), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder)

    return build_once(cache_root(cache_dir) / "tiny-lcm", build)


def ensure_tiny_classifier(cache_dir=None) -> Path:
    """Path of the tiny classifier folder (transformers format), built on first use."""

    def build(folder: Path) -> None:
        model, processor = tiny_classifier()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return build_once(cache_root(cache_dir) / "tiny-classifier", build)
