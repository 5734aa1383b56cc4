"""Core/spurious verdicts from stored object fractions — no model needed.

A (class, feature) pair is **core** when the mean object fraction r of its K
held-out images is at least δ, else **spurious**. Verdicts are a pure function
of the ``tasks`` and ``samples`` tables, so δ can be re-chosen later
(:func:`decide` on a finished run, or ``dxray redecide``).

**Uncertainty** (issue 19). Every verdict carries a percentile bootstrap of its mean r: the pair's K
values of r are resampled with replacement :data:`RESAMPLES` (1000) times; the 2.5th and 97.5th
percentiles of the resampled means are the 95% interval (``mean_object_fraction_low`` / ``_high``,
numpy's default linear interpolation), and the share of resamples whose mean gives the same verdict at
δ is its ``confidence``. A verdict is **low confidence** when that share is below
:data:`LOW_CONFIDENCE` (0.8), or when it rests on fewer than two images (one value cannot be
resampled into any spread: interval and confidence are then null). The resamples are drawn by a numpy
``Generator`` (SFC64) seeded with :func:`bootstrap_seed`, a hash of the run id, class, feature and
template: the same run gives the same figures on every machine, whatever the order of the rows (the
pair's values are sorted before they are resampled), and another δ (``dxray redecide``) re-scores the
same resamples. The 0.8 is a reading of the figures, not a setting of the run: it is a constant here
(recorded with every row as ``low_confidence``), not a config field, so ``redecide`` and the report,
which have no config, apply the same one.

**Detection prompt candidates** (issue 19). A class given several detection prompts
(``segment.prompts``: synonyms, a hypernym) has every image scored with each
(``samples.candidate_object_fractions``). The candidate with the highest mean r on the class's control
images (the generator's plain pictures of it) wins, the first on a tie; every figure of the class (its
verdicts, class and control r) then uses the winner's r, and the winner is recorded
(``detection_prompt`` on verdicts and classes, with every candidate's control r on classes). Without
control images the first candidate stands.

**Concepts** (issue 20). With ``segment.concepts``, every image also has each concept's coverage
(``samples.concept_fractions``: its masks' pixels / all pixels). A verdict names the up to
:data:`TOP_CONCEPTS` concepts of the highest mean coverage over its images (``top_concepts``, above 0,
highest first), and a class row those of its class explanation (``class_top_concepts``): what a spurious
feature shows instead of the object ("spurious: snow 0.61, tree 0.22"). They do not enter the verdict.

**Explained** (issue 31). A class row carries ``class_prob``, the mean probability of the class over its class
explanation's held-out images, and ``explained``: whether that reaches :data:`EXPLAINED` (0.5), i.e. the
classifier reads the images as the class at least half the time. Below it the optimisation did not find what
the classifier responds to, and an object missing from such images says nothing about the classifier, so the
class is not called biased (:func:`class_call`: "not explained"). Like the 0.8 above, a reading of the figures
(constant, recorded with every row). Chosen on the toy world's world 0 (benchmarks/README.md): of its 5 false
class-level bias calls (CNN, ρ 0 and 1, audit seeds 0-1) 4 had p < 0.5; its 6 true ones had p ≥ 0.68.

The same holds per feature: a verdict row carries ``mean_activation`` (the feature's mean over its held-out images)
and ``control_activation`` (its mean over the class's segmenter-control images, the generator's plain pictures of
the class: ``tasks.control_activations``), and ``explained`` when the optimised images reach the plain pictures'
level. Below it the optimisation did not find what the feature responds to, so the pair's ``verdict`` is "not
explained", neither core nor spurious (its r stays in ``mean_object_fraction``), and ``classes.n_spurious`` does not
count it. No constant to
choose: the control is the reference. Measured on the toy world's settings worlds 0-1 (benchmarks/README.md,
``benchmarks/toyworld_rules.py``): the CNN's false spurious rate on ρ 0 classifiers 0.22 -> 0.11, the ViT's at
ρ 1 0.44 -> 0.11, the CNN's ρ-1 F1 unchanged (0.92).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dxray.errors import DxrayError

# r is stored as float32: a mean that equals delta up to float32 rounding counts as reaching it.
_TOLERANCE = 1e-6
_KEYS = ["class_index", "class_name", "feature_index", "feature_rank", "template"]
RESAMPLES = 1000  # bootstrap resamples per verdict: the 2.5% tail is ~25 means, the confidence's SE <= 0.016
INTERVAL = 0.95  # percentile bootstrap interval of the mean r
LOW_CONFIDENCE = 0.8  # a verdict is low confidence when fewer than this share of resamples agree with it
_CHUNK = 64_000  # resampled values held at once (x 8 bytes): fits in cache, flat memory at any size


def check_delta(delta: float) -> float:
    if not 0.0 <= delta <= 1.0:
        raise DxrayError(f"verdict.delta must be in [0, 1], got {delta}")
    return delta


# The columns decide() reads: a full-ImageNet samples table is 60,000 rows of thumbnails and masks, and
# reading only these keeps re-deciding it to a few seconds and a few MB.
TASK_COLUMNS = ["task_id", "status", "kind", *_KEYS, "control_activations"]
SAMPLE_COLUMNS = ["task_id", "object_fraction", "class_prob", "feature_activation", "detection_prompt", "candidate_prompts",
                  "candidate_object_fractions", "concepts", "concept_fractions"]
TOP_CONCEPTS = 3  # concepts named per verdict
EXPLAINED = 0.5  # a class explanation is explained when its images' mean probability of the class reaches this
NOT_EXPLAINED = "not explained"  # the verdict of a feature whose images do not reach its control's activation


def class_call(row: dict) -> str | None:
    """The class-level call of a classes row: "biased" (class r < δ on an explained class explanation), "not
    biased", "not explained" (mean held-out probability below :data:`EXPLAINED`: no evidence either way), or
    None without a class r. A row from before ``explained`` existed is judged on r alone."""
    r, delta = row.get("class_object_fraction"), row.get("delta")
    if r is None or delta is None:
        return None
    if row.get("explained") is False:
        return "not explained"
    return "biased" if r < delta - _TOLERANCE else "not biased"


def _activations(tasks: pa.Table, samples: pa.Table) -> tuple[dict[tuple, float], dict[int, list[float]]]:
    """Per (class, feature, template) of an ok feature task, the mean activation of its feature over its images;
    per class, its segmenter control's mean penultimate features. Empty for a run from before either column."""
    means: dict[tuple, float] = {}
    if "feature_activation" in samples.column_names:
        ok = tasks.filter(pc.and_(pc.equal(tasks["status"], "ok"), pc.equal(tasks["kind"], "feature")))
        acts = samples.filter(pc.is_valid(samples["feature_activation"])).select(["task_id", "feature_activation"])
        joined = acts.join(ok.select(["task_id", "class_index", "feature_index", "template"]), "task_id",
                           join_type="inner")
        for r in joined.group_by(["class_index", "feature_index", "template"], use_threads=False) \
                .aggregate([("feature_activation", "mean")]).to_pylist():
            means[(r["class_index"], r["feature_index"], r["template"])] = r["feature_activation_mean"]
    control: dict[int, list[float]] = {}
    if "control_activations" in tasks.column_names:
        ok = tasks.filter(pc.and_(pc.equal(tasks["status"], "ok"), pc.equal(tasks["kind"], "control")))
        ok = ok.filter(pc.is_valid(ok["control_activations"]))
        for c, values in zip(ok["class_index"].to_pylist(), ok["control_activations"].to_pylist(), strict=True):
            control.setdefault(c, values)
    return means, control


