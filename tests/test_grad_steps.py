"""`generator.grad_steps`: backprop through only the last k sampler steps."""

import pytest
import torch
from conftest import TINY_YAML

from dxray.config import Config, load_config
from dxray.errors import DxrayError
from dxray.generator import LCMGenerator


def _twin(g: LCMGenerator, **kw) -> LCMGenerator:
    opts = dict(steps=g.steps, resolution=g.resolution, guidance_scale=g.guidance_scale)
    return LCMGenerator(g.tokenizer, g.text_encoder, g.unet, g.decoder, g.scheduler, **(opts | kw))


def _render(g: LCMGenerator, seeds=((3, 4),)):
    rows = g.init_rows(1, "random", 0).requires_grad_(True)
    img = g.generate(g.encode([g.soft_prompt("a shape of {}", 1)], [rows]), [list(s) for s in seeds])
    return rows, img


def test_gradient_reaches_the_prompt_with_only_the_last_step(tiny_generator):
    rows, img = _render(_twin(tiny_generator, grad_steps=1))
    img.mean().backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_no_grad_prefix_changes_nothing_in_the_forward(tiny_generator, k):
    full = _render(_twin(tiny_generator))[1]
    part = _render(_twin(tiny_generator, grad_steps=k))[1]
    assert torch.equal(full, part)


def test_fewer_grad_steps_give_a_different_gradient_and_all_steps_the_full_one(tiny_generator):
    def grad(**kw):
        rows, img = _render(_twin(tiny_generator, **kw))
        (img * torch.linspace(0, 1, img.numel()).view_as(img)).sum().backward()
        return rows.grad

    full = grad()
    torch.testing.assert_close(grad(grad_steps=tiny_generator.steps), full)  # k = steps is all of them
    assert not torch.allclose(grad(grad_steps=1), full)  # the earlier steps' share is gone


def test_only_the_last_k_steps_keep_a_graph(tiny_generator):
    g = _twin(tiny_generator, grad_steps=2)
    cond = g.encode([g.soft_prompt("{}", 1)], [g.init_rows(1, "random", 0).requires_grad_(True)])
    leaves = []

    def leaf(i, c):
        x = c.detach().requires_grad_(True)
        leaves.append(x)
        return x

    img = g.generate(cond, [[5]], on_step=leaf)
    grads = torch.autograd.grad(img.sum(), leaves, allow_unused=True)
    assert [gr is not None and bool(gr.abs().sum() > 0) for gr in grads] == [False, False, True, True]


@pytest.mark.parametrize("k", [0, 5, -1])
def test_bad_grad_steps_is_a_one_line_error(tiny_generator, k):
    with pytest.raises(DxrayError, match=r"generator.grad_steps") as err:
        _twin(tiny_generator, grad_steps=k)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("k", [0, 5])
def test_bad_grad_steps_in_the_config_names_the_field(k):
    with pytest.raises(DxrayError, match=r"generator.grad_steps") as err:
        load_config(TINY_YAML, [f"generator.grad_steps={k}"])
    assert "\n" not in str(err.value)


def test_unset_grad_steps_keeps_existing_run_and_task_ids():
    from dxray.identity import task_id as _task_id

    # Values computed by the code before the option existed.
    assert Config().fingerprint() == "08ca9b68c9d7"
    cfg = load_config(TINY_YAML)
    assert cfg.fingerprint() == "c4cf05784bf8"
    assert _task_id(cfg, kind="class", class_index=0) == "2a21d07722a6d520"
    set_k = load_config(TINY_YAML, ["generator.grad_steps=1"])
    assert set_k.fingerprint() != cfg.fingerprint()
    assert _task_id(set_k, kind="class", class_index=0) != _task_id(cfg, kind="class", class_index=0)


def test_explainer_passes_grad_steps_to_the_generator(tmp_path, cache_dir):
    from dxray.pipeline.explainer import Explainer

    cfg = load_config(TINY_YAML, [f"output={tmp_path}", f"cache_dir={cache_dir}", "device=cpu",
                                  "generator.grad_steps=2"])
    assert Explainer(cfg).generator.grad_steps == 2
