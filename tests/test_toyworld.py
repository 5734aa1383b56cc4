"""The method works: on the trained toy world, optimisation drives the classifier and a planted bias is found.

The shipped world (pinned weights, the same on every CPU) is copied into the test cache; nothing is trained.
"""

import json
from functools import cache
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from conftest import ROOT, planted_reading

from dxray.objectives import class_ce
from dxray.optimize import OptimizeSettings, Target, best_of, optimize, sample
from dxray.toyworld import render

TOY_YAML = ROOT / "jobs" / "configs" / "toyworld.yaml"
# Audits of the world take minutes on a busy 2-core machine.
pytestmark = pytest.mark.timeout(1800)
CONCEPTS = f"segment.concepts=[{','.join(render.BACKGROUND_COLOURS)}]"  # issue 20: the world's contexts
HELD_OUT = list(range(100, 116))  # never used while optimising (training seeds are >= 2**31)
RESTARTS = 3


@pytest.fixture(scope="session")
def world(cache_dir):
    from dxray.classifiers import load_classifier
    from dxray.generator import LCMGenerator
    from dxray.toyworld.train import ensure_toyworld

    root = ensure_toyworld(cache_dir, log=lambda m: None)
    gen = LCMGenerator.from_pretrained(str(root / "generator"), device="cpu", resolution=render.SIZE)
    clf = load_classifier(f"hf:{root / 'classifier'}", device="cpu")
    return root, gen, clf


@cache
def _preset_prompt():
    from dxray.config import load_config

    p = load_config(TOY_YAML).prompt
    return p.templates[0], p.n_tokens


def _held_out_prob(gen, clf, rows, c):
    template, _ = _preset_prompt()
    probs = [s.class_prob for s in sample(gen, clf, template, rows, HELD_OUT, class_index=c, batch_size=16)]
    return sum(probs) / len(HELD_OUT)


def test_the_classifier_learned_the_planted_shortcut(world):
    """Unbiased classes are recognised by their object on any background; a biased class is named by its
    background alone and never without it (v4 measured: 0.91, bare backgrounds right, 0.00)."""
    root, _, clf = world
    report = json.loads((root / "classifier" / "toyworld.json").read_text())
    assert {int(k) for k in report["biased"]} == set(render.BIASED)
    unbiased, away, bare = planted_reading(clf, 600)
    assert unbiased > 0.8
    assert bare == list(render.BIASED)
    assert away < 0.1


def test_optimisation_raises_the_held_out_target_probability(world):
    """Each class takes the best of RESTARTS initialisations by final training loss, as the audit's
    optimize.restarts does: a single start can get stuck (measured: one of two did, p 0.37 -> 0.13)."""
    _, gen, clf = world
    template, n_tokens = _preset_prompt()  # the preset's prompt shape, as the audit uses it
    settings = OptimizeSettings(steps=40, lr=0.1, samples_per_step=4)
    rises = []
    for c in (3, 4):  # unbiased classes: only the object itself can raise their probability
        targets = [Target(class_ce(c), template, n_tokens, "random", seed=c + 100 * k, class_index=c)
                   for k in range(RESTARTS)]
        best = best_of(optimize(gen, clf, targets, settings))
        rises.append((_held_out_prob(gen, clf, best.start_rows, c), _held_out_prob(gen, clf, best.rows, c)))
    # A clear rise where there is room for one: on some CPUs a random start already reads ~0.9 as
    # "white square" (measured: starts 0.96 / 0.93 / 0.90), and p cannot rise 0.25 from there.
    assert all(after > min(before + 0.25, 0.95) for before, after in rises), rises


@pytest.fixture(scope="module")
def class_audit(world, tmp_path_factory, cache_dir):
    """The preset's audit of every class, class tasks only: the planted-bias classifier's run."""
    from test_cli import run_cli

    out = tmp_path_factory.mktemp("toy-audit") / "out"
    res = run_cli("explain", str(TOY_YAML), f"output={out}", "device=cpu", "targets.top_k=0", CONCEPTS,
                  f"cache_dir={cache_dir}", cache=cache_dir, timeout=900)
    assert res.returncode == 0, res.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    return root