def _concepts(tasks: pa.Table, samples: pa.Table) -> dict[tuple, dict]:
    """Per (kind, class, feature, template) of an ok task: its up to ``TOP_CONCEPTS`` concepts of the highest
    mean coverage over its images (above 0), highest first, as ``{"names": [...], "fractions": [...]}``."""
    if "concept_fractions" not in samples.column_names:
        return {}
    rows = samples.filter(pc.is_valid(samples["concept_fractions"]))
    if rows.num_rows == 0:
        return {}
    names = rows["concepts"][0].as_py()
    rows = rows.filter(pc.equal(pc.list_value_length(rows["concept_fractions"]), len(names)))  # one vocabulary a run
    matrix = pc.list_flatten(rows["concept_fractions"].combine_chunks()).to_numpy(zero_copy_only=False)
    matrix = matrix.astype(np.float64).reshape(rows.num_rows, len(names))
    ok = tasks.filter(pc.equal(tasks["status"], "ok"))
    key_of = {t: key for t, *key in zip(*(ok[n].to_pylist() for n in ("task_id", "kind", "class_index",
                                                                       "feature_index", "template")), strict=True)}
    keys = [tuple(key_of[t]) if t in key_of else None for t in rows["task_id"].to_pylist()]
    groups = sorted({k for k in keys if k is not None}, key=str)
    index = {k: g for g, k in enumerate(groups)}
    at = np.array([index.get(k, -1) for k in keys], dtype=np.intp)
    mine = at >= 0
    sums = np.zeros((len(groups), len(names)))
    np.add.at(sums, at[mine], np.nan_to_num(matrix[mine]))
    means = sums / np.maximum(np.bincount(at[mine], minlength=len(groups)), 1)[:, None]
    out = {}
    for key, m in zip(groups, means, strict=True):
        top = [j for j in np.argsort(-m, kind="stable")[:TOP_CONCEPTS] if m[j] > 0]
        out[key] = {"names": [names[j] for j in top], "fractions": [float(m[j]) for j in top]}
    return out


