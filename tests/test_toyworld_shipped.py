"""The toy world travels (issue 31): it ships as pinned weights, loads on any CPU with its pinned outputs, is
refused when a file is damaged, and a rebuild is compared with it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dxray.errors import DxrayError
from dxray.toyworld import shipped
from dxray.toyworld.train import ensure_toyworld, ensure_unbiased_classifier, ensure_vit_classifier


def test_the_shipped_world_loads_without_training_and_gives_its_pinned_outputs(tmp_path):
    said = []
    root = ensure_toyworld(tmp_path, log=said.append)
    unbiased = ensure_unbiased_classifier(tmp_path, log=said.append)
    vit = ensure_vit_classifier(tmp_path, log=said.append)
    assert not said  # nothing was trained
    assert unbiased == root / "classifier-unbiased" and vit == root / "classifier-vit"
    pinned = json.loads((shipped.WEIGHTS / shipped.PINNED).read_text())
    got = shipped.pinned_outputs(root)
    # (world v5's classifiers are pinned under "v5": tests/test_toyworld_v5.py)
    assert set(got) == set(pinned) - {"v5"} == {"generator", "classifier", "classifier-unbiased", "classifier-vit"}
    # Computed on the CPU that shipped the world; another CPU's float kernels differ by rounding only.
    for model in shipped.CLASSIFIERS:
        torch.testing.assert_close(torch.tensor(got[model]), torch.tensor(pinned[model]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got["generator"]), torch.tensor(pinned["generator"]), atol=2e-3, rtol=0)
    # The pinned inputs tell the two classifiers and the prompts apart: the check is not vacuous.
    assert (torch.tensor(got["classifier"]) - torch.tensor(got["classifier-unbiased"])).abs().max() > 1
    assert (torch.tensor(got["generator"][0]) - torch.tensor(got["generator"][1])).abs().max() > 0.05


def _damage(path, at=100):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_damaged_shipped_file_or_cached_copy_is_refused_in_one_line(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    shutil.copytree(shipped.WEIGHTS, weights)
    monkeypatch.setattr(shipped, "WEIGHTS", weights)
    _damage(weights / "generator" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DxrayError, match=r"generator/unet/diffusion_pytorch_model\.safetensors does not match"):
        ensure_toyworld(tmp_path / "a", log=lambda m: None)
    assert not (tmp_path / "a" / "toyworld-v4" / ".complete").exists()  # nothing half-built is left as a world

    monkeypatch.setattr(shipped, "WEIGHTS", shipped.Path(shipped.__file__).parent / "weights")
    root = ensure_toyworld(tmp_path / "b", log=lambda m: None)
    _damage(root / "classifier" / "model.safetensors")  # the cached copy is altered after it was installed
    with pytest.raises(DxrayError, match=r"classifier/model\.safetensors does not match its pinned sha256"):
        ensure_toyworld(tmp_path / "b", log=lambda m: None)


def test_a_rebuild_is_compared_with_the_shipped_world(tmp_path):
    rebuilt = tmp_path / "world"
    for model in ("generator", "classifier"):
        shutil.copytree(shipped.WEIGHTS / model, rebuilt / model)
    assert shipped.differences(rebuilt) == {}  # the same files: equal bit for bit
    name = "classifier/model.safetensors"
    tensors = load_file(rebuilt / name)
    key = sorted(tensors)[3]
    tensors[key] = tensors[key] + 0.25
    save_file(tensors, rebuilt / name)
    assert shipped.differences(rebuilt) == {name: pytest.approx(0.25, abs=1e-6)}
    del tensors[key]
    save_file(tensors, rebuilt / name)
    assert shipped.differences(rebuilt) == {name: float("inf")}  # a tensor missing: not the same model


def test_a_world_of_another_seed_is_trained_not_copied(monkeypatch, tmp_path):
    """Only seed 0 ships; another seed must reach the trainer (stopped here before minutes of training)."""
    from dxray.toyworld import train

    def stop(*a, **k):
        raise RuntimeError("training started")

    monkeypatch.setattr(train, "train_classifier", stop)
    with pytest.raises(RuntimeError, match="training started"):
        ensure_toyworld(tmp_path, log=lambda m: None, seed=3)
    assert shipped.available(0) and shipped.available(None) and not shipped.available(3)
