"""Core/spurious verdicts from stored object fractions — no model needed.

A (class, feature) pair is **core** when the mean object fraction r of its K
held-out images is at least δ, else **spurious**. Verdicts are a pure function
of the ``tasks`` and ``samples`` tables, so δ can be re-chosen later
(:func:`decide` on a finished run, or ``dxray redecide``).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dxray.errors import DxrayError

# r is stored as float32: a mean that equals delta up to float32 rounding counts as reaching it.
_TOLERANCE = 1e-6
_KEYS = ["class_index", "class_name", "feature_index", "feature_rank", "template"]


def check_delta(delta: float) -> float:
    if not 0.0 <= delta <= 1.0:
        raise DxrayError(f"verdict.delta must be in [0, 1], got {delta}")
    return delta


# The columns decide() reads: a full-ImageNet samples table is 60,000 rows of thumbnails and masks, and
# reading only these keeps re-deciding it to a few seconds and a few MB.
TASK_COLUMNS = ["task_id", "status", "kind", *_KEYS]
SAMPLE_COLUMNS = ["task_id", "object_fraction"]


def _scored(tasks: pa.Table, samples: pa.Table, kind: str) -> pa.Table:
    """Samples of successful tasks of one kind that have an object fraction, with their task's keys."""
    ok = tasks.filter(pc.and_(pc.equal(tasks["status"], "ok"), pc.equal(tasks["kind"], kind)))
    ok = ok.select(["task_id", *_KEYS])
    scored = samples.filter(pc.is_valid(samples["object_fraction"])).select(["task_id", "object_fraction"])
    return scored.join(ok, "task_id", join_type="inner")


def _stats(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.group_by(keys, use_threads=False).aggregate([
        ("object_fraction", "mean"),
        ("object_fraction", "stddev", pc.VarianceOptions(ddof=0)),
        ("object_fraction", "count"),
    ])


def decide(tasks: pa.Table, samples: pa.Table, delta: float, run_id: str) -> tuple[list[dict], list[dict]]:
    """(verdict rows per (class, feature, template), class rows per (class, template))."""
    check_delta(delta)
    verdicts = []
    for row in _stats(_scored(tasks, samples, "feature"), _KEYS).to_pylist():
        mean = row["object_fraction_mean"]
        verdicts.append({
            "run_id": run_id, **{k: row[k] for k in _KEYS},
            "mean_object_fraction": mean, "std_object_fraction": row["object_fraction_stddev"],
            "n_samples": row["object_fraction_count"], "delta": delta,
            "verdict": "core" if mean >= delta - _TOLERANCE else "spurious",
        })
    verdicts.sort(key=lambda v: (v["class_index"], v["template"], v["feature_rank"] or 0, v["feature_index"]))

    class_keys = ["class_index", "class_name", "template"]
    fractions = {(r["class_index"], r["template"]): r for r in
                 _stats(_scored(tasks, samples, "class"), class_keys).to_pylist()}
    names = {(v["class_index"], v["template"]): v["class_name"] for v in verdicts}
    names |= {k: r["class_name"] for k, r in fractions.items()}
    by_class: dict[tuple, list[dict]] = {}
    for v in verdicts:  # grouped once: a per-class scan is quadratic over 1000 classes x 5 features
        by_class.setdefault((v["class_index"], v["template"]), []).append(v)
    classes = []
    for key in sorted(names):
        mine = by_class.get(key, [])
        frac = fractions.get(key)
        classes.append({
            "run_id": run_id, "class_index": key[0], "class_name": names[key], "template": key[1],
            "class_object_fraction": frac["object_fraction_mean"] if frac else None,
            "n_spurious": sum(v["verdict"] == "spurious" for v in mine), "n_features": len(mine), "delta": delta,
        })
    return verdicts, classes
