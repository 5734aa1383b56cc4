"""Classifier loading, preprocessing and activations, on tiny random models saved and loaded back."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dxray import classifiers
from dxray.classifiers import describe, load_classifier
from dxray.errors import DxrayError
from dxray.generator import LCMGenerator

NAMES = ["cat", "dog", "fish"]


def raises(match: str, fn, *args, **kwargs) -> str:
    """``fn`` raises a one-line DxrayError matching ``match``; returns the message."""
    with pytest.raises(DxrayError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


@pytest.fixture(scope="module")
def tv(resnet, tmp_path_factory):
    """A torchvision classifier loaded through a .safetensors checkpoint."""
    path = tmp_path_factory.mktemp("tv") / "resnet.safetensors"
    save_file(resnet.state_dict(), str(path))
    return load_classifier("torchvision:resnet18", weights=str(path), kwargs={"num_classes": 5}, input_size=64)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3,
                          id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    return ResNetForImageClassification(config).eval()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    from transformers import ViTImageProcessor

    folder = tmp_path_factory.mktemp("hf") / "tiny-resnet"
    hf_model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 40, "width": 48}, image_mean=[0.1, 0.2, 0.3],
                      image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    return folder


def images(b: int = 2, h: int = 80, w: int = 80, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_torchvision_safetensors_roundtrip(tv, resnet):
    x = images()
    assert torch.equal(tv(x)["logits"], resnet(tv.preprocess(x)))
    assert (tv.num_classes, tv.class_names, tv.input_size) == (5, [f"class_{i}" for i in range(5)], (64, 64))
    assert (tv.mean, tv.std) == (classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD)
    assert not tv.training and not any(p.requires_grad for p in tv.parameters())
    tv.train()
    assert not tv.model.training


def test_pt_state_dict_loads_weights_only(resnet, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
    clf = load_classifier("torchvision:resnet18", weights=str(path), kwargs={"num_classes": 5}, input_size=32)
    x = images(h=32, w=32)
    assert torch.equal(clf(x)["logits"], resnet(clf.preprocess(x)))


def test_pickled_checkpoint_needs_allow_pickle(resnet, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": resnet.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    spec, opts = "torchvision:resnet18", {"weights": str(path), "kwargs": {"num_classes": 5}, "input_size": 32}
    raises("allow_pickle", load_classifier, spec, **opts)
    clf = load_classifier(spec, **opts, allow_pickle=True)
    x = images(h=32, w=32)
    assert torch.equal(clf(x)["logits"], resnet(clf.preprocess(x)))


def test_bad_checkpoints(resnet, tmp_path):
    raises("weights file not found", load_classifier, "torchvision:resnet18", weights=str(tmp_path / "no.pt"))
    path = tmp_path / "other.safetensors"
    save_file(torchvision.models.resnet18(num_classes=4).state_dict(), str(path))
    raises("does not fit the model", load_classifier, "torchvision:resnet18", weights=str(path),
           kwargs={"num_classes": 5})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    raises("junk.pt", load_classifier, "torchvision:resnet18", weights=str(junk))


def test_hf_roundtrip_with_processor(hf_dir, hf_model):
    clf = load_classifier(f"hf:{hf_dir}")
    assert (clf.class_names, clf.num_classes, clf.input_size) == (NAMES, 3, (40, 48))
    assert clf.mean == pytest.approx((0.1, 0.2, 0.3)) and clf.std == pytest.approx((0.4, 0.5, 0.6))
    x = images()
    pre = clf.preprocess(x)
    assert pre.shape == (2, 3, 40, 48)
    assert torch.equal(clf(x)["logits"], hf_model(pixel_values=pre).logits)
    assert clf.final_layer_name == "classifier.1"


def test_hf_without_processor_uses_imagenet_defaults(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "m")
    clf = load_classifier(f"hf:{tmp_path / 'm'}", class_names=["a", "b", "c"], input_size=(24, 32))
    assert (clf.mean, clf.std, clf.input_size) == (classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD, (24, 32))
    assert clf.class_names == ["a", "b", "c"]
    assert load_classifier(f"hf:{tmp_path / 'm'}").input_size == classifiers.IMAGENET_SIZE


def test_penultimate_is_the_final_linear_input(tv, hf_dir):
    for clf in (tv, load_classifier(f"hf:{hf_dir}")):
        out = clf(images(), layers=["penultimate", "logits"])
        expected = out["penultimate"] @ clf.final_weight.T + clf.final_linear.bias
        torch.testing.assert_close(expected, out["logits"])
        assert clf.final_weight.shape == (clf.num_classes, out["penultimate"].shape[1])


def test_named_layers_gradients_and_hook_cleanup(tv):
    x = images().requires_grad_(True)
    out = tv(x, layers=["layer3", "layer1.0.relu", "penultimate"])
    assert out["layer3"].shape == (2, 256, 4, 4) and out["layer1.0.relu"].shape == (2, 64, 16, 16)
    out["layer3"][:, 7].mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    hooked = [n for n, m in tv.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    with pytest.raises(RuntimeError):  # a failing forward still removes its hooks
        tv(torch.rand(1, 2, 64, 64), layers=["layer3", "penultimate"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tv.modules())


def test_hf_stage_output_is_unwrapped(hf_dir):
    clf = load_classifier(f"hf:{hf_dir}")
    out = clf(images(), layers=["resnet.encoder", "resnet.encoder.stages.1"])
    assert out["resnet.encoder"].shape == out["resnet.encoder.stages.1"].shape == (2, 16, 5, 6)


def test_unknown_layer_lists_available_names(tv):
    msg = raises("unknown layer 'layer9'", tv, images(), layers=["layer9"])
    assert "logits, penultimate, conv1" in msg and msg.endswith("...")


def test_preprocess_resizes_normalises_and_is_differentiable(tv):
    clf = load_classifier("torchvision.models:resnet18", kwargs={"num_classes": 4}, input_size=(8, 12),
                          mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    colour = torch.tensor([0.2, 0.6, 1.0])
    flat = colour.view(1, 3, 1, 1).expand(2, 3, 16, 20).clone()
    expected = ((colour - torch.tensor([0.5, 0.25, 0.0])) / torch.tensor([0.5, 0.25, 2.0])).view(1, 3, 1, 1)
    out = clf.preprocess(flat)
    assert out.shape == (2, 3, 8, 12)
    torch.testing.assert_close(out, expected.expand(2, 3, 8, 12))
    x = images(1, 8, 12).requires_grad_(True)  # already the input size: no resize, exact arithmetic
    out = clf.preprocess(x)
    torch.testing.assert_close(out[0, 1], (x[0, 1] - 0.25) / 0.25)
    out.sum().backward()
    torch.testing.assert_close(x.grad[0, :, 0, 0], torch.tensor([2.0, 4.0, 0.5]))
    y = images(1, 30, 30).requires_grad_(True)  # downsampling is antialiased
    smooth = torch.nn.functional.interpolate(y, size=(8, 12), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(clf.preprocess(y)[0, 2], smooth[0, 2] / 2.0)
    clf.preprocess(y).square().sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_callable_spec():
    clf = load_classifier("torchvision.models:resnet18", kwargs={"num_classes": 4}, input_size=32)
    assert clf(images(1, 32, 32))["logits"].shape == (1, 4)
    info = describe("torchvision.models:resnet18", kwargs={"num_classes": 4}, class_names=list("abcd"))
    assert (info.spec, info.num_classes, info.class_names) == ("torchvision.models:resnet18", 4, list("abcd"))


def test_core_loaders_know_no_preset_names(tmp_path, monkeypatch):
    """'tiny' is resolved by dxray.models; to the core loaders it is only a hub id that does not exist."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DXRAY_CACHE", str(tmp_path))
    with pytest.raises(DxrayError, match="tiny"):
        load_classifier("tiny")
    with pytest.raises(DxrayError, match="cannot load generator 'tiny'"):
        LCMGenerator.from_pretrained("tiny", device="cpu")
    assert not any(tmp_path.iterdir())  # nothing was built


