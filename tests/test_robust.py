"""robust-resnet50:PATH and `dxray convert-checkpoint`, on checkpoints built here in the MadryLab
``robustness`` library's layout (random-init torchvision ResNet-50, real size)."""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from typer.testing import CliRunner

from dxray.classifiers import RobustResNet50, describe, load_classifier
from dxray.cli import app
from dxray.errors import DxrayError

# Not ImageNet's, so a loader that ignored the checkpoint's normaliser would fail the logit checks.
MEAN = torch.tensor([0.40, 0.50, 0.60])
STD = torch.tensor([0.20, 0.25, 0.30])


def raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DxrayError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def robustness_sd(net: torch.nn.Module, attacker: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """AttackerModel.state_dict() under DataParallel: normaliser, network, attacker's normaliser and network
    (``attacker=None``: the same tensors, as in a real checkpoint; else another network's)."""
    sd = {"module.normalizer.new_mean": MEAN.view(3, 1, 1), "module.normalizer.new_std": STD.view(3, 1, 1)}
    sd |= {f"module.model.{k}": v for k, v in net.state_dict().items()}
    sd |= {"module.attacker.normalize.new_mean": torch.zeros(3, 1, 1), "module.attacker.normalize.new_std": torch.ones(3, 1, 1)}
    sd |= {f"module.attacker.model.{k}": v for k, v in (attacker or net).state_dict().items()}
    return sd


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    for m in model.modules():  # non-trivial batch-norm statistics, so unloaded buffers would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("robust")
    other = torchvision.models.resnet50().eval()  # a different attacker copy: must be ignored
    paths = {"model": folder / "imagenet_l2_3_0.pt", "state_dict": folder / "legacy.pt",
             "pickled": folder / "with_args.pt"}
    torch.save({"model": robustness_sd(net, other), "epoch": 90}, paths["model"])
    torch.save({"state_dict": robustness_sd(net, None), "epoch": 90}, paths["state_dict"])
    torch.save({"model": robustness_sd(net, None), "epoch": 90, "args": argparse.Namespace(arch="resnet50", eps=3.0)},
               paths["pickled"])
    return paths


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(net, x):
    """A hand-built torchvision ResNet-50 with the same weights on (clamp(x, 0, 1) - mean) / std."""
    with torch.no_grad():
        return net((x.clamp(0, 1) - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))


def logits(clf, x):
    with torch.no_grad():
        return clf(x)["logits"]


@pytest.mark.parametrize("kind", ["model", "state_dict"])
def test_loads_network_and_normaliser_not_attacker(kind, ckpts, x, reference):
    clf = load_classifier(f"robust-resnet50:{ckpts[kind]}")
    assert torch.equal(clf.preprocess(x), x)  # normalised once, inside the model
    assert torch.equal(logits(clf, x), reference)
    assert torch.equal(clf.model.normalizer.new_mean, MEAN.view(3, 1, 1))
    assert (clf.num_classes, clf.class_names[0], clf.input_size) == (1000, "tench", (224, 224))
    if kind == "model":
        acts = clf(x, ["penultimate", "layer4"])
        assert acts["penultimate"].shape == (2, 2048) and acts["layer4"].shape == (2, 2048, 7, 7)
        assert clf.final_layer_name == "fc"
        # out-of-range pixels are clamped as the robustness library does
        assert torch.equal(logits(clf, x * 1.5 - 0.25), logits(clf, (x * 1.5 - 0.25).clamp(0, 1)))


def test_pickled_checkpoint_needs_the_opt_in(ckpts, x, reference):
    spec = f"robust-resnet50:{ckpts['pickled']}"
    msg = raises("classifier.allow_pickle=true", load_classifier, spec)
    assert "dxray convert-checkpoint" in msg and "argparse.Namespace" in msg and str(ckpts["pickled"]) in msg
    assert torch.equal(logits(load_classifier(spec, allow_pickle=True), x), reference)


def test_convert_checkpoint_round_trips(ckpts, tmp_path, x, reference):
    runner = CliRunner()
    dst = tmp_path / "out" / "robust.safetensors"
    dst.parent.mkdir()
    refused = runner.invoke(app, ["convert-checkpoint", str(ckpts["pickled"]), str(dst)])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output and not dst.exists()

    done = runner.invoke(app, ["convert-checkpoint", str(ckpts["pickled"]), str(dst), "--allow-pickle"])
    assert done.exit_code == 0, done.output
    assert str(dst) in done.stdout
    tensors = load_file(str(dst))
    with torch.device("meta"):
        layout = RobustResNet50().state_dict()
    assert tensors.keys() == layout.keys()  # prefix stripped, attacker copy dropped, normaliser kept
    assert torch.equal(tensors["normalizer.new_std"], STD.view(3, 1, 1))
    assert torch.equal(logits(load_classifier(f"robust-resnet50:{dst}"), x), reference)  # no pickle needed

    bad = runner.invoke(app, ["convert-checkpoint", str(ckpts["model"]), str(tmp_path / "robust.pt")])
    assert bad.exit_code == 2 and "must end in .safetensors" in bad.output


def _cli_error(*args) -> str:
    r = CliRunner().invoke(app, ["convert-checkpoint", *map(str, args)])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_convert_checkpoint_needs_an_existing_dst_folder(ckpts, tmp_path):
    dst = tmp_path / "no" / "such" / "folder" / "robust.safetensors"
    msg = _cli_error(ckpts["model"], dst)
    assert f"DST's folder {dst.parent} does not exist" in msg and not (tmp_path / "no").exists()
    (tmp_path / "taken.safetensors").mkdir()
    assert "is a folder" in _cli_error(ckpts["model"], tmp_path / "taken.safetensors")
    assert "must end in .safetensors" in _cli_error(ckpts["model"], tmp_path / "robust.bin")


def test_convert_checkpoint_refuses_files_without_resnet_weights(tmp_path):
    from safetensors.torch import save_file

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"embedding.weight": torch.zeros(4, 2), "step": torch.zeros(1)}, str(unrelated))
    no_resnet = tmp_path / "mlp.pt"
    torch.save({"model": {"module.model.linear1.weight": torch.zeros(3, 3), "module.normalizer.new_mean": MEAN}},
               no_resnet)
    partial = tmp_path / "partial.pt"
    resnet18 = torchvision.models.resnet18().state_dict()  # conv/fc keys, but not ResNet-50's
    torch.save({"model": {f"module.model.{k}": v for k, v in resnet18.items()}}, partial)
    for src in (unrelated, no_resnet, partial):
        dst = tmp_path / f"{src.stem}-converted.safetensors"
        msg = _cli_error(src, dst)
        assert f"checkpoint {src} does not hold a robustness ResNet-50" in msg and "conv1.weight" in msg, msg
        assert not dst.exists()


