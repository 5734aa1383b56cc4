"""Compare two finished audits, RUN_A (the baseline) and RUN_B (say, a new checkpoint), and gate on it.

Pure functions over the two runs' ``classes`` and ``verdicts`` tables; no model is loaded.

- **Classes** are matched on (class index, template). Classes only one side audited are left out and
  counted. A class is *biased* in a run when its class r (``class_object_fraction``) is below that
  run's δ: the class explanation barely shows the object (the report's "biased?" hint), unless the
  classifier did not read the explanation as the class (``explained`` false: "not explained").
- **Features** are matched on (class, feature index, template), and only when both runs audited the same
  classifier: the same ``classifier`` spec, weights, kwargs and final layer in their manifests. Feature
  1024 of a retrained or robust model is another unit, so then the comparison stays at the class level
  and says so. (A checkpoint retrained *into the same path* looks the same: give each its own path.)
- **New spurious** per class: its features core in RUN_A and spurious in RUN_B when features are
  comparable; otherwise how many more spurious features RUN_B has among its top-k.
- ``--fail-on``: ``new-spurious`` (a class with a new spurious feature) and ``class-bias`` (a class
  newly called biased) fail a check (exit 1) and name the classes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dxray.errors import DxrayError
from dxray.runs import check_decided, open_run
from dxray.storage import redact_text
from dxray.storage.sink import RunSink
from dxray.verdict import class_call

CLASSIFIER_KEYS = ("spec", "weights", "kwargs", "final_layer")
FAIL_ON = ("new-spurious", "class-bias")
_CLASS_COLUMNS = ["class_index", "class_name", "template", "class_object_fraction", "n_spurious", "n_features",
                  "delta", "explained"]
_VERDICT_COLUMNS = ["class_index", "class_name", "feature_index", "feature_rank", "template", "mean_object_fraction",
                    "mean_object_fraction_low", "mean_object_fraction_high", "delta", "verdict"]


@dataclass
class Side:
    """What one run contributes: its decided tables and the classifier it audited."""

    label: str  # RUN_A or RUN_B
    sink: RunSink
    classes: list[dict]
    verdicts: list[dict]
    classifier: dict

    @property
    def run_id(self) -> str:
        return self.sink.run_id


def read_side(run: str, label: str) -> Side:
    sink = open_run(run)
    manifest = sink.read_manifest()
    if manifest is None:
        raise DxrayError(f"{label} {run} has not finished (no readable manifest.json): re-run its command to finish it")
    for name in ("classes", "verdicts"):
        check_decided(sink, run, name, label)
    classes = sink.read_table("classes", columns=_CLASS_COLUMNS)
    if classes is None or classes.num_rows == 0:
        raise DxrayError(f"{label} {run} has no classes table (run with segmentation on: segment.enabled=true)")
    verdicts = sink.read_table("verdicts", columns=_VERDICT_COLUMNS)
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    clf = config.get("classifier") if isinstance(config.get("classifier"), dict) else {}
    return Side(label, sink, classes.to_pylist(), verdicts.to_pylist() if verdicts is not None else [],
                {k: clf.get(k) for k in CLASSIFIER_KEYS})


def _biased(row: dict) -> bool | None:
    """Called biased (:func:`dxray.verdict.class_call`; a class whose explanation was not explained is not)."""
    call = class_call(row)
    return None if call is None else call == "biased"


def _minus(b, a):
    return None if a is None or b is None else b - a


@dataclass
class Comparison:
    run_a: str
    run_b: str
    rows: list[dict]  # the comparison table: class rows, then feature rows
    features_comparable: bool
    classifier_a: dict
    classifier_b: dict
    only_a: list[int] = field(default_factory=list)  # classes RUN_A audited and RUN_B did not
    only_b: list[int] = field(default_factory=list)

    def class_rows(self) -> list[dict]:
        return [r for r in self.rows if r["level"] == "class"]

    def feature_rows(self) -> list[dict]:
        return [r for r in self.rows if r["level"] == "feature"]

    def offenders(self, condition: str) -> list[dict]:
        """The class rows that fail ``--fail-on condition``."""
        if condition == "new-spurious":
            return [r for r in self.class_rows() if (r["n_new_spurious"] or 0) > 0]
        if condition == "class-bias":
            return [r for r in self.class_rows() if r["change"] == "newly biased"]
        raise DxrayError(f"--fail-on must be one of {', '.join(FAIL_ON)}, got {condition!r}")


def compare(a: Side, b: Side) -> Comparison:
    """The comparison table of RUN_B against RUN_A (see the module docstring)."""
    comparable = a.classifier == b.classifier and a.classifier.get("spec") is not None
    base = {"run_id": b.run_id, "run_a": a.run_id, "features_comparable": comparable}
    a_classes = {(r["class_index"], r["template"]): r for r in a.classes}
    b_classes = {(r["class_index"], r["template"]): r for r in b.classes}
    keys = sorted(a_classes.keys() & b_classes.keys(), key=lambda k: (k[0], k[1] or ""))
    if not keys:
        raise DxrayError(f"RUN_A {a.run_id} and RUN_B {b.run_id} audited no class with the same template: "
                         f"nothing to compare")
    in_a, in_b = {c for c, _ in a_classes}, {c for c, _ in b_classes}

    features: list[dict] = []
    if comparable:
        a_verdicts = {(v["class_index"], v["feature_index"], v["template"]): v for v in a.verdicts}
        for v in sorted(b.verdicts, key=lambda v: (v["class_index"], v["template"] or "", v["feature_rank"] or 0,
                                                   v["feature_index"])):
            old = a_verdicts.get((v["class_index"], v["feature_index"], v["template"]))
            if old is None or (v["class_index"], v["template"]) not in a_classes:
                continue
            call_a, call_b = old["verdict"], v["verdict"]  # a pair not explained is neither core nor spurious
            change = ("same" if call_a == call_b else "new spurious" if call_b == "spurious" else
                      "new core" if call_b == "core" else "not explained")
            features.append(base | {
                "level": "feature", "class_index": v["class_index"], "class_name": v["class_name"],
                "template": v["template"], "feature_index": v["feature_index"], "feature_rank": v["feature_rank"],
                "r_a": old["mean_object_fraction"], "r_b": v["mean_object_fraction"],
                "r_change": _minus(v["mean_object_fraction"], old["mean_object_fraction"]),
                "r_low_a": old["mean_object_fraction_low"], "r_high_a": old["mean_object_fraction_high"],
                "r_low_b": v["mean_object_fraction_low"], "r_high_b": v["mean_object_fraction_high"],
                "delta_a": old["delta"], "delta_b": v["delta"], "verdict_a": call_a, "verdict_b": call_b,
                "change": change})
    flips = Counter((f["class_index"], f["template"], f["change"]) for f in features)

    classes = []
    for key in keys:
        ra, rb = a_classes[key], b_classes[key]
        biased_a, biased_b = _biased(ra), _biased(rb)
        if comparable:
            new_spurious, new_core = flips[(*key, "new spurious")], flips[(*key, "new core")]
        else:
            more = _minus(rb["n_spurious"], ra["n_spurious"])
            new_spurious, new_core = (None, None) if more is None else (max(more, 0), max(-more, 0))
        classes.append(base | {
            "level": "class", "class_index": key[0], "class_name": rb["class_name"] or ra["class_name"],
            "template": key[1], "r_a": ra["class_object_fraction"], "r_b": rb["class_object_fraction"],
            "r_change": _minus(rb["class_object_fraction"], ra["class_object_fraction"]),
            "delta_a": ra["delta"], "delta_b": rb["delta"], "biased_a": biased_a, "biased_b": biased_b,
            "n_spurious_a": ra["n_spurious"], "n_spurious_b": rb["n_spurious"],
            "n_features_a": ra["n_features"], "n_features_b": rb["n_features"],
            "n_new_spurious": new_spurious, "n_new_core": new_core,
            "change": ("newly biased" if biased_b and biased_a is False else
                       "no longer biased" if biased_a and biased_b is False else "same")})
    return Comparison(a.run_id, b.run_id, classes + features, comparable, a.classifier, b.classifier,
                      sorted(in_a - in_b), sorted(in_b - in_a))


def describe_classifier(clf: dict) -> str:
    """One line naming a run's classifier, credentials masked."""
    parts = [str(clf.get("spec"))]
    if clf.get("weights") not in (None, "DEFAULT"):
        parts.append(f"weights {clf['weights']}")
    if clf.get("kwargs"):
        parts.append(f"kwargs {clf['kwargs']}")
    if clf.get("final_layer"):
        parts.append(f"final layer {clf['final_layer']}")
    return redact_text(", ".join(parts))


