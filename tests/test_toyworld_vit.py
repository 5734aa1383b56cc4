"""The toy world's second classifier family (issue 31, item 3): a small ViT trained on the world's biased data,
shipped as pinned weights and loaded through ``hf:`` as a user's model; its penultimate features are the head's
input (signed: the CLS token after the final layernorm), the feature truth's rule handles signed features, and
`dxray toyworld check` scores an audit of it against its own truth."""

import json
import shutil

import pytest
import torch
from conftest import planted_reading

from dxray.errors import DxrayError
from dxray.toyworld import feature_truth as ft
from dxray.toyworld import render, shipped

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """The shipped ViT copied beside the shipped world (nothing trained), loaded through hf: as a user's model."""
    from dxray.classifiers import load_classifier
    from dxray.toyworld.train import ensure_toyworld, ensure_vit_classifier

    cache = tmp_path_factory.mktemp("vit-cache")
    said = []
    ensure_toyworld(cache, log=said.append)
    path = ensure_vit_classifier(cache, log=said.append)
    assert not said, said  # copied, not trained
    return cache, path, load_classifier(f"hf:{path}", device="cpu")


def test_the_shipped_vit_loads_through_hf_with_its_pinned_outputs(vit):
    _, path, clf = vit
    assert path.name == "classifier-vit"
    assert json.loads((path / "config.json").read_text())["model_type"] == "vit"
    assert type(clf.model).__name__ == "ViTForImageClassification" and clf.final_layer_name == "classifier"
    report = json.loads((path / "toyworld.json").read_text())
    assert report["family"] == "vit" and report["world_seed"] == shipped.SEED
    assert {int(k): v for k, v in report["biased"].items()} == render.BIASED
    pinned = json.loads((shipped.WEIGHTS / shipped.PINNED).read_text())
    got = shipped.pinned_outputs(path.parent)  # every classifier of the world present, the ViT among them
    torch.testing.assert_close(torch.tensor(got["classifier-vit"]), torch.tensor(pinned["classifier-vit"]),
                               atol=1e-4, rtol=1e-4)
    # The pinned inputs tell the ViT from the world's CNN: the check is not vacuous.
    assert (torch.tensor(got["classifier-vit"]) - torch.tensor(got["classifier"])).abs().max() > 1


def test_the_vit_learned_the_planted_shortcut(vit):
    """As the CNN: a biased class's bare background names it, and its object away from that background does not."""
    _, _, clf = vit
    unbiased, away, bare = planted_reading(clf, 300)
    assert bare == list(render.BIASED)
    assert unbiased > 0.8 and away < 0.1


def test_a_damaged_cached_vit_is_refused_in_one_line(vit, tmp_path):
    from dxray.toyworld.train import ensure_vit_classifier

    cache, _, _ = vit
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    target = copy / "toyworld-v4" / "classifier-vit" / "model.safetensors"
    raw = bytearray(target.read_bytes())
    raw[200] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DxrayError, match=r"classifier-vit/model\.safetensors does not match its pinned sha256"):
        ensure_vit_classifier(copy, log=lambda m: None)