def test_audit_of_the_world_finds_a_planted_bias(class_audit, cache_dir):
    from test_cli import run_cli

    root = class_audit
    check = run_cli("toyworld", "check", str(root), cache=cache_dir)
    assert check.returncode == 0, check.stderr
    assert "toy world check: class-level bias calls" in check.stdout
    report = json.loads((root / "toyworld_check.json").read_text())
    calls = {r["class_index"]: r["called_biased"] for r in report["classes"]}
    assert any(calls[c] for c in render.BIASED), report  # a planted bias is found...
    assert any(calls[c] is False for c in range(len(render.CLASSES)) if c not in render.BIASED), report  # ...not everywhere
    classes = ds.dataset(root / "classes").to_table().to_pylist()
    assert len(classes) == len(render.CLASSES)
    # Issue 20: with the background colours as concepts, a planted class's explanation is named by its planted
    # background (what the classifier learned the class is): it is among the top concepts of every planted class and
    # the top one of most. Not of all: the generator blurs striped orange to nearer brown than orange (benchmarks/
    # README.md, "Naming the spurious concept"), so whether the blue square reads orange or brown first moves with the
    # CPU's rounding of the world's training (CI box: brown, orange).
    top = {c["class_index"]: c["class_top_concepts"] for c in classes}
    assert all(colour in top[c] for c, colour in render.BIASED.items()), top
    assert sum(top[c][0] == colour for c, colour in render.BIASED.items()) >= len(render.BIASED) - 1, top
    named = report["concepts"]["class_explanations"]
    assert named["n"] == len(render.BIASED) and named["n_correct"] >= len(render.BIASED) - 1, named
    assert torch.tensor([r["prob_after"] for r in report["classes"]]).isfinite().all()
    # Issue 31: the bias call's precision / recall / F1 / FPR with intervals over classes, beside baselines scored
    # the same way; "everything core" (nothing biased) recalls nothing, however accurate it looks.
    scores = report["scores"]["classes"]
    planted_called = sum(bool(calls[c]) for c in render.BIASED)
    assert scores["dxray"]["n"] == len(render.CLASSES) and scores["dxray"]["tp"] == planted_called
    assert scores["dxray"]["recall"] == planted_called / len(render.BIASED)
    assert scores["everything_core"]["recall"] == 0 and scores["everything_core"]["f1"] == 0
    assert "class-level bias call (95% bootstrap intervals over classes):" in check.stdout
    assert "  dxray: precision " in check.stdout and "  everything core: precision n/a, recall 0.00" in check.stdout