def _choose(tasks: pa.Table, samples: pa.Table) -> tuple[pa.Table, dict[int, dict]]:
    """Samples (task_id, object_fraction) with each class's winning candidate's r in ``object_fraction``, and
    per class its ``detection_prompt`` (and, with candidates, ``detection_candidates`` and
    ``candidate_control_object_fractions``)."""
    plain = samples.select(["task_id", "object_fraction"])
    if "detection_prompt" not in samples.column_names:  # a caller that read only r: nothing to record
        return plain, {}
    ok = tasks.filter(pc.equal(tasks["status"], "ok")).select(["task_id", "kind", "class_index"])
    named = samples.select(["task_id", "detection_prompt"]).join(ok, "task_id", join_type="inner")
    chosen: dict[int, dict] = {}
    for r in named.group_by(["class_index", "detection_prompt"], use_threads=False).aggregate([]).to_pylist():
        if r["detection_prompt"] is not None:
            chosen.setdefault(r["class_index"], {"detection_prompt": r["detection_prompt"]})
    if "candidate_object_fractions" not in samples.column_names:
        return plain, chosen
    listed = pc.is_valid(samples["candidate_object_fractions"])
    if not pc.any(listed).as_py():
        return plain, chosen
    # (list columns cannot go through an Arrow join: the few classes with candidates are matched here)
    of = {t: (k, c) for t, k, c in zip(*(ok[n].to_pylist() for n in ("task_id", "kind", "class_index")), strict=True)}
    at = np.flatnonzero(listed.to_numpy(zero_copy_only=False))
    picked = samples.take(at).select(["task_id", "candidate_prompts", "candidate_object_fractions"]).to_pylist()
    by_class: dict[int, list[tuple[str, dict]]] = {}
    for row in picked:
        if row["task_id"] in of:
            kind, c = of[row["task_id"]]
            by_class.setdefault(c, []).append((kind, row))
    winner: dict[int, int] = {}
    for c, mine in by_class.items():
        names = mine[0][1]["candidate_prompts"]
        control = [row["candidate_object_fractions"] for kind, row in mine if kind == "control"]
        means = np.nanmean(np.array(control, dtype=np.float64), axis=0) if control else None
        winner[c] = int(np.argmax(means)) if means is not None else 0  # argmax: the first of equal means
        chosen[c] = {"detection_prompt": names[winner[c]], "detection_candidates": names,
                     "candidate_control_object_fractions": None if means is None else [float(m) for m in means]}
    r = plain["object_fraction"].to_numpy(zero_copy_only=False).astype(np.float32)  # nulls become nan
    for i, row in zip(at, picked, strict=True):
        c = of.get(row["task_id"], (None, None))[1]
        if c in winner:
            r[i] = row["candidate_object_fractions"][winner[c]]
    mask = pc.is_null(plain["object_fraction"]).to_numpy(zero_copy_only=False)
    return plain.set_column(1, "object_fraction", pa.array(r, pa.float32(), mask=mask)), chosen


def _scored(tasks: pa.Table, samples: pa.Table, kind: str) -> pa.Table:
    """Samples of successful tasks of one kind that have an object fraction, with their task's keys."""
    ok = tasks.filter(pc.and_(pc.equal(tasks["status"], "ok"), pc.equal(tasks["kind"], kind)))
    ok = ok.select(["task_id", *_KEYS])
    scored = samples.filter(pc.is_valid(samples["object_fraction"])).select(["task_id", "object_fraction"])
    return scored.join(ok, "task_id", join_type="inner")


