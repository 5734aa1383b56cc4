"""Random-weight model builders shared by the benchmarks (same compute as the real weights).

``tiny``: dxray's tiny preset (64 px). ``sd15``: SD1.5 / LCM-Dreamshaper-v7 sized UNet, VAE and
CLIP ViT-L/14 text encoder, a ResNet-50 classifier, and a taesd-size ``AutoencoderTiny``.
"""

from __future__ import annotations

import torch

from dxray.models.tiny import tiny_clip_tokenizer, tiny_lcm_components


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


def components(size: str) -> dict:
    """tokenizer, text_encoder, unet, vae, scheduler of the ``tiny`` or ``sd15`` preset."""
    return tiny_lcm_components() if size == "tiny" else sd15_components()


def tiny_autoencoder(size: str):
    """An ``AutoencoderTiny`` decoder matching the preset's latent scale: taesd-size for sd15 (the
    diffusers defaults are madebyollin/taesd's config), a 2-block one for the tiny preset (scale 2)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    if size == "tiny":
        return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    return AutoencoderTiny()


def classifier_for(size: str):
    import torchvision

    from dxray.classifiers import Classifier

    if size == "tiny":
        from dxray.models.tiny import tiny_classifier

        model, _ = tiny_classifier()
        return Classifier(model, final_layer="classifier.1", class_names=["a", "b"], input_size=(64, 64),
                          mean=(0.5,) * 3, std=(0.5,) * 3, hf=True)
    return Classifier(torchvision.models.resnet50(weights=None), final_layer="fc",
                      class_names=[f"c{i}" for i in range(1000)], input_size=(224, 224),
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