def test_convert_checkpoint_help_has_an_example():
    r = CliRunner().invoke(app, ["convert-checkpoint", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "Example: dxray convert-checkpoint" in text


def test_describe_without_weights(ckpts, tmp_path):
    info = describe(f"robust-resnet50:{ckpts['model']}")
    assert (info.num_classes, info.feature_dim, len(info.class_names)) == (1000, 2048, 1000)
    assert info.class_names[:2] == ["tench", "goldfish"] and {"normalizer", "layer4", "fc"} <= set(info.layer_names)
    missing = tmp_path / "nowhere" / "imagenet_l2_3_0.pt"
    msg = raises("robust-resnet50 checkpoint not found", describe, f"robust-resnet50:{missing}")
    assert str(missing) in msg
    raises("robust-resnet50 checkpoint not found", load_classifier, f"robust-resnet50:{missing}")
    raises("classifier.weights must stay DEFAULT", describe, f"robust-resnet50:{ckpts['model']}", weights="none")


def test_describe_lists_a_missing_checkpoint_when_asked(tmp_path):
    """The dry run of a job meant for another machine: the architecture alone describes the model."""
    where = tmp_path / "elsewhere" / "imagenet_l2_3_0.pt"
    missing: list[str] = []
    info = describe(f"robust-resnet50:{where}", missing=missing)
    assert missing == [str(where)] and (info.num_classes, info.feature_dim) == (1000, 2048)
    assert info.layer_widths["layer4"] == 2048 and info.layer_widths["logits"] == 1000
    weights = tmp_path / "resnet18.safetensors"
    missing.clear()
    assert describe("torchvision:resnet18", weights=str(weights), missing=missing).feature_dim == 512
    assert missing == [str(weights)]
    raises("classifier weights file not found", describe, "torchvision:resnet18", weights=str(weights))
