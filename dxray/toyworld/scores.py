"""Known-answer figures that do not flatter (DESIGN.md §7): precision, recall, F1 and false-positive rate of a
spurious (or biased) call, and the AUROC of mean r, each with a bootstrap 95% interval over independent units,
beside trivial baselines scored the same way.

With few spurious pairs, calling everything core is already mostly "right", so agreement alone flatters; these
figures do not. Units are what is independent: within one run the classes (a class's top features share its
explanation), across runs (world, audit seed) pairs. A call is a dict with ``unit``, ``truth`` (True: spurious
/ biased, False: core / unbiased), ``called`` (the same, as dxray called it) and ``score`` (mean r: a high r
says core); pairs whose truth is unknown are left out before they get here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dxray.agreement import roc_auc

METRICS = ("precision", "recall", "f1", "false_positive_rate", "auroc")
N_BOOT = 1000


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def metrics(calls: Sequence[dict]) -> dict:
    """The point figures and the confusion counts of one set of calls."""
    tp = sum(c["called"] and c["truth"] for c in calls)
    fp = sum(c["called"] and not c["truth"] for c in calls)
    fn = sum(not c["called"] and c["truth"] for c in calls)
    tn = sum(not c["called"] and not c["truth"] for c in calls)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    # F1 is 0 when nothing true is called (no tp), even if nothing was called at all: "everything core" scores 0.
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    scores = [c.get("score") for c in calls]
    auroc = roc_auc(scores, [not c["truth"] for c in calls]) if all(s is not None for s in scores) else None
    return {"precision": precision, "recall": recall, "f1": f1, "false_positive_rate": _ratio(fp, fp + tn),
            "auroc": auroc, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": len(calls),
            "n_units": len({c["unit"] for c in calls})}


def with_intervals(calls: Sequence[dict], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """:func:`metrics` plus, per figure, a percentile bootstrap 95% interval from resampling whole units with
    replacement (a cluster bootstrap); a resample where a figure is undefined does not count for that figure.
    Seeded: the same calls give the same interval."""
    out = metrics(calls)
    units: dict = {}
    for c in calls:
        units.setdefault(c["unit"], []).append(c)
    groups = list(units.values())
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot if len(groups) > 1 else 0):
        sample = [c for i in rng.integers(0, len(groups), len(groups)) for c in groups[i]]
        got = metrics(sample)
        for m in METRICS:
            if got[m] is not None:
                draws[m].append(got[m])
    for m in METRICS:
        d = draws[m]
        out[f"{m}_ci"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))] if len(d) >= n_boot // 2 else None
    out["n_boot"] = n_boot
    return out


def baselines(calls: Sequence[dict], control: Callable[[dict], bool | None] | None = None,
              seed: int = 0) -> dict[str, list[dict]]:
    """Trivial callers on the same pairs: ``everything_core`` (nothing called), ``shuffled`` (dxray's own number
    of calls given to random pairs: as many flags, no information) and, when ``control`` gives a call for every
    pair, ``control_alone`` (the segmenter control's call: the class's plain-prompt images, no optimisation)."""
    rng = np.random.default_rng(seed)
    flags = [c["called"] for c in calls]
    shuffled = [bool(flags[i]) for i in rng.permutation(len(flags))] if flags else []
    out = {"everything_core": [c | {"called": False, "score": None} for c in calls],
           "shuffled": [c | {"called": f, "score": None} for c, f in zip(calls, shuffled, strict=True)]}
    controlled = [control(c) for c in calls] if control else []
    if calls and controlled and all(x is not None for x in controlled):
        out["control_alone"] = [c | {"called": x, "score": None} for c, x in zip(calls, controlled, strict=True)]
    return out


def scored(calls: Sequence[dict], control: Callable[[dict], bool | None] | None = None, n_boot: int = N_BOOT,
           seed: int = 0) -> dict:
    """dxray's calls and every baseline, each with intervals: {"dxray": {...}, "everything_core": {...}, ...}."""
    return {"dxray": with_intervals(calls, n_boot, seed)} | {
        name: with_intervals(rows, n_boot, seed) for name, rows in baselines(calls, control, seed).items()}


def describe(name: str, figures: dict) -> str:
    """'name: precision 0.93 [0.85, 1.00], recall ..., F1 ..., FPR ..., AUROC ... (n pairs, u units)'."""
    def one(m, label):
        v, ci = figures[m], figures.get(f"{m}_ci")
        if v is None:
            return f"{label} n/a"
        return f"{label} {v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    parts = [one("precision", "precision"), one("recall", "recall"), one("f1", "F1"),
             one("false_positive_rate", "FPR")]
    if figures["auroc"] is not None:
        parts.append(one("auroc", "AUROC of r"))
    return f"{name}: {', '.join(parts)} ({figures['n']} pairs, {figures['n_units']} units)"
