"""World v5's classifiers and their known answers (issue 31), on the classifiers of world seed 0 that ship with dxray
(copied, not trained: the same weights on every CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from dxray.classifiers import load_classifier
from dxray.toyworld import feature_truth as ft
from dxray.toyworld import render as R
from dxray.toyworld import shipped, v5
from dxray.toyworld import shortcuts as S


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """World 0's CNN at rho 1 and at rho 0, as v5.ensure_classifier gives them (the shipped copies)."""
    cache, said = tmp_path_factory.mktemp("v5"), []
    out = {}
    for rho in (1.0, 0.0):
        folder = v5.ensure_classifier(cache, seed=0, rho=rho, log=said.append)
        out[rho] = (json.loads((folder / "toyworld.json").read_text()), load_classifier(f"hf:{folder}", device="cpu"))
    assert not said  # nothing was trained
    return out


def test_every_shipped_v5_classifier_loads_without_training_and_gives_its_pinned_outputs(tmp_path):
    said, folders = [], {}
    for family, rhos in shipped.V5_RHOS.items():
        for rho in rhos:
            folder = v5.ensure_classifier(tmp_path, seed=0, rho=rho, family=family, log=said.append)
            folders[f"v5-{v5.classifier_name(family, rho)}"] = folder
            truth = json.loads((folder / "toyworld.json").read_text())
            assert (truth["world_version"], truth["family"], truth["rho"], truth["world_seed"]) == (5, family, rho, 0)
    assert not said and set(folders) == set(shipped.V5)
    pinned = json.loads((shipped.WEIGHTS / shipped.PINNED).read_text())["v5"]
    got = shipped.pinned_v5_outputs(folders)
    assert set(got) == set(pinned) == set(shipped.V5)
    for name in got:  # computed on the CPU that shipped them; another CPU's kernels differ by rounding only
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(pinned[name]), atol=1e-4, rtol=1e-4)
    # the pinned inputs tell the strengths apart: the check is not vacuous
    assert (torch.tensor(got["v5-classifier-cnn-rho1"]) - torch.tensor(got["v5-classifier-cnn-rho0"])).abs().max() > 1


def test_a_damaged_cached_v5_classifier_is_refused_and_another_seed_is_trained(tmp_path, monkeypatch):
    from dxray.errors import DxrayError

    folder = v5.ensure_classifier(tmp_path, seed=0, rho=1.0, log=lambda m: None)
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[200] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DxrayError, match=r"model\.safetensors does not match its pinned sha256"):
        v5.ensure_classifier(tmp_path, seed=0, rho=1.0, log=lambda m: None)

    def stop(*a, **k):
        raise RuntimeError("training started")

    monkeypatch.setattr(v5, "train_classifier", stop)
    with pytest.raises(RuntimeError, match="training started"):  # only seed 0 ships
        v5.ensure_classifier(tmp_path, seed=3, rho=1.0, log=lambda m: None)


def test_the_class_truth_names_every_planted_class_at_rho_1_and_none_at_rho_0(trained):
    truth, _ = trained[1.0]
    assert truth["world_version"] == 5 and truth["rho"] == 1.0
    assert set(truth["biased"]) == {str(c) for c in S.PLANTED}
    for c, concept in truth["biased"].items():
        assert concept in {cut.concept for cut in S.PLANTED[int(c)]}
        cues = truth["cue_probability"][c]
        assert cues["object"] < v5.NAMES <= max(v for k, v in cues.items() if k != "object")
    assert sorted(truth["unbiased"]) == [c for c in range(len(R.CLASSES)) if c not in S.PLANTED]
    nothing, _ = trained[0.0]
    assert nothing["biased"] == {} and nothing["planted"] == {}
    assert sorted(nothing["unbiased"]) == list(range(len(R.CLASSES)))  # every object names its class, no cue does


def test_the_feature_truth_follows_the_rule_and_names_each_planted_kind_at_rho_1(trained):
    _, classifier = trained[1.0]
    rows = v5.feature_truth(classifier)
    assert {(r["class_index"], r["feature_index"]) for r in rows} == {
        (c, f) for c in range(len(R.CLASSES)) for f in range(64)}  # the CNN's penultimate width
    for r in rows:
        cuts = r["shortcut_responses"]
        assert set(cuts) == ({cut.kind for cut in S.PLANTED[r["class_index"]]} if r["planted_biased"] else {"background"})
        strongest = max(cuts, key=cuts.get)
        assert r["background_response"] == cuts[strongest]
        assert r["truth"] == ft.call(r["object_response"], cuts[strongest], r["scale"])
        assert r["kind"] == (strongest if r["truth"] == "spurious" else None)
    kinds = {r["kind"] for r in rows if r["planted_biased"] and r["truth"] == "spurious"}
    assert kinds == set(S.KINDS)


