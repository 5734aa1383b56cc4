import pytest
import torch

from dxray.errors import DxrayError
from dxray.generator import LCMGenerator, training_seed
from dxray.models.tiny import tiny_lcm_components


def _twin(g: LCMGenerator, **kw) -> LCMGenerator:
    """Another generator over the same modules, with different options."""
    opts = dict(steps=g.steps, resolution=g.resolution, guidance_scale=g.guidance_scale)
    return LCMGenerator(g.tokenizer, g.text_encoder, g.unet, g.decoder, g.scheduler, **(opts | kw))


def _rows_grad(g: LCMGenerator, seed=0):
    rows = g.init_rows(1, "random", seed).requires_grad_(True)
    img = g.generate(g.encode([g.soft_prompt("a shape of {}", 1)], [rows]), [[11, 12]])
    (img * torch.linspace(0, 1, img.numel()).view_as(img)).sum().backward()
    return rows.grad


def test_gradient_reaches_the_prompt_through_every_step(tiny_generator):
    g = tiny_generator
    rows = g.init_rows(1, "random", 0).requires_grad_(True)
    cond = g.encode([g.soft_prompt("{}", 1)], [rows])
    per_step = []

    def tap(i, c):  # a separate leaf per step: its gradient is that step's share
        leaf = c.detach().requires_grad_(True)
        per_step.append(leaf)
        return leaf

    img = g.generate(cond, [[5]], on_step=tap)
    grads = torch.autograd.grad(img.sum(), per_step)
    assert len(grads) == g.steps == 4
    for i, gr in enumerate(grads):
        assert torch.isfinite(gr).all(), f"step {i}"
        assert gr.abs().sum() > 0, f"step {i} gives no gradient"
    full = _rows_grad(g)
    assert torch.isfinite(full).all() and full.abs().sum() > 0


def test_checkpointing_gives_the_same_gradients(tiny_generator):
    plain = _rows_grad(_twin(tiny_generator, checkpointing=False))
    ckpt = _rows_grad(_twin(tiny_generator, checkpointing=True))
    torch.testing.assert_close(plain, ckpt, rtol=1e-4, atol=1e-7)


def test_same_seed_same_image_whatever_the_batch(tiny_generator):
    g = tiny_generator
    rows = g.init_rows(1, "random", 0)
    cond = g.encode([g.soft_prompt("{}", 1)], [rows])
    with torch.no_grad():
        a = g.generate(cond, [[7, 8]])
        b = g.generate(cond, [[9, 7]])
        c = g.generate(torch.cat([cond, cond]), [[7], [8]])
    assert a.shape == (2, 3, 64, 64)
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a[0], a[1])


def test_saved_and_loaded_generator_matches_the_original(tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    parts = tiny_lcm_components(seed=3)
    LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "lcm")
    original = LCMGenerator(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], parts["scheduler"],
                            resolution=64)
    loaded = LCMGenerator.from_pretrained(str(tmp_path / "lcm"), device="cpu", resolution=64)
    rows = original.init_rows(2, "random", 0)
    with torch.no_grad():
        a = original.generate(original.encode([original.soft_prompt("{}", 2)], [rows]), [[1, 2]])
        b = loaded.generate(loaded.encode([loaded.soft_prompt("{}", 2)], [rows]), [[1, 2]])
    torch.testing.assert_close(a, b)


def test_base_plus_lcm_lora_and_tiny_vae(tmp_path):
    """Path (b): an SD-style base (no guidance embedding) + a LoRA, decoded by an AutoencoderTiny."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    parts = tiny_lcm_components(seed=4, time_cond_proj_dim=None)
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base.save_pretrained(tmp_path / "base")
    unet = parts["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd")

    with_lora = LCMGenerator.from_pretrained(str(tmp_path / "base"), lora=str(tmp_path / "lora"), device="cpu",
                                             resolution=64)
    without = LCMGenerator.from_pretrained(str(tmp_path / "base"), device="cpu", resolution=64)
    x = torch.randn(1, 4, 32, 32)
    c = torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = unet(x, 10, encoder_hidden_states=c).sample  # the adapter-carrying UNet
        torch.testing.assert_close(with_lora.unet(x, 10, encoder_hidden_states=c).sample, expected,
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(without.unet(x, 10, encoder_hidden_states=c).sample, expected, atol=1e-4)

    tiny = LCMGenerator.from_pretrained(str(tmp_path / "base"), lora=str(tmp_path / "lora"),
                                        tiny_vae=str(tmp_path / "taesd"), device="cpu", resolution=32,
                                        guidance_scale=1.5)
    assert type(tiny.decoder).__name__ == "AutoencoderTiny" and tiny.uncond is not None
    rows = tiny.init_rows(1, "random", 0).requires_grad_(True)
    img = tiny.generate(tiny.encode([tiny.soft_prompt("{}", 1)], [rows]), [[1]])
    assert img.shape == (1, 3, 32, 32)
    img.sum().backward()
    assert rows.grad.abs().sum() > 0


def test_training_seeds_never_collide_with_held_out_seeds():
    seeds = {training_seed(b, step, s, 3) for b in (0, 1) for step in range(50) for s in range(3)}
    assert len(seeds) == 300
    assert min(seeds) >= 2**31 and max(seeds) < 2**32


def test_missing_local_model_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DxrayError, match="generator model folder not found"):
        LCMGenerator.from_pretrained(str(tmp_path / "nope"), device="cpu")


def test_resolution_must_fit_the_vae(tiny_generator):
    with pytest.raises(DxrayError, match="multiple of 2"):
        _twin(tiny_generator, resolution=63)