def test_describe_reads_architecture_only(hf_dir, tmp_path):
    info = describe("torchvision:resnet18", weights="DEFAULT")  # categories from metadata, no download
    assert info.num_classes == 1000 and info.class_names[0] == "tench"
    assert info.layer_names[:3] == ["logits", "penultimate", "conv1"] and "layer4.1.bn2" in info.layer_names
    info = describe(f"hf:{hf_dir}")
    assert (info.num_classes, info.class_names) == (3, NAMES)
    assert {"classifier.1", "resnet.encoder.stages.0"} <= set(info.layer_names)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n\nc\nd\ne\n")
    info = describe("torchvision:resnet18", kwargs={"num_classes": 5}, class_names=str(names))
    assert info.class_names == list("abcde")


def test_describe_builds_on_meta_device(monkeypatch):
    seen = {}
    real = torchvision.models.get_model

    def spy(*args, **kwargs):
        seen["model"] = real(*args, **kwargs)
        return seen["model"]

    monkeypatch.setattr(torchvision.models, "get_model", spy)
    describe("torchvision:resnet18", kwargs={"num_classes": 5})
    assert all(p.is_meta for p in seen["model"].parameters())


def test_spec_errors(tmp_path, hf_dir):
    for spec in ("resnet50", "http://example.com/m", "torchvision:", "a b:c"):
        raises("unknown classifier spec", describe, spec)
    raises("unknown torchvision model 'resnet999'", describe, "torchvision:resnet999")
    raises("unknown weights 'IMAGENET9K'.*IMAGENET1K_V1", describe, "torchvision:resnet18", weights="IMAGENET9K")
    raises("weights file not found", describe, "torchvision:resnet18", weights=str(tmp_path / "x.safetensors"))
    raises("classifier folder not found", describe, f"hf:{tmp_path / 'missing'}")
    raises("classifier folder not found", load_classifier, "hf:./no/such/folder")
    raises("cannot load classifier 'hf:nobody/no-such-model'", describe, "hf:nobody/no-such-model",
           kwargs={"local_files_only": True})
    raises("cannot import", describe, "no_such_module_xyz:build")
    raises("not a torch.nn.Module", describe, "builtins:dict")
    raises("with kwargs", describe, "torchvision:resnet18", kwargs={"no_such_arg": 1})


