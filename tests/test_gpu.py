"""GPU-only checks (off by default; run with `pytest -m gpu` on a CUDA machine)."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_sampler_gives_finite_gradients_on_cuda(cache_dir, dtype):
    from dxray.generator import LCMGenerator
    from dxray.models.tiny import ensure_tiny_lcm

    g = LCMGenerator.from_pretrained(str(ensure_tiny_lcm(cache_dir)), device="cuda", dtype=dtype, resolution=64)
    assert g.unet.dtype == getattr(torch, dtype)
    rows = g.init_rows(1, "random", 0).to("cuda").requires_grad_(True)
    img = g.generate(g.encode([g.soft_prompt("{}", 1)], [rows]), [[1, 2]])
    assert img.dtype == torch.float32 and img.is_cuda
    img.mean().backward()
    assert torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0


def test_same_seed_same_image_on_cpu_and_cuda(cache_dir):
    from dxray.generator import LCMGenerator
    from dxray.models.tiny import ensure_tiny_lcm

    imgs = []
    for device in ("cpu", "cuda"):
        g = LCMGenerator.from_pretrained(str(ensure_tiny_lcm(cache_dir)), device=device, dtype="float32",
                                         resolution=64)
        with torch.no_grad():
            imgs.append(g.generate(g.encode([g.soft_prompt("{}", 1)], [g.init_rows(1, "random", 0)]), [[3]]).cpu())
    torch.testing.assert_close(imgs[0], imgs[1], atol=2e-3, rtol=0)


# -- real size (dxray.models.real_size: the architectures the paper's job loads, random weights) -------------------
def test_sd15_size_optimisation_step_at_512px_fits_and_gives_finite_nonzero_gradients_in_bf16():
    """jobs/configs/imagenet.yaml's settings: an LCM_Dreamshaper_v7-size UNet, 512 px, 4 steps, checkpointing,
    bf16 (dtype auto on CUDA), two tasks per batch, one noise sample per step; a ResNet-50 classifier."""
    import torchvision

    from dxray.classifiers import Classifier
    from dxray.generator import LCMGenerator
    from dxray.models.real_size import sd15_parts
    from dxray.objectives import class_ce
    from dxray.optimize import OptimizeSettings, Target, optimize

    parts = sd15_parts(time_cond_proj_dim=256)
    g = LCMGenerator(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], parts["scheduler"],
                     device="cuda", dtype=torch.bfloat16, steps=4, resolution=512, checkpointing=True)
    classifier = Classifier(torchvision.models.resnet50(weights=None), final_layer="fc",
                            class_names=[str(i) for i in range(1000)], input_size=(224, 224),
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).to("cuda")
    torch.cuda.reset_peak_memory_stats()
    targets = [Target(class_ce(309), seed=0, class_index=309), Target(class_ce(537), seed=1, class_index=537)]
    results = optimize(g, classifier, targets, OptimizeSettings(steps=2, lr=0.1, samples_per_step=1))
    peak = torch.cuda.max_memory_allocated() / 2**30
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"SD1.5-size step at 512 px, 2 tasks, bf16, checkpointing: peak {peak:.1f} GiB of {total:.0f} GiB")
    for r in results:
        assert r.error is None, r.error
        assert all(np.isfinite(x) for x in r.loss_curve) and len(r.loss_curve) == 2
        assert torch.isfinite(r.rows).all()
        assert not torch.equal(r.rows, r.start_rows), "zero gradient: the prompt did not move"
    assert peak < 0.9 * total


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_real_size_segmentation_in_half_precision_keeps_the_float32_boxes(cache_dir, dtype):
    from pathlib import Path

    from test_segment import boxes_agree

    from dxray.cache import build_once
    from dxray.models.real_size import save_grounding_dino_tiny, save_sam_vit_base
    from dxray.segment import Segmenter

    detector = str(build_once(Path(cache_dir) / "real-grounding-dino-tiny", save_grounding_dino_tiny))
    sam = str(build_once(Path(cache_dir) / "real-sam-vit-base", save_sam_vit_base))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(4)]
    prompts = ["bee", "dog sled", "bee", "dog sled"]
    full = Segmenter(detector, sam, device="cuda", box_threshold=0.9, batch_size=4)(images, prompts)
    low = Segmenter(detector, sam, device="cuda", box_threshold=0.9, batch_size=4, dtype=dtype)(images, prompts)
    for a, b in zip(low, full, strict=True):
        assert b.boxes, "the float32 detector kept no box: nothing to compare"
        assert boxes_agree(a.boxes, b.boxes, px=5.0) >= 0.8, (a.boxes, b.boxes)  # 1% of the side
        assert abs(a.object_fraction - b.object_fraction) < 0.05