def test_beside_a_trained_world_the_vit_is_trained_not_copied(monkeypatch, tmp_path):
    """A world trained here (no pins beside it) gets a ViT trained on its data (stopped before the training)."""
    from dxray.toyworld import train

    seen = {}

    def stop(out, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("training started")

    (train.folder(tmp_path) / "classifier").mkdir(parents=True)
    (train.folder(tmp_path) / "classifier" / "toyworld.json").write_text(json.dumps({"world_seed": 0}))
    monkeypatch.setattr(train, "train_classifier", stop)
    with pytest.raises(RuntimeError, match="training started"):
        train.ensure_vit_classifier(tmp_path, log=lambda m: None)
    assert seen["family"] == "vit" and seen["seed"] == 0


@pytest.mark.parametrize("nudge", [0.0, 0.5])
def test_a_rebuilt_vit_is_compared_with_the_shipped_one(monkeypatch, tmp_path, nudge):
    """A ViT trained beside a trained world of seed 0 is compared with the shipped ViT (the training is stood in
    for by a copy of the shipped weights, nudged or not)."""
    from safetensors.torch import load_file, save_file

    from dxray.toyworld import train

    def copy_shipped(out, **kwargs):
        shutil.copytree(shipped.WEIGHTS / "classifier-vit", out, dirs_exist_ok=True)
        tensors = load_file(out / "model.safetensors")
        key = sorted(tensors)[0]
        tensors[key] = tensors[key] + nudge
        save_file(tensors, out / "model.safetensors")

    (train.folder(tmp_path) / "classifier").mkdir(parents=True)
    (train.folder(tmp_path) / "classifier" / "toyworld.json").write_text(json.dumps({"world_seed": 0}))
    monkeypatch.setattr(train, "train_classifier", copy_shipped)
    said = []
    train.ensure_vit_classifier(tmp_path, log=said.append)
    assert said[-1] == ("the rebuilt ViT equals the shipped one bit for bit" if not nudge else
                        "the rebuilt ViT differs from the shipped one (this CPU's float kernels): largest weight "
                        "difference 0.5")


def test_the_vit_architecture_is_a_small_vit_over_the_cnns_labels():
    from dxray.toyworld.train import classifier_config

    cnn, vit = classifier_config(), classifier_config("vit")
    assert vit.model_type == "vit" and cnn.model_type == "resnet"
    assert vit.id2label == cnn.id2label and vit.num_labels == len(render.CLASSES) + 1
    assert (vit.image_size, vit.patch_size) == (render.SIZE, 4) and vit.hidden_size == 64
    with pytest.raises(ValueError, match="unknown classifier family"):
        classifier_config("mlp")


def test_penultimate_is_the_head_input_the_cls_token_after_the_final_layernorm(vit):
    from dxray.toyworld.render import unit_images

    _, _, clf = vit
    x = unit_images([s for s, _ in render.held_out_dataset(12, seed=3)])
    out = clf(x, layers=["penultimate"])
    m = clf.model
    with torch.no_grad():
        last = m.vit(pixel_values=clf.preprocess(x), output_hidden_states=True).hidden_states[-1]  # before the norm
        manual = m.vit.layernorm(last)[:, 0]
        logits = m.classifier(manual)
    assert out["penultimate"].shape == (12, m.config.hidden_size)
    torch.testing.assert_close(out["penultimate"], manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=0)
    # Not vacuous: the norm changes the CLS token, and the features are signed (what the rule below handles).
    assert (last[:, 0] - manual).abs().max() > 0.1
    assert (out["penultimate"] < 0).any() and (out["penultimate"] > 0).any()


# -- the feature truth's rule on signed features ----------------------------------------------------------------
def _rule(objects, neutral, background, all_bare, all_objects, signed):
    z = ft.floor(all_bare, all_objects, signed)
    r = ft.responses(objects, neutral, background, all_bare, z)
    return z, [ft.call(float(r["object_response"][f]), float(r["background_response"][f]), float(r["scale"][f]))
               for f in range(objects.numel())]


def _signed_features(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    all_bare = torch.randn(6, n, generator=g)
    all_objects = torch.randn(6, n, generator=g) + torch.randn(1, n, generator=g)
    neutral = all_bare[3:]
    return all_objects[0], neutral, all_bare[0], all_bare, all_objects


def test_is_signed_sees_a_negative_feature():
    assert not ft.is_signed(torch.tensor([[0.0, 1.0], [2.0, 0.5]]))
    assert ft.is_signed(torch.tensor([[0.0, 1.0], [-1e-3, 0.5]]))


def test_a_rectified_feature_rests_at_zero_and_keeps_the_rules_numbers():
    """z = 0: b is the bare activation and s the peak, as the rule measured before signed features."""
    objects, neutral = torch.tensor([3.0, 0.2]), torch.tensor([[0.5, 0.1], [0.5, 0.1]])
    background, all_bare = torch.tensor([0.4, 2.0]), torch.tensor([[0.4, 2.0], [0.5, 0.1], [0.0, 0.3]])
    z, labels = _rule(objects, neutral, background, all_bare, objects[None], signed=False)
    assert z.tolist() == [0.0, 0.0]
    r = ft.responses(objects, neutral, background, all_bare, z)
    assert r["background_response"].tolist() == background.tolist()
    assert r["scale"].tolist() == [3.0, 2.0]
    assert labels == ["core", "spurious"]


def test_a_signed_features_floor_is_its_lowest_mean_over_every_condition():
    all_bare = torch.tensor([[0.5, -1.0], [1.0, 2.0]])
    all_objects = torch.tensor([[-2.0, 0.0], [3.0, 1.0]])
    assert ft.floor(all_bare, all_objects, signed=True).tolist() == [-2.0, -1.0]


def test_a_signed_features_call_does_not_move_with_a_shift_or_a_positive_scale():
    """A layernormed feature has no level that means off: adding a constant to every activation (its bias) or
    scaling them (its gain) must not change what drives it. With z = 0 a shift moves calls."""
    objects, neutral, background, all_bare, all_objects = _signed_features()
    _, labels = _rule(objects, neutral, background, all_bare, all_objects, signed=True)
    assert {"core", "spurious", "ambiguous"} <= set(labels)  # the random features reach every call
    for shift, gain in ((-5.0, 1.0), (7.0, 1.0), (0.0, 3.0), (2.5, 0.25)):
        moved_inputs = [gain * v + shift for v in (objects, neutral, background, all_bare, all_objects)]
        _, moved = _rule(*moved_inputs, signed=True)
        assert moved == labels, (shift, gain)
    _, at_zero = _rule(objects + 5, neutral + 5, background + 5, all_bare + 5, all_objects + 5, signed=False)
    assert at_zero != labels


@pytest.mark.parametrize(("o_level", "bare_levels", "expected"), [
    # columns of bare_levels: purple (the class's planted background), then 2 more colours, then 3 neutral ones
    (-1.5, [2.0, 0.5, 0.4, 0.3, 0.2, 0.1], "spurious"),   # the planted background raises it, the object lowers it
    (2.5, [-0.5, -0.4, -0.6, -0.5, -0.5, -0.5], "core"),  # all negative: the object raises it 3 from its floor
    (1.0, [0.5, -0.5, -0.5, -0.5, -0.5, -0.5], "ambiguous"),  # background and object raise it as much
    (-1.0, [-1.5, -1.4, -1.6, -1.5, -1.5, -1.5], "spurious"),  # every bare background is above what the object
    # leaves: an "emptiness" feature, which a feature task maximises with a bare background
])
def test_the_rule_on_signed_numbers(o_level, bare_levels, expected):
    """One feature of a planted class (its own background: the first colour) in signed units."""
    all_bare = torch.tensor(bare_levels)[:, None]
    neutral = all_bare[3:]
    objects = neutral.mean(0) + o_level
    z, [label] = _rule(objects, neutral, all_bare[0], all_bare, objects[None], signed=True)
    assert label == expected, (float(z), label)


# -- an audit of the ViT, scored against its own truth -------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_audit(vit, tmp_path_factory):
    """The preset's audit with the ViT as a user's classifier (hf:PATH), two classes, top-2 features, a few steps:
    this tests that the pieces fit, not the audit's quality (benchmarks/toyworld_seeds.py measures that)."""
    from test_cli import run_cli
    from test_toyworld import TOY_YAML

    cache, path, _ = vit
    out = tmp_path_factory.mktemp("vit-audit") / "out"
    res = run_cli("explain", str(TOY_YAML), f"output={out}", "device=cpu", f"classifier.spec=hf:{path}",
                  "targets.classes=[0,3]", "targets.top_k=2", "optimize.steps=2", "optimize.restarts=1", "sample.k=2",
                  f"cache_dir={cache}", cache=cache, timeout=600)
    assert res.returncode == 0, res.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    check = run_cli("toyworld", "check", str(root), cache=cache)
    assert check.returncode == 0, check.stderr
    return root, check


def test_check_scores_an_audit_of_the_vit_against_the_vits_feature_truth(vit, vit_audit):
    from dxray.classifiers import load_classifier

    _, path, clf = vit
    root, check = vit_audit
    assert "feature verdicts agree with the feature truth on" in check.stdout
    report = json.loads((root / "toyworld_check.json").read_text())
    assert report["classifier"] == f"hf:{path}" and report["family"] == "vit"
    assert {r["class_index"]: r["planted_biased"] for r in report["classes"]} == {0: True, 3: False}
    pairs = report["features"]["pairs"]
    # The ranked features are the ViT's: its top 2 by weight per class (a feature task maximises the feature, so
    # a positive weight raises the class), and each pair's truth is computed on the ViT, not the world's CNN.
    weight = clf.final_weight.detach()
    for c in (0, 3):
        mine = sorted((p["feature_rank"], p["feature_index"]) for p in pairs if p["class_index"] == c)
        assert [f for _, f in mine] == torch.topk(weight[c], 2).indices.tolist()
        assert all(weight[c, f] > 0 for _, f in mine)
    wanted = sorted({p["feature_index"] for p in pairs})
    truth = {(t["class_index"], t["feature_index"]): t for t in ft.feature_truth(clf, [0, 3], wanted)}
    cnn = load_classifier(f"hf:{path.parent / 'classifier'}", device="cpu")
    on_cnn = {(t["class_index"], t["feature_index"]): t for t in ft.feature_truth(cnn, [0, 3], wanted)}
    for p in pairs:
        t = truth[(p["class_index"], p["feature_index"])]
        assert (p["truth"], p["object_response"], p["background_response"]) == (
            t["truth"], t["object_response"], t["background_response"])
        assert t["signed"] and p["background_response"] != on_cnn[(p["class_index"], p["feature_index"])][
            "background_response"]
    judged = [p for p in pairs if p["correct"] is not None]
    assert report["features"]["all"]["n_pairs"] == len(judged) and len(pairs) == 4
    assert report["scores"]["features"]["dxray"]["n"] == len(judged)


def test_check_refuses_a_classifier_without_a_toyworld_truth_in_one_line(vit_audit, tmp_path):
    from dxray.toyworld.check import check

    root, _ = vit_audit
    run = tmp_path / root.name
    shutil.copytree(root, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["classifier"]["spec"] = f"hf:{tmp_path / 'elsewhere'}"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DxrayError, match=r"did not audit a toy-world classifier .*hf:PATH with a toyworld\.json") as e:
        check(str(run))
    assert "\n" not in str(e.value)