@dataclass
class CompareResult:
    comparison: Comparison
    table: str  # the comparison dataset folder, in RUN_B
    page: str  # the HTML page, in RUN_B


def run_compare(run_a: str, run_b: str, fail_on: list[str] | tuple[str, ...] = ()) -> CompareResult:
    """Compare, then write the ``comparison`` table (part ``vs-{RUN_A id}``) and ``comparison-vs-{id}.html``
    into RUN_B."""
    for condition in fail_on:
        if condition not in FAIL_ON:
            raise DxrayError(f"--fail-on must be one of {', '.join(FAIL_ON)}, got {condition!r}")
    a, b = read_side(run_a, "RUN_A"), read_side(run_b, "RUN_B")
    result = compare(a, b)
    b.sink.write_table("comparison", result.rows, part=f"vs-{a.run_id}")
    from dxray.report.html import render

    page = render("compare", c=result, classifier_a=describe_classifier(a.classifier),
                  classifier_b=describe_classifier(b.classifier), fail_on=list(fail_on),
                  offenders={cond: [r["class_index"] for r in result.offenders(cond)] for cond in fail_on})
    uri = b.sink.write_bytes(f"comparison-vs-{a.run_id}.html", page.encode("utf-8"))
    return CompareResult(result, b.sink.uri("comparison"), uri)