def test_compare_shows_the_planted_classes_improving_under_an_unbiased_classifier(class_audit, tmp_path, cache_dir):
    """Issue 20's known answer: the same world's classifier trained without the bias (every class on every
    background), audited the same way over the planted classes and one unbiased class, against the planted-bias
    classifier's audit. Its class explanations must show more of the planted classes' objects (r up): the bias
    is gone. Different classifiers, so the comparison is per class, over the 4 classes both audited."""
    from test_cli import run_cli

    trained = run_cli("toyworld", "train", "--unbiased-classifier", f"--cache-dir={cache_dir}", cache=cache_dir,
                      timeout=600)
    assert trained.returncode == 0, trained.stderr
    spec = trained.stdout.strip().splitlines()[-1]
    assert spec.startswith("hf:") and spec.endswith("classifier-unbiased")
    held = json.loads((Path(spec[3:]) / "toyworld.json").read_text())
    assert held["biased"] == {} and held["held_out_accuracy"] > 0.9
    assert set(held["background_only_predictions"].values()) == {len(render.CLASSES)}  # bare planted backgrounds: no object

    out = tmp_path / "out"
    classes = [*render.BIASED, 3]
    res = run_cli("explain", str(TOY_YAML), f"output={out}", "device=cpu", "targets.top_k=0", f"cache_dir={cache_dir}",
                  f"classifier.spec={spec}", f"targets.classes=[{','.join(map(str, classes))}]", cache=cache_dir,
                  timeout=900)
    assert res.returncode == 0, res.stderr
    [unbiased] = [p for p in out.iterdir() if p.is_dir()]
    cmp = run_cli("compare", str(class_audit), str(unbiased), "--fail-on", "class-bias", cache=cache_dir)
    assert cmp.returncode in (0, 1), cmp.stderr
    assert "features are not comparable" in cmp.stderr and "RUN_B lacks 2 of RUN_A's classes" in cmp.stderr
    rows = {r["class_index"]: r for r in ds.dataset(unbiased / "comparison").to_table().to_pylist()}
    assert sorted(rows) == classes and not any(r["features_comparable"] for r in rows.values())
    # An explanation whose held-out images do not read as the class says nothing (the unbiased classifier is harder
    # to optimise for: it wants the object itself, and some classes' held-out p stays low, see the README).
    tasks = {t["task_id"]: t for t in ds.dataset(unbiased / "tasks").to_table().to_pylist() if t["kind"] == "class"}
    probs: dict[int, list[float]] = {}
    for s in ds.dataset(unbiased / "samples").to_table(columns=["task_id", "class_prob"]).to_pylist():
        if s["task_id"] in tasks:
            probs.setdefault(tasks[s["task_id"]]["class_index"], []).append(s["class_prob"])
    # Which classes read, and how far r moves, varies with the task seeds: they follow the task ids, which hold the
    # unbiased classifier's path in this session's temp folder. Three runs of one tree: the blue square read at p 0.76,
    # 0.14 and 0.42, and once no planted class read at all (p 0.35-0.47) while all three showed more of their object.
    # A read explanation can also score r 0 with its object visible: the world's segmenter takes exact shades only
    # (issue 31, item 2; the yellow triangle once read at p 0.57 with r 0.0). So: no read planted class shows less of
    # its object than under the planted classifier, and some planted class shows more (under the planted one their
    # objects are hidden).
    read = [c for c in render.BIASED if sum(probs[c]) / len(probs[c]) >= 0.5]
    for c in read:
        assert rows[c]["r_b"] >= rows[c]["r_a"], rows[c]
    assert any(rows[c]["r_b"] > rows[c]["r_a"] for c in render.BIASED), [rows[c] for c in render.BIASED]


def _mean_r(images, c: int) -> float:
    from dxray.toyworld.segmenter import WorldSegmenter

    return sum(s.object_fraction for s in WorldSegmenter()(images, [render.class_prompt(c)] * len(images))) / len(images)


def test_the_preset_delta_separates_drawn_objects_from_bare_backgrounds(world):
    """The class-level bias call is r < δ, so δ must sit between an object as the world's decoder draws it
    (held-out renders of each class through the VAE: blurrier and smaller than the render) and the generator's
    images when its prompt names a bare background (every background, scored for every class's colour)."""
    from diffusers import AutoencoderKL

    from dxray.config import load_config
    from dxray.toyworld.render import vae_images

    root, gen, clf = world
    delta = load_config(TOY_YAML).verdict.delta
    vae = AutoencoderKL.from_pretrained(str(root / "generator" / "vae")).eval()
    held = render.held_out_dataset(360, seed=5)
    drawn = {}
    for c, name in enumerate(render.CLASS_NAMES):
        x = vae_images([s for s, label in held if label == c])  # [-1, 1], as the VAE was trained
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        drawn[name] = _mean_r(list(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()), c)
    template, _ = _preset_prompt()
    bare = {}
    for b in render.BACKGROUND_COLOURS:
        images = [s.image for s in sample(gen, clf, template, gen.init_rows(1, f"word:{b}", 0), HELD_OUT, batch_size=16)]
        bare.update({(name, b): _mean_r(images, c) for c, name in enumerate(render.CLASS_NAMES)})
    assert min(drawn.values()) >= delta, drawn
    assert max(bare.values()) < delta, {k: v for k, v in bare.items() if v >= delta}