def _class_probs(tasks: pa.Table, samples: pa.Table) -> dict[tuple, float]:
    """(class, template) -> mean held-out probability of the class over its class explanation's images."""
    if "class_prob" not in samples.column_names:
        return {}
    ok = tasks.filter(pc.and_(pc.equal(tasks["status"], "ok"), pc.equal(tasks["kind"], "class")))
    probs = samples.filter(pc.is_valid(samples["class_prob"])).select(["task_id", "class_prob"])
    joined = probs.join(ok.select(["task_id", "class_index", "template"]), "task_id", join_type="inner")
    means = joined.group_by(["class_index", "template"], use_threads=False).aggregate([("class_prob", "mean")])
    return {(r["class_index"], r["template"]): r["class_prob_mean"] for r in means.to_pylist()}


def _stats(table: pa.Table, keys: list[str], values: bool = False) -> pa.Table:
    return table.group_by(keys, use_threads=False).aggregate([
        ("object_fraction", "mean"),
        ("object_fraction", "stddev", pc.VarianceOptions(ddof=0)),
        ("object_fraction", "count"),
        *([("object_fraction", "list")] if values else []),
    ])


def bootstrap_seed(run_id: str, class_index: int | None, feature_index: int | None, template: str | None) -> int:
    """The bootstrap seed of one verdict: the first 63 bits of sha256 over its run id, class, feature
    and template. Fixed for the pair, whatever else the run holds or the order of its rows."""
    text = "\x1f".join(["dxray-bootstrap-v1", run_id, str(class_index), str(feature_index), str(template)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def bootstrap_means(values: np.ndarray, counts: np.ndarray, seeds: list[int],
                    resamples: int = RESAMPLES) -> np.ndarray:
    """Resampled means, ``(groups, resamples)`` float64: group g is the ``counts[g]`` values of ``values``
    after the groups before it, resampled with replacement by ``Generator(SFC64(seeds[g])).integers``.

    Vectorised over blocks of groups of the same size: the only per-group Python work is one generator
    drawing its ``(resamples, n)`` indices; a block's values are gathered and averaged at once (a block
    holds at most ``_CHUNK`` values, so the buffers stay in cache and memory stays flat)."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
    flat = np.asarray(values, dtype=np.float64)
    out = np.full((len(counts), resamples), np.nan)
    for n in (int(k) for k in np.unique(counts[counts > 0])):
        groups = np.flatnonzero(counts == n)
        step = max(1, _CHUNK // (resamples * n))
        small = np.uint8 if n <= 256 else np.int64
        idx = np.empty((min(step, len(groups)), resamples, n), dtype=np.intp)
        weights = np.full(n, 1.0 / n)
        for lo in range(0, len(groups), step):
            block = groups[lo:lo + step]
            at = idx[:len(block)]
            for row, g in enumerate(block):
                at[row] = np.random.Generator(np.random.SFC64(seeds[g])).integers(0, n, size=(resamples, n), dtype=small)
            at += starts[block][:, None, None]
            out[block] = flat[at] @ weights
    return out


def _uncertainty(stats: pa.Table, run_id: str, delta: float) -> dict[str, np.ndarray]:
    """Bootstrap interval, confidence and the low-confidence flag of every row of ``stats`` (with values)."""
    lists = stats["object_fraction_list"].combine_chunks()
    counts = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    raw = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.float64)
    values = raw[np.lexsort((raw, owner))]  # each pair's values sorted: the rows' order does not matter
    keys = [stats[k].to_pylist() for k in ("class_index", "feature_index", "template")]
    seeds = [bootstrap_seed(run_id, c, f, t) for c, f, t in zip(*keys, strict=True)]
    means = bootstrap_means(values, counts, seeds)
    tail = (1 - INTERVAL) / 2
    enough = counts >= 2
    low, high = np.full(len(counts), np.nan), np.full(len(counts), np.nan)
    share_core = np.full(len(counts), np.nan)
    if enough.any():
        low[enough], high[enough] = np.quantile(means[enough], [tail, 1 - tail], axis=1)
        share_core[enough] = (means[enough] >= delta - _TOLERANCE).mean(axis=1)
    point_core = stats["object_fraction_mean"].to_numpy(zero_copy_only=False) >= delta - _TOLERANCE
    confidence = np.where(point_core, share_core, 1 - share_core)
    return {"low": low, "high": high, "confidence": confidence, "seeds": seeds,
            "low_confidence": ~enough | (np.nan_to_num(confidence, nan=0.0) < LOW_CONFIDENCE)}


def _or_none(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def decide(tasks: pa.Table, samples: pa.Table, delta: float, run_id: str,
           uncertainty: bool = True) -> tuple[list[dict], list[dict]]:
    """(verdict rows per (class, feature, template), class rows per (class, template)).

    ``uncertainty=False`` leaves the bootstrap columns null (a δ sweep that reads only the verdicts)."""
    check_delta(delta)
    concepts = _concepts(tasks, samples)
    activations, control_acts = _activations(tasks, samples)
    class_probs = _class_probs(tasks, samples)
    samples, chosen = _choose(tasks, samples)
    stats = _stats(_scored(tasks, samples, "feature"), _KEYS, values=uncertainty)
    u = _uncertainty(stats, run_id, delta) if uncertainty else None
    verdicts = []
    plain = stats.drop_columns(["object_fraction_list"]) if uncertainty else stats
    for i, row in enumerate(plain.to_pylist()):
        mean = row["object_fraction_mean"]
        verdicts.append({
            "run_id": run_id, **{k: row[k] for k in _KEYS},
            "mean_object_fraction": mean, "std_object_fraction": row["object_fraction_stddev"],
            "n_samples": row["object_fraction_count"], "delta": delta,
            "verdict": "core" if mean >= delta - _TOLERANCE else "spurious",
        })
        if u is not None:
            verdicts[-1] |= {
                "mean_object_fraction_low": _or_none(u["low"][i]), "mean_object_fraction_high": _or_none(u["high"][i]),
                "confidence": _or_none(u["confidence"][i]), "low_confidence": bool(u["low_confidence"][i]),
                "bootstrap_resamples": RESAMPLES, "bootstrap_seed": u["seeds"][i],
            }
    verdicts.sort(key=lambda v: (v["class_index"], v["template"], v["feature_rank"] or 0, v["feature_index"]))

    # The segmenter control (one per class, whatever the template): can the segmenter find the object in the
    # generator's plain pictures of the class? Below delta, the class's verdicts are unreliable.
    control = {r["class_index"]: r["object_fraction_mean"]
               for r in _stats(_scored(tasks, samples, "control"), ["class_index"]).to_pylist()}
    reliable = {c: r >= delta - _TOLERANCE for c, r in control.items()}
    for v in verdicts:
        named = concepts.get(("feature", v["class_index"], v["feature_index"], v["template"]), {})
        v |= {"control_object_fraction": control.get(v["class_index"]), "reliable": reliable.get(v["class_index"]),
              "detection_prompt": chosen.get(v["class_index"], {}).get("detection_prompt"),
              "top_concepts": named.get("names"), "top_concept_fractions": named.get("fractions")}
        mean = activations.get((v["class_index"], v["feature_index"], v["template"]))
        seen = control_acts.get(v["class_index"])
        ref = seen[v["feature_index"]] if seen is not None and 0 <= v["feature_index"] < len(seen) else None
        explained = None if mean is None or ref is None else mean >= ref - _TOLERANCE * max(1.0, abs(ref))
        v |= {"mean_activation": mean, "control_activation": ref, "explained": explained}
        if explained is False:
            v["verdict"] = NOT_EXPLAINED

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
            "class_prob": class_probs.get(key), "explained": None if class_probs.get(key) is None
            else class_probs[key] >= EXPLAINED - _TOLERANCE,
            "n_spurious": sum(v["verdict"] == "spurious" for v in mine),
            "n_not_explained": sum(v["explained"] is False for v in mine), "n_features": len(mine), "delta": delta,
            "n_low_confidence": sum(v["low_confidence"] for v in mine) if uncertainty else None,
            "control_object_fraction": control.get(key[0]), "reliable": reliable.get(key[0]),
            "detection_prompt": None, "detection_candidates": None, "candidate_control_object_fractions": None,
            **chosen.get(key[0], {}),
            "class_top_concepts": concepts.get(("class", key[0], None, key[1]), {}).get("names"),
            "class_top_concept_fractions": concepts.get(("class", key[0], None, key[1]), {}).get("fractions"),
        })
    return verdicts, classes
