"""Compare an audit of the toy world with its planted truth.

Class-level bias call (paper Fig. 3): a class is called *biased* when the object is missing from
its class explanation, i.e. its mean object fraction r is below the run's δ, and the classifier reads that
explanation as the class (``explained``: :func:`dxray.verdict.class_call`; one it does not read is "not
explained" and counts as not called). Optimisation works for a class when the held-out target probability
after optimisation is well above chance.

Feature-level verdicts (paper Fig. 6): each (class, feature) verdict of the run (core / spurious) is
compared with :func:`dxray.toyworld.feature_truth.feature_truth`, a controlled experiment on exact
renders through the audited classifier; pairs whose truth is ambiguous are left out and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc

from dxray.errors import DxrayError
from dxray.runs import open_run
from dxray.toyworld import scores
from dxray.verdict import NOT_EXPLAINED, class_call


def _manifest(sink) -> dict:
    try:
        with sink.fs.open_input_stream(f"{sink.root}/manifest.json") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise DxrayError(f"run {sink.uri('')} has no manifest.json (did it finish?)") from None


def audited_classifier(sink) -> tuple[dict, str]:
    """(planted truth, classifier spec) of the toy-world classifier the run audited, found through its manifest:
    ``classifier.spec`` ``toyworld`` is the world's CNN in the run's cache (its truth stored beside it), and
    ``hf:PATH`` is any classifier of the world saved with its truth as ``PATH/toyworld.json`` (the world's ViT,
    its unbiased classifier)."""
    from dxray.toyworld.train import folder, truth

    manifest = _manifest(sink)
    spec = manifest["config"]["classifier"]["spec"]
    if spec == "toyworld":
        cache_dir = manifest["config"].get("cache_dir")
        return truth(cache_dir), f"hf:{folder(cache_dir) / 'classifier'}"
    path = Path(spec[3:]).expanduser() if spec.startswith("hf:") else None
    if path is None or not (path / "toyworld.json").is_file():
        raise DxrayError(f"run {sink.uri('')} did not audit a toy-world classifier (classifier.spec is {spec!r}: "
                         f"expected toyworld, or hf:PATH with a toyworld.json in PATH)")
    try:
        return json.loads((path / "toyworld.json").read_text()), spec
    except (OSError, ValueError) as err:
        raise DxrayError(f"cannot read the planted truth {path / 'toyworld.json'}: {' '.join(str(err).split())[:200]}"
                         ) from None


def planted_truth(sink) -> dict:
    """The truth stored with the classifier the run audited (found through the run's manifest)."""
    return audited_classifier(sink)[0]


def feature_agreement(verdicts: list[dict], truth_rows: list[dict]) -> dict:
    """The run's feature verdicts against the feature truth: overall and split by planted-biased /
    unbiased class (Fig. 6's split), with every pair listed."""
    truth = {(t["class_index"], t["feature_index"]): t for t in truth_rows}
    pairs = []
    for v in verdicts:
        t = truth[(v["class_index"], v["feature_index"])]
        call = v["verdict"]  # "not explained" is not a spurious call: against the truth it counts as core
        pairs.append({
            "class_index": v["class_index"], "class_name": v["class_name"], "feature_index": v["feature_index"],
            "feature_rank": v["feature_rank"], "template": v["template"], "verdict": call, "explained": v.get("explained"),
            "mean_object_fraction": v["mean_object_fraction"], "truth": t["truth"],
            "planted_biased": t["planted_biased"], "object_response": t["object_response"],
            "background_response": t["background_response"], "scale": t["scale"], "kind": t.get("kind"),
            "top_concept": (v.get("top_concepts") or [None])[0],
            "correct": None if t["truth"] == "ambiguous" else (call == "spurious") == (t["truth"] == "spurious"),
        })

    def share(rows):
        judged = [p["correct"] for p in rows if p["correct"] is not None]
        return {"agreement": sum(judged) / len(judged) if judged else None, "n_pairs": len(judged),
                "n_ambiguous": sum(p["correct"] is None for p in rows),
                "n_truth_spurious": sum(p["truth"] == "spurious" for p in rows),
                "n_dxray_spurious": sum(p["verdict"] == "spurious" for p in rows if p["correct"] is not None),
                "n_not_explained": sum(p["verdict"] == NOT_EXPLAINED for p in rows if p["correct"] is not None)}

    return {"all": share(pairs), "biased": share([p for p in pairs if p["planted_biased"]]),
            "unbiased": share([p for p in pairs if not p["planted_biased"]]), "pairs": pairs}


def concept_naming(classes: list[dict], verdicts: list[dict], truth: dict) -> dict | None:
    """Issue 20's known answer: a planted-biased class's cue is its background colour, so with the colours as
    ``segment.concepts`` that colour must be the top concept of its class explanation and of its spurious
    features. None when the run scored no concepts."""
    cues = shortcut_concepts(truth)  # v5: a class with two shortcuts is named by either
    planted = {int(k): sorted({v} | {name for (c, _), name in cues.items() if c == int(k)})
               for k, v in truth["biased"].items()}
    if not any(c.get("class_top_concepts") for c in classes) and not any(v.get("top_concepts") for v in verdicts):
        return None

    def named(rows, key):
        items = [{"class_index": r["class_index"], "feature_index": r.get("feature_index"),
                  "planted": " or ".join(planted[r["class_index"]]), "top_concept": (r.get(key) or [None])[0]}
                 for r in rows]
        right = [i["top_concept"] in planted[i["class_index"]] for i in items]
        return {"n": len(items), "n_correct": sum(right), "share": sum(right) / len(items) if items else None,
                "items": items}

    return {"class_explanations": named([c for c in classes if c["class_index"] in planted], "class_top_concepts"),
            "spurious_features": named([v for v in verdicts if v["class_index"] in planted
                                        and v["verdict"] == "spurious"], "top_concepts")}


def _control_call(row: dict) -> bool | None:
    """The segmenter control alone: the object is missing from the class's plain-prompt images (r < δ)."""
    r = row.get("control_object_fraction")
    return None if r is None else r < row["delta"]


def class_calls(classes: list[dict], rows: list[dict]) -> list[dict]:
    """The class-level bias calls (biased = positive) of the judged classes, one unit per class, with the
    segmenter control's own call (``control``: None without a control)."""
    control = {c["class_index"]: _control_call(c) for c in classes}
    return [{"unit": r["class_index"], "class_index": r["class_index"], "truth": r["planted_biased"],
             "called": r["called_biased"], "score": r["object_fraction"], "control": control.get(r["class_index"])}
            for r in rows if r["correct"] is not None]


def shortcut_concepts(truth: dict) -> dict[tuple[int, str], str]:
    """(class, shortcut kind) -> the concept that names it: v5's planted shortcuts, or v4's planted backgrounds."""
    if "planted" in truth:
        return {(int(c), cut["kind"]): cut["concept"] for c, cuts in truth["planted"].items() for cut in cuts}
    return {(int(c), "background"): b for c, b in truth["biased"].items()}


def _kind(pair: dict) -> str | None:
    """The shortcut kind behind a spurious truth: v5's row names it; v4's is always the background."""
    return pair.get("kind") or ("background" if pair["truth"] == "spurious" else None)


def feature_calls(verdicts: list[dict], pairs: list[dict], concepts: dict | None = None) -> list[dict]:
    """The spurious calls (spurious = positive) of the judged (class, feature) pairs, one unit per class (a class's
    features share its explanations), with the segmenter control's call for the pair's class, the shortcut
    kind behind a spurious truth (v5; v4's is its background) with its ``concept`` (``concepts``:
    :func:`shortcut_concepts`) and the verdict's top concept."""
    control = {(v["class_index"], v["feature_index"], v["template"]): _control_call(v) for v in verdicts}
    return [{"unit": p["class_index"], "class_index": p["class_index"], "feature_index": p["feature_index"],
             "truth": p["truth"] == "spurious", "called": p["verdict"] == "spurious",
             "score": p["mean_object_fraction"],
             "control": control.get((p["class_index"], p["feature_index"], p["template"])),
             "kind": _kind(p), "concept": (concepts or {}).get((p["class_index"], _kind(p))),
             "top_concept": p.get("top_concept")}
            for p in pairs if p["correct"] is not None]


def scored(calls: list[dict]) -> dict:
    """dxray's calls and the baselines (everything core, shuffled, the control alone), each with intervals."""
    return scores.scored(calls, lambda c: c["control"])


def by_kind(calls: list[dict]) -> dict[str, dict] | None:
    """World v5: the spurious call's figures per shortcut kind, each on the pairs whose truth is that kind or core
    (the false positives count against every kind). None for v4 (one kind)."""
    kinds = sorted({c["kind"] for c in calls if c.get("kind")})
    if not any(c.get("concept") for c in calls) or kinds in ([], ["background"]):
        return None
    return {k: scored([c for c in calls if not c["truth"] or c["kind"] == k]) for k in kinds}


def score_lines(report: dict) -> list[str]:
    """The figures of ``report["scores"]``, one line per caller: dxray first, then the baselines; world v5's
    per-kind figures for dxray alone."""
    out = []
    for level, what in (("classes", "class-level bias call"), ("features", "feature-level spurious call")):
        figures = (report.get("scores") or {}).get(level)
        if figures:
            out.append(f"{what} (95% bootstrap intervals over classes):")
            out += [f"  {scores.describe(name.replace('_', ' '), f)}" for name, f in figures.items()]
    for kind, figures in ((report.get("scores") or {}).get("features_by_kind") or {}).items():
        out.append(f"  dxray on {kind} shortcuts: {scores.describe('', figures['dxray'])[2:]}")
    return out


def check(run: str, truth: dict | None = None, well_above_chance: float = 3.0, classifier=None) -> dict:
    """Score a run; ``classifier``: the audited toy-world classifier for the feature truth (default: the one the
    run's manifest names, :func:`audited_classifier`)."""
    sink = open_run(run)
    spec = None
    if truth is None or classifier is None:
        audited, spec = audited_classifier(sink)
        truth = truth or audited
    classes = sink.read_table("classes")
    if classes is None:
        raise DxrayError(f"run {run} has no classes table (was segment.enabled false?)")
    tasks = sink.read_table("tasks")
    samples = sink.read_table("samples")
    class_tasks = tasks.filter(pc.equal(tasks["kind"], "class")).to_pylist()
    after = {}
    for t in class_tasks:
        probs = samples.filter(pc.equal(samples["task_id"], t["task_id"]))["class_prob"].to_pylist()
        after[t["task_id"]] = sum(probs) / len(probs) if probs else None
    biased_truth = {int(k) for k in truth["biased"]}
    ambiguous = {int(k) for k in truth.get("ambiguous", [])}  # v5: both cues name the class (v5.py)
    chance = 1.0 / len(truth["classes"])
    rows = []
    classes = classes.to_pylist()
    for c in classes:
        task = next((t for t in class_tasks if t["class_index"] == c["class_index"] and t["template"] == c["template"]),
                    None)
        r = c["class_object_fraction"]
        call = class_call(c)  # a class whose explanation the classifier does not read as the class: not biased
        called = None if call is None else call == "biased"
        prob_after = after.get(task["task_id"]) if task else None
        rows.append({
            "class_index": c["class_index"], "class_name": c["class_name"], "template": c["template"],
            "object_fraction": r, "called_biased": called, "call": call, "explained": c.get("explained"), "planted_biased": c["class_index"] in biased_truth,
            "correct": None if called is None or c["class_index"] in ambiguous
            else called == (c["class_index"] in biased_truth),
            "prob_before": task["baseline_prob"] if task else None, "prob_after": prob_after,
            "optimised": prob_after is not None and prob_after >= well_above_chance * chance,
        })
    judged = [r for r in rows if r["correct"] is not None]
    verdicts = sink.read_table("verdicts")
    verdicts = [] if verdicts is None else verdicts.to_pylist()
    features = None
    if verdicts:
        from dxray.toyworld import feature_truth as ft

        if classifier is None:
            from dxray.classifiers import load_classifier

            classifier = load_classifier(spec, device="cpu")
        wanted = sorted({v["feature_index"] for v in verdicts})
        judged_classes = sorted({v["class_index"] for v in verdicts})
        if truth.get("world_version") == 5:
            from dxray.toyworld import v5

            truth_rows = v5.feature_truth(classifier, judged_classes, wanted, biased=truth["biased"])
        else:
            truth_rows = ft.feature_truth(classifier, judged_classes, wanted)
        features = feature_agreement(verdicts, truth_rows) | {"margins": ft.margins()}
    calls = {"classes": class_calls(classes, rows),
             "features": feature_calls(verdicts, features["pairs"], shortcut_concepts(truth)) if features else []}
    report = {
        "scores": {level: scored(c) if c else None for level, c in calls.items()}
        | {"features_by_kind": by_kind(calls["features"])},
        "calls": calls,
        "concepts": concept_naming(classes, verdicts, truth),
        "run": sink.uri(""), "classifier": spec, "family": truth.get("family", "cnn"), "chance": chance, "well_above_chance": well_above_chance * chance,
        "bias_call_accuracy": sum(r["correct"] for r in judged) / len(judged) if judged else None,
        "optimised_fraction": sum(r["optimised"] for r in rows) / len(rows) if rows else None,
        "n_not_explained": sum(r["call"] == "not explained" for r in judged),
        "classes": rows,
        "feature_agreement": None if features is None else features["all"]["agreement"],
        "features": features,
        "targets": {"bias_call_accuracy": 0.9, "optimised_fraction": 0.8, "feature_agreement": 0.9},
    }
    sink.write_bytes("toyworld_check.json", (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report


def summary_line(report: dict) -> str:
    acc, opt = report["bias_call_accuracy"], report["optimised_fraction"]
    fmt = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731
    line = (f"toy world check: class-level bias calls {fmt(acc)} correct (target ≥ 90%); held-out target probability "
            f"≥ {report['well_above_chance']:.2f} for {fmt(opt)} of classes (target ≥ 80%)")
    if report.get("n_not_explained"):
        line += f" ({report['n_not_explained']} not explained: not called biased)"
    f = report.get("features")
    if f:
        a, b, u = f["all"], f["biased"], f["unbiased"]
        line += (f"; feature verdicts agree with the feature truth on {fmt(a['agreement'])} of {a['n_pairs']} pairs "
                 f"(biased classes {fmt(b['agreement'])} of {b['n_pairs']}, unbiased {fmt(u['agreement'])} of "
                 f"{u['n_pairs']}; {a['n_ambiguous']} ambiguous left out"
                 + (f"; {a['n_not_explained']} not explained, counted as not spurious" if a.get("n_not_explained") else "")
                 + "; target ≥ 90%)")
    k = report.get("concepts")
    if k:
        e, s = k["class_explanations"], k["spurious_features"]
        line += (f"; the planted background is the top concept of {e['n_correct']}/{e['n']} planted-biased class "
                 f"explanations and {s['n_correct']}/{s['n']} of their spurious features")
    return line