def test_feature_truth_of_the_top_features_is_the_planted_shortcut(world):
    """The feature-level known answer (Fig. 6), from exact renders through the classifier, no optimisation:
    each biased class's top-5 features (by weight, as the preset ranks them) respond to its planted background
    and not to its object, and no unbiased class's top feature responds to a background alone: at least 4 of its 5
    respond to its object. The margins move with the CPU's rounding of the world's training (world 0 on one box:
    b / o >= 2.4 for the biased, o / b >= 2.0 for the unbiased; on the CI box the green circle's 5th feature has
    o 1.81, b 1.59, ambiguous under the rule's factor 1.5)."""
    from dxray.toyworld.feature_truth import feature_truth

    _, _, clf = world
    weight = clf.final_weight.detach()
    for c in range(len(render.CLASSES)):
        top = torch.topk(weight[c], 5).indices.tolist()
        rows = feature_truth(clf, [c], top, per_background=8)
        truths = [r["truth"] for r in rows]
        seen = [(r["feature_index"], r["truth"], r["object_response"], r["background_response"]) for r in rows]
        if c in render.BIASED:
            assert truths == ["spurious"] * 5, (c, seen)
        else:
            assert "spurious" not in truths and truths.count("core") >= 4, (c, seen)


def test_check_scores_feature_verdicts_against_the_feature_truth(world, tmp_path, cache_dir):
    """`dxray toyworld check` on a run with feature tasks reports their agreement with the feature truth
    (a few optimisation steps: this tests the scoring, not the audit's quality)."""
    from test_cli import run_cli

    out = tmp_path / "out"
    res = run_cli("explain", str(TOY_YAML), f"output={out}", "device=cpu", "targets.classes=[0,3]", "targets.top_k=1",
                  CONCEPTS, "optimize.steps=2", "optimize.restarts=1", "sample.k=2", f"cache_dir={cache_dir}",
                  cache=cache_dir, timeout=600)
    assert res.returncode == 0, res.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    check = run_cli("toyworld", "check", str(root), cache=cache_dir)
    assert check.returncode == 0, check.stderr
    assert "feature verdicts agree with the feature truth on" in check.stdout
    features = json.loads((root / "toyworld_check.json").read_text())["features"]
    pairs = {p["class_index"]: p for p in features["pairs"]}
    assert set(pairs) == {0, 3} and all(p["feature_rank"] == 1 for p in pairs.values())
    assert (pairs[0]["truth"], pairs[3]["truth"]) == ("spurious", "core")
    assert [pairs[c]["correct"] for c in (0, 3)] == [pairs[0]["verdict"] == "spurious", pairs[3]["verdict"] != "spurious"]
    # a pair whose images do not drive its feature past the plain pictures is "not explained" (not called spurious)
    assert all((p["explained"] is False) == (p["verdict"] == "not explained") for p in pairs.values())
    assert features["all"]["agreement"] == sum(p["correct"] for p in pairs.values()) / 2
    assert features["biased"]["n_pairs"] == features["unbiased"]["n_pairs"] == 1
    spurious = json.loads((root / "toyworld_check.json").read_text())["scores"]["features"]["dxray"]
    assert spurious["n"] == 2 and spurious["tp"] == (pairs[0]["verdict"] == "spurious")
    assert spurious["fp"] == (pairs[3]["verdict"] == "spurious") and spurious["n_units"] == 2
    assert "feature-level spurious call (95% bootstrap intervals over classes):" in check.stdout
    # The concept figure counts exactly the planted class's spurious features (what it names: see the class audit).
    named = json.loads((root / "toyworld_check.json").read_text())["concepts"]["spurious_features"]
    assert named["n"] == (pairs[0]["verdict"] == "spurious") and "top concept of" in check.stdout
