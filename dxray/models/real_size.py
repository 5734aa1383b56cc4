"""Real-size random models: the architectures the paper's job loads, with random weights, saved in the hub's
folder layout (what ``from_pretrained`` reads from a downloaded snapshot). No model hub reaches the machines
dxray is built on, so the slow tests and the benchmarks load these through the same code paths as the real
weights: the compute and memory are the real models', the pictures are noise.

    save_all(folder)  ->  {"lcm": ..., "sd15": ..., "lcm_lora": ..., "taesd": ..., "grounding_dino": ...,
                           "sam": ..., "resnet50": ..., "robustness_checkpoint": ..., "class_names": ...}

The CLIP tokenizer is the real one (openai/clip-vit-large-patch14's 49,408-token BPE, built from the merges
open_clip's wheel ships: ``pip install --no-deps open-clip-torch``). Grounding DINO's text side is BERT-base at full size with
the tiny preset's WordPiece vocabulary (bert-base-uncased's vocab.txt ships with no package on PyPI): the ids
differ from the real ones, the compute does not.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch

from dxray.cache import build_once

# lcm-lora-sdv1-5: rank 64 on these UNet modules (diffusers' train_lcm_distill_lora_sd_wds.py, which trained it)
LCM_LORA_RANK = 64
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def clip_tokenizer():
    """openai/clip-vit-large-patch14's tokenizer: byte alphabet, its '</w>' forms, 48,894 merges, BOS/EOS."""
    from importlib.util import find_spec

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = find_spec("open_clip")  # finds the package without importing it (and its ftfy, timm imports)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real CLIP vocabulary comes from open_clip's wheel: pip install --no-deps open-clip-torch")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77,
                             pad_token="<|endoftext|>")


def sd15_parts(time_cond_proj_dim: int | None = None, seed: int = 0, tokenizer=None) -> dict:
    """SD1.5's UNet, VAE, CLIP ViT-L/14 text encoder, tokenizer and an LCM scheduler. ``time_cond_proj_dim=256``
    is LCM_Dreamshaper_v7's UNet (a guidance-embedding input), None a plain SD1.5 base; ``tokenizer``: another
    77-token CLIP tokenizer than the real one (a FLOP count needs only its length)."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tokenizer or clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, time_cond_proj_dim=time_cond_proj_dim)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1, original_inference_steps=50)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _safety_parts():
    """A safety checker and feature extractor, so model_index.json lists them as LCM_Dreamshaper_v7's does
    (dxray loads with safety_checker=None; CLIPConfig's default vision tower keeps the folder smaller than
    the real ViT-L/14 one, which is never loaded)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    return StableDiffusionSafetyChecker(CLIPConfig()), CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})


def save_lcm_dreamshaper(folder: Path) -> None:
    """SimianLuo/LCM_Dreamshaper_v7's layout: a LatentConsistencyModelPipeline with a safety checker."""
    from diffusers import LatentConsistencyModelPipeline

    checker, extractor = _safety_parts()
    LatentConsistencyModelPipeline(**sd15_parts(time_cond_proj_dim=256), safety_checker=checker,
                                   feature_extractor=extractor, requires_safety_checker=True).save_pretrained(folder)


def save_sd15_with_lcm_lora(base: Path, lora: Path) -> None:
    """An SD1.5 base (runwayml layout) and a LoRA of lcm-lora-sdv1-5's rank and target modules (random, non-zero
    up-projections so fusing it changes the UNet), saved as ``pytorch_lora_weights.safetensors``."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    parts = sd15_parts(time_cond_proj_dim=None, seed=1)
    checker, extractor = _safety_parts()
    StableDiffusionPipeline(**parts, safety_checker=checker, feature_extractor=extractor,
                            requires_safety_checker=True).save_pretrained(base)
    unet = parts["unet"]
    unet.add_adapter(LoraConfig(r=LCM_LORA_RANK, lora_alpha=LCM_LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(LCM_LORA_TARGETS)))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-4)
    StableDiffusionPipeline.save_lora_weights(lora, unet_lora_layers=get_peft_model_state_dict(unet))


def save_taesd(folder: Path) -> None:
    """madebyollin/taesd: AutoencoderTiny's defaults are its config."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(folder)


def save_grounding_dino_tiny(folder: Path) -> None:
    """IDEA-Research/grounding-dino-tiny's size: GroundingDinoConfig's defaults (Swin-T, 900 queries) with a
    BERT-base text side; the image processor's defaults (shortest edge 800). Use box_threshold 0.9."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )

    from dxray.models.tiny_segment import tiny_detector_processor

    tiny = tiny_detector_processor()
    torch.manual_seed(0)
    config = GroundingDinoConfig(text_config=BertConfig(vocab_size=len(tiny.tokenizer)))
    model = GroundingDinoForObjectDetection(config).eval()
    # Random weights give query-text logits of std ~8: every query scores ~1.0 and SAM would get 900 boxes. The
    # decoder's output norm scaled by 1/16 spreads them (std ~0.5): box_threshold 0.9 keeps ~14 of 900 boxes.
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(1 / 16)
        model.model.decoder.layer_norm.bias.mul_(1 / 16)
    model.save_pretrained(folder)
    GroundingDinoProcessor(image_processor=type(tiny.image_processor)(), tokenizer=tiny.tokenizer).save_pretrained(folder)


def save_sam_vit_base(folder: Path) -> None:
    """facebook/sam-vit-base: SamConfig's and SamProcessor's defaults (ViT-B, 1024 px)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    SamModel(SamConfig()).eval().save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)


def save_resnet50(folder: Path) -> None:
    """torchvision's ResNet-50 (classifier.spec=torchvision:resnet50, weights=resnet50.safetensors), a MadryLab
    ``robustness`` checkpoint of the same network (robustness.pt: what ``dxray convert-checkpoint`` reads),
    and ImageNet's class names (imagenet-classes.txt: torchvision ships them without the weights)."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "resnet50.safetensors")
    sd = {"module.normalizer.new_mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
          "module.normalizer.new_std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)}
    sd |= {f"module.model.{k}": v for k, v in net.state_dict().items()}
    sd |= {f"module.attacker.model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": sd, "epoch": 90}, folder / "robustness.pt")
    names = torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"]
    (folder / "imagenet-classes.txt").write_text("\n".join(names) + "\n")


def save_all(root: Path) -> dict[str, str]:
    """Every model above under ``root`` (each built once; a crash leaves no half folder)."""
    root = Path(root)

    def lora_pair(folder: Path) -> None:
        save_sd15_with_lcm_lora(folder / "base", folder / "lcm-lora")

    folders = {name: build_once(root / name, fn) for name, fn in (
        ("lcm-dreamshaper-v7", save_lcm_dreamshaper), ("sd15-lcm-lora", lora_pair), ("taesd", save_taesd),
        ("grounding-dino-tiny", save_grounding_dino_tiny), ("sam-vit-base", save_sam_vit_base),
        ("resnet50", save_resnet50))}
    r = folders["resnet50"]
    return {"lcm": str(folders["lcm-dreamshaper-v7"]), "sd15": str(folders["sd15-lcm-lora"] / "base"),
            "lcm_lora": str(folders["sd15-lcm-lora"] / "lcm-lora"), "taesd": str(folders["taesd"]),
            "grounding_dino": str(folders["grounding-dino-tiny"]), "sam": str(folders["sam-vit-base"]),
            "resnet50": str(r / "resnet50.safetensors"), "robustness_checkpoint": str(r / "robustness.pt"),
            "class_names": str(r / "imagenet-classes.txt")}
