"""Fidelity to the reference implementations (issue 21): with gradients off, dxray's unrolled sampler gives the
images diffusers' own pipelines give for the same latents, prompt embeddings and generators, and its segmenter
gives the boxes and masks of transformers' documented Grounding DINO and SAM usage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dxray.generator import LCMGenerator
from dxray.models.tiny import tiny_lcm_components
from dxray.segment import Segmenter, rle_decode

SEEDS = [5, 11]


def _dxray_images(g: LCMGenerator, init: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
    """dxray's images for one soft prompt and SEEDS, and that prompt's embeddings (one row per image)."""
    with torch.no_grad():
        cond = g.encode([g.soft_prompt("a photo of {}", 2)], [g.init_rows(2, init, 0)])
        return g.generate(cond, [SEEDS]), cond.repeat_interleave(len(SEEDS), dim=0)


def _reference_inputs(g: LCMGenerator) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The pipeline's latents and generators for SEEDS as dxray draws them: one CPU generator per image, its
    first draw the initial noise, its later draws the scheduler's noise."""
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return torch.stack([torch.randn(g.latent_shape, generator=x) for x in gens]), gens


@pytest.mark.parametrize("guidance_scale", [1.0, 8.5])
def test_lcm_sampler_matches_the_latent_consistency_model_pipeline(tmp_path, guidance_scale):
    from diffusers import LatentConsistencyModelPipeline

    LatentConsistencyModelPipeline(**tiny_lcm_components(seed=7), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "lcm")
    g = LCMGenerator.from_pretrained(str(tmp_path / "lcm"), device="cpu", dtype="float32", resolution=64,
                                     steps=4, guidance_scale=guidance_scale)
    ours, embeds = _dxray_images(g)

    pipe = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "lcm", safety_checker=None)
    latents, gens = _reference_inputs(g)
    ref = pipe(prompt_embeds=embeds, latents=latents, generator=gens, num_inference_steps=4,
               original_inference_steps=50, guidance_scale=guidance_scale, height=64, width=64,
               output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 64, 64)
    assert ours.std() > 0.01  # a real picture, not a constant both sides could agree on
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("decoder", ["vae", "taesd"])
def test_lcm_lora_sampler_matches_stable_diffusion_with_lcm_scheduler_and_cfg(tmp_path, decoder):
    """Path (b), the documented LCM-LoRA recipe: an SD base, ``LCMScheduler``, the LoRA loaded and fused,
    classifier-free guidance against the empty prompt; optionally ``AutoencoderTiny`` as the VAE."""
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    parts = tiny_lcm_components(seed=8, time_cond_proj_dim=None)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "base")
    parts["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora",
                                              unet_lora_layers=get_peft_model_state_dict(parts["unet"]))
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd")
    tiny_vae = str(tmp_path / "taesd") if decoder == "taesd" else None
    resolution = 32 if tiny_vae else 64

    g = LCMGenerator.from_pretrained(str(tmp_path / "base"), lora=str(tmp_path / "lora"), tiny_vae=tiny_vae,
                                     device="cpu", dtype="float32", resolution=resolution, steps=4,
                                     guidance_scale=1.5)
    ours, embeds = _dxray_images(g)

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.fuse_lora()
    if tiny_vae:
        pipe.vae = AutoencoderTiny.from_pretrained(tiny_vae)
    latents, gens = _reference_inputs(g)
    ref = pipe(prompt_embeds=embeds, latents=latents, generator=gens, num_inference_steps=4, guidance_scale=1.5,
               height=resolution, width=resolution, output_type="pt").images  # negative prompt: "" (its default)
    assert ours.shape == ref.shape == (2, 3, resolution, resolution)
    assert ours.std() > 0.01
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# -- segmentation ------------------------------------------------------------------------------------------
def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (128, 80, 3), dtype=np.uint8)]


PROMPTS = ["goldfish", "tabby cat"]  # different token counts: dxray's batch pads the shorter query


@pytest.fixture(scope="module")
def seg_models(cache_dir):
    from dxray.models.tiny_segment import ensure_tiny_grounding_dino, ensure_tiny_sam

    return str(ensure_tiny_grounding_dino(cache_dir)), str(ensure_tiny_sam(cache_dir))


def _documented_boxes(detector: str, image: np.ndarray, text: str, threshold: float) -> np.ndarray:
    """transformers' Grounding DINO usage example, one image at a time: a lower-cased query ending in '.',
    ``post_process_grounded_object_detection`` with target_sizes=(height, width)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    processor = AutoProcessor.from_pretrained(detector)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(detector).eval()
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=threshold, text_threshold=0.25, target_sizes=[image.shape[:2]])[0]
    return result["boxes"].numpy()


def _documented_masks(sam: str, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """transformers' SAM usage example with box prompts: ``post_process_masks`` back to the input size."""
    from transformers import SamModel, SamProcessor

    processor = SamProcessor.from_pretrained(sam)
    model = SamModel.from_pretrained(sam).eval()
    inputs = processor(image, input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    masks = processor.image_processor.post_process_masks(
        outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0]
    return masks[:, 0].numpy()


@pytest.mark.parametrize("boxes_per_call", [32, 5])  # 5: SAM's boxes in chunks, the image encoded once
def test_segmenter_boxes_and_masks_match_the_documented_post_processing(seg_models, boxes_per_call):
    detector, sam = seg_models
    images = _images()
    # a threshold that leaves a few boxes on each image (random weights: a few of the 900 queries stand out)
    threshold = 0.5
    reference = [_documented_boxes(detector, im, p + ".", threshold) for im, p in zip(images, PROMPTS, strict=True)]
    assert all(1 <= len(b) <= 50 for b in reference), [len(b) for b in reference]

    segmenter = Segmenter(detector, sam, box_threshold=threshold, batch_size=2)
    segmenter.sam_boxes_per_call = boxes_per_call
    found = segmenter(images, PROMPTS)
    # every box's own mask too (random weights' masks overlap so much that the union alone would hide a lost box)
    per_box = segmenter._masks(images, [seg.boxes for seg in found], [im.shape[:2] for im in images])
    for im, ref, seg, masks in zip(images, reference, found, per_box, strict=True):
        h, w = im.shape[:2]
        clipped = np.minimum(ref.clip(min=0), [w, h, w, h])  # dxray clips boxes to the image
        np.testing.assert_allclose(np.array(seg.boxes), clipped, atol=1e-3)
        documented = _documented_masks(sam, im, clipped)
        assert len(masks) == len(documented)
        for k, (ours, theirs) in enumerate(zip(masks, documented, strict=True)):
            np.testing.assert_array_equal(ours, theirs, err_msg=f"box {k}")
        union = documented.any(axis=0)
        assert union.any() and not union.all()
        np.testing.assert_array_equal(rle_decode(seg.mask_rle, h, w).astype(bool), union)
        assert seg.object_fraction == pytest.approx(union.mean())
