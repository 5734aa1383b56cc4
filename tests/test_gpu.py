"""GPU-only checks (off by default; run with `pytest -m gpu` on a CUDA machine)."""

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
