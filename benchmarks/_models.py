"""Random-weight model builders shared by the benchmarks (same compute as the real weights).

``tiny``: dxray's tiny preset (64 px). ``sd15``: SD1.5 / LCM-Dreamshaper-v7 sized UNet, VAE and
CLIP ViT-L/14 text encoder, a ResNet-50 classifier, and a taesd-size ``AutoencoderTiny``.
"""

from __future__ import annotations

import torch

from dxray.models.tiny import tiny_lcm_components


def sd15_components() -> dict:
    """SD1.5 / LCM-Dreamshaper-v7 sized UNet, VAE and CLIP ViT-L/14 text encoder (random weights), the real CLIP
    tokenizer (needs open_clip's wheel: pip install --no-deps open-clip-torch)."""
    from dxray.models.real_size import sd15_parts

    return sd15_parts(time_cond_proj_dim=256)


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