def test_the_v5_tokenizer_reads_every_caption_word_as_one_token():
    tok = v5.tokenizer()
    for scene in S.generator_dataset(200, seed=1):
        text = R.caption(scene)
        assert len(tok(text).input_ids) == len(text.split()) + 2, text  # + start and end


def _v5_truth():
    return {"planted": {str(c): [{"kind": cut.kind, "concept": cut.concept} for cut in cuts]
                        for c, cuts in S.PLANTED.items()}, "biased": {"0": "purple", "1": "cyan"}, "ambiguous": [2]}


def test_the_check_names_the_shortcut_behind_each_spurious_pair_and_accepts_either_cue_of_a_two_shortcut_class():
    from dxray.toyworld.check import (
        concept_naming,
        feature_agreement,
        feature_calls,
        shortcut_concepts,
    )

    truth = _v5_truth()
    concepts = shortcut_concepts(truth)
    assert concepts[(1, "marker")] == "cyan" and concepts[(1, "background")] == "orange"
    assert concepts[(2, "pattern")] == "magenta"

    def verdict(c, f, v, top):
        return {"class_index": c, "class_name": R.CLASS_NAMES[c], "feature_index": f, "feature_rank": 1, "template": "t",
                "verdict": v, "mean_object_fraction": 0.0, "top_concepts": [top], "control_object_fraction": 0.0,
                "delta": 0.01}

    def row(c, f, label, kind):
        return {"class_index": c, "feature_index": f, "truth": label, "kind": kind, "planted_biased": c in (0, 1),
                "object_response": 0.0, "background_response": 1.0, "scale": 1.0}

    verdicts = [verdict(1, 3, "spurious", "orange"), verdict(1, 4, "spurious", "teal"), verdict(0, 5, "core", "red")]
    rows = [row(1, 3, "spurious", "background"), row(1, 4, "spurious", "marker"), row(0, 5, "core", None)]
    calls = feature_calls(verdicts, feature_agreement(verdicts, rows)["pairs"], concepts)
    assert [(c["kind"], c["concept"], c["top_concept"]) for c in calls] == [
        ("background", "orange", "orange"), ("marker", "cyan", "teal"), (None, None, "red")]
    named = concept_naming([], verdicts, truth)["spurious_features"]
    # class 1 is named by either of its cues (orange: right), never by another colour (teal: wrong)
    assert (named["n"], named["n_correct"]) == (2, 1)
    assert [i["planted"] for i in named["items"]] == ["cyan or orange"] * 2


def test_generator_fidelity_counts_what_the_shipped_generator_draws_for_a_plain_prompt(cache_dir):
    """The sweep's ceiling figure, on the shipped (v4) world: its generator draws most prompted objects."""
    from dxray.toyworld.train import ensure_toyworld

    world = ensure_toyworld(cache_dir)
    classifier = load_classifier(f"hf:{world / 'classifier'}", device="cpu")
    got = v5.generator_fidelity(world / "generator", classifier, images=4, backgrounds=("teal", "brown"))
    assert set(got["per_class"]) == set(R.CLASS_NAMES)
    assert all(0 <= v[k] <= 1 and (v[k] * 8).is_integer() for v in got["per_class"].values() for k in ("found", "read"))
    assert got["found"] == sum(v["found"] for v in got["per_class"].values()) / len(R.CLASSES)
    assert got["found"] >= 0.5, got  # v4 world 0: 0.67 over four backgrounds (benchmarks/README.md)
    # the biased CNN never saw the planted classes' objects: it reads them less than the unplanted ones
    planted = [got["per_class"][R.CLASS_NAMES[c]]["read"] for c in R.BIASED]
    others = [v["read"] for name, v in got["per_class"].items() if R.CLASS_NAMES.index(name) not in R.BIASED]
    assert sum(planted) < sum(others)


def test_the_check_scores_each_v5_shortcut_kind_and_leaves_v4_as_one():
    from dxray.toyworld.check import by_kind, score_lines

    def call(unit, truth, called, kind=None, concept=None):
        return {"unit": unit, "truth": truth, "called": called, "kind": kind, "concept": concept, "score": 0.0,
                "control": False}

    calls = [call(1, True, True, "marker", "cyan"), call(2, True, False, "pattern", "magenta"),
             call(3, False, True), call(4, True, True, "background", "purple")]
    kinds = by_kind(calls)
    assert list(kinds) == ["background", "marker", "pattern"]
    pattern = kinds["pattern"]["dxray"]
    assert (pattern["tp"], pattern["fn"], pattern["fp"], pattern["tn"]) == (0, 1, 1, 0)  # the core pair counts for all
    lines = score_lines({"scores": {"features_by_kind": kinds}})
    assert [line.split(":")[0] for line in lines] == [f"  dxray on {k} shortcuts" for k in kinds]
    assert by_kind([call(1, True, True, "background", "purple"), call(2, False, False)]) is None  # v4: one kind