def test_class_name_and_final_layer_errors(hf_dir, tmp_path):
    raises("2 names but the classifier has 3 classes", describe, f"hf:{hf_dir}", class_names=["a", "b"])
    raises("class_names file not found", describe, f"hf:{hf_dir}", class_names=str(tmp_path / "none.txt"))
    raises("no final nn.Linear", load_classifier, "torchvision:resnet18", final_layer="layer4")
    raises("unknown layer 'fc9'.*conv1", load_classifier, "torchvision:resnet18", final_layer="fc9")
    clf = load_classifier("torchvision:mobilenet_v3_small", kwargs={"num_classes": 7}, final_layer="classifier")
    assert clf.final_layer_name == "classifier.3" and clf.final_weight.shape == (7, 1024)


def test_timm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import fails whether or not timm is installed
    raises(r"timm is not installed; pip install 'dxray\[timm\]'", describe, "timm:resnet18")


# Issue 30: a pickled .bin in a model folder, a class_names file that is not UTF-8 and kwargs errors are one
# line; the refusal points at classifier.allow_pickle or safetensors, never at weights_only=False.

def _pickled_bin(model, folder) -> None:
    """``folder`` as transformers' .bin layout (pytorch_model.bin, no safetensors), its pickle holding an object
    weights-only loading refuses (a training script's argparse.Namespace beside the tensors)."""
    model.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({**model.state_dict(), "args": argparse.Namespace(lr=0.1)}, folder / "pytorch_model.bin")


def test_hf_folder_with_a_pickled_bin_points_at_allow_pickle(hf_model, tmp_path):
    folder = tmp_path / "pickled"
    _pickled_bin(hf_model, folder)
    msg = raises("classifier.allow_pickle=true", load_classifier, f"hf:{folder}")
    assert "pytorch_model.bin" in msg and "argparse.Namespace" in msg and "safetensors" in msg
    assert "weights_only" not in msg
    clf = load_classifier(f"hf:{folder}", allow_pickle=True)  # the advice works: the same weights
    x = images()
    assert torch.equal(clf(x)["logits"], hf_model(pixel_values=clf.preprocess(x)).logits)


def test_lcm_part_with_a_pickled_bin_points_at_safetensors(cache_dir, tmp_path):
    import shutil

    from transformers import CLIPTextModel

    from dxray.models.tiny import ensure_tiny_lcm

    folder = tmp_path / "lcm"
    shutil.copytree(ensure_tiny_lcm(cache_dir), folder)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    shutil.rmtree(folder / "text_encoder")
    _pickled_bin(encoder, folder / "text_encoder")
    msg = raises("safe_serialization=True", LCMGenerator.from_pretrained, str(folder), device="cpu")
    assert "text_encoder/pytorch_model.bin" in msg and "argparse.Namespace" in msg and "weights_only" not in msg


@pytest.mark.parametrize("what", ["detector", "SAM"])
def test_segmenter_folder_with_a_pickled_bin_points_at_safetensors(cache_dir, tmp_path, what):
    """As the classifier's and the LCM's: Grounding DINO or SAM saved as a pickled .bin was exit 3."""
    import shutil

    from transformers import AutoModelForZeroShotObjectDetection, SamModel

    from dxray.models.tiny_segment import ensure_tiny_grounding_dino, ensure_tiny_sam
    from dxray.segment import Segmenter

    build, cls = {"detector": (ensure_tiny_grounding_dino, AutoModelForZeroShotObjectDetection),
                  "SAM": (ensure_tiny_sam, SamModel)}[what]
    src = build(cache_dir)
    folder = tmp_path / what
    _pickled_bin(cls.from_pretrained(src), folder)
    for f in src.iterdir():  # the processor's files beside the weights
        if f.is_file() and not (folder / f.name).exists() and f.suffix != ".safetensors":
            shutil.copy(f, folder)
    other = {"detector": str(ensure_tiny_grounding_dino(cache_dir)), "sam": str(ensure_tiny_sam(cache_dir))}
    other["detector" if what == "detector" else "sam"] = str(folder)
    msg = raises("safe_serialization=True", Segmenter, device="cpu", **other)
    assert msg.startswith(f"{what} ") and "pytorch_model.bin" in msg and "argparse.Namespace" in msg
    assert "weights_only" not in msg


def test_class_names_file_that_is_not_utf8(hf_dir, tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("chat\nchien\npoisson\n".encode("utf-16"))
    msg = raises("is not UTF-8 text", describe, f"hf:{hf_dir}", class_names=str(path))
    assert msg.startswith("classifier.class_names: file") and str(path) in msg


def test_kwargs_errors_name_the_keys_never_the_values():
    secret = "abc/def+ghi=%2F"
    msg = raises("with kwargs", describe, "torchvision:resnet18", weights="none",
                 kwargs={"token": secret, "headers": {"Authorization": f"Bearer {secret}"}, "pwd": [secret]})
    assert "token, headers, pwd" in msg and secret not in msg and "Bearer" not in msg
