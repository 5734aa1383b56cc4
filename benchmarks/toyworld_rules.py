"""Candidate verdict and naming rules, scored on the audits a toy-world sweep left in its cache (issue 31).

    python benchmarks/toyworld_rules.py --cache-dir C --worlds 0-1 --seeds 0-1 --name settings

Reads every finished audit under ``C/sweep-runs`` of those worlds and audit seeds (``toyworld_sweep.py`` leaves them
there, each with its ``toyworld_check.json``) and re-scores it under rules that need no new audit:

- **feature explained**: a feature's verdict counts only when its optimised images drive the feature at least as
  high as the class's plain pictures do (its segmenter-control images, read through the audited classifier here);
  below that the optimisation did not find what the feature responds to, and an object missing from its images
  says nothing ("not explained": not called spurious);
- **concept naming** of the spurious features: the top concept by mean coverage (what ``verdict.py`` does now) against
  the top concept by *presence*, the share of the feature's images in which the concept covers at least
  :data:`PRESENT` of the image (ties by coverage): what every image shows, however small; by *contrast*, presence
  minus its presence in the class's plain pictures (the control images); and by presence with ties broken by
  the control's presence (what the plain pictures do not show).

Settings are chosen on world seeds 0-2 and audit seeds 0-2; the script refuses to mix them with held-out ones.
Writes ``benchmarks/results/toyworld-rules-NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from toyworld_seeds import RESULTS, seeds_of  # noqa: E402

PRESENT = 0.005  # a concept is present in an image when it covers at least 0.5% of it (5 of a 32 x 32 image's pixels)
FOLDER = re.compile(r"w(\d+)-(\w+)-rho([\d.]+)-s(\d+)-k(\d+)-\w+$")


def runs(cache_dir: str, worlds: list[int], seeds: list[int], overrides: list[str]) -> list[tuple[dict, Path]]:
    """The finished audits of those worlds and seeds that the sweep ran with ``overrides``."""
    from toyworld_sweep import run_folder

    out = []
    for folder in sorted((Path(cache_dir) / "sweep-runs").iterdir()):
        m = FOLDER.match(folder.name)
        if not m or int(m[1]) not in worlds or int(m[4]) not in seeds:
            continue
        if folder != run_folder(cache_dir, int(m[1]), m[2], float(m[3]), int(m[4]), int(m[5]), overrides):
            continue  # an audit with other overrides
        found = [p for p in folder.iterdir() if p.is_dir() and (p / "toyworld_check.json").is_file()]
        if found:
            out.append(({"world": int(m[1]), "family": m[2], "rho": float(m[3]), "seed": int(m[4])}, found[0]))
    return out


def _tables(run: Path):
    import pyarrow.dataset as ds

    read = lambda name, cols=None: ds.dataset(run / name, format="parquet").to_table(columns=cols).to_pylist()  # noqa: E731
    return (read("tasks", ["task_id", "kind", "class_index", "feature_index", "status"]),
            read("samples", ["task_id", "image_uri", "feature_activation", "concepts", "concept_fractions"]))


def control_activations(run: Path, classifier, wanted: dict[int, list[int]], tasks, samples) -> dict[tuple, float]:
    """(class, feature) -> mean penultimate activation over the class's control images."""
    import torch
    from PIL import Image

    control = {t["task_id"]: t["class_index"] for t in tasks if t["kind"] == "control" and t["status"] == "ok"}
    images = defaultdict(list)
    for s in samples:
        if s["task_id"] in control:
            images[control[s["task_id"]]].append(np.asarray(Image.open(s["image_uri"]).convert("RGB"), dtype=np.float32))
    out = {}
    with torch.no_grad():
        for c, feats in wanted.items():
            if not images.get(c):
                continue
            x = torch.from_numpy(np.stack(images[c]) / 255.0).permute(0, 3, 1, 2)
            acts = classifier(x, layers=["penultimate"])["penultimate"].float()
            for f in feats:
                out[(c, f)] = float(acts[:, f].mean())
    return out


def score(calls: list[dict]) -> dict:
    tp = sum(c["truth"] and c["called"] for c in calls)
    fp = sum(not c["truth"] and c["called"] for c in calls)
    fn = sum(c["truth"] and not c["called"] for c in calls)
    tn = sum(not c["truth"] and not c["called"] for c in calls)
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": p, "recall": r, "f1": f1,
            "fpr": fp / (fp + tn) if fp + tn else None}


def main() -> None:
    from dxray.classifiers import load_classifier

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--worlds", default="0-2")
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--name", required=True)
    ap.add_argument("overrides", nargs="*", help="the sweep's key=value overrides of the audits to read")
    args = ap.parse_args()
    worlds, seeds = seeds_of(args.worlds), seeds_of(args.seeds)
    held_out = [min(worlds) >= 3, min(seeds) >= 3]
    if any(held_out) and not all(held_out):
        raise SystemExit("report on world seeds >= 3 AND audit seeds >= 3, or choose settings on 0-2: not a mix")
    rows = []
    for meta, run in runs(args.cache_dir, worlds, seeds, args.overrides):
        report = json.loads((run / "toyworld_check.json").read_text())
        classifier = load_classifier(report["classifier"], device="cpu")
        tasks, samples = _tables(run)
        calls = report["calls"].get("features") or []
        wanted = defaultdict(list)
        for c in calls:
            wanted[c["class_index"]].append(c["feature_index"])
        ctrl = control_activations(run, classifier, wanted, tasks, samples)
        feature_task = {(t["class_index"], t["feature_index"]): t["task_id"] for t in tasks
                        if t["kind"] == "feature" and t["status"] == "ok"}
        by_task = defaultdict(list)
        for s in samples:
            by_task[s["task_id"]].append(s)
        control_presence = {}  # class -> share of its control images in which each concept is present
        for t in tasks:
            if t["kind"] == "control" and t["status"] == "ok" and by_task[t["task_id"]]:
                cover = np.array([s["concept_fractions"] for s in by_task[t["task_id"]]], dtype=np.float64)
                control_presence[t["class_index"]] = (cover >= PRESENT).mean(0)
        for c in calls:
            mine = by_task[feature_task[(c["class_index"], c["feature_index"])]]
            a = float(np.mean([s["feature_activation"] for s in mine]))
            cover = np.array([s["concept_fractions"] for s in mine], dtype=np.float64)
            names = mine[0]["concepts"]
            presence = (cover >= PRESENT).mean(0)
            seen = control_presence.get(c["class_index"], np.zeros(len(names)))
            by_presence = names[max(range(len(names)), key=lambda j: (presence[j], cover[:, j].mean()))]
            by_contrast = names[max(range(len(names)), key=lambda j: (presence[j] - seen[j], cover[:, j].mean()))]
            by_presence_contrast = names[max(range(len(names)), key=lambda j: (presence[j], -seen[j],
                                                                              cover[:, j].mean()))]
            rows.append(meta | {"class_index": c["class_index"], "feature_index": c["feature_index"],
                                "truth": c["truth"], "called": c["called"], "kind": c.get("kind"),
                                "concept": c.get("concept"), "top_by_coverage": c.get("top_concept"),
                                "top_by_presence": by_presence, "top_by_contrast": by_contrast,
                                "top_by_presence_contrast": by_presence_contrast, "activation": a,
                                "control_activation": ctrl.get((c["class_index"], c["feature_index"]))})
        print(f"{run.parent.name}: {len(calls)} feature calls", flush=True)
    explained = [r | {"called": r["called"] and (r["control_activation"] is None
                                                 or r["activation"] >= r["control_activation"])} for r in rows]
    result = {"name": args.name, "held_out": all(held_out), "worlds": worlds, "seeds": seeds, "present": PRESENT,
              "overrides": args.overrides,
              "features": {}, "naming": {}, "rows": rows}
    for family in sorted({r["family"] for r in rows}):
        for rho in sorted({r["rho"] for r in rows}):
            cell = f"{family} rho {rho:g}"
            def pick(rs, family=family, rho=rho):
                return [r for r in rs if r["family"] == family and r["rho"] == rho]

            result["features"][cell] = {"now": score(pick(rows)), "feature explained": score(pick(explained))}
            for rule in ("now", "feature explained"):
                s = result["features"][cell][rule]
                print(f"{cell:12s} {rule:17s} tp/fp/fn/tn {s['tp']}/{s['fp']}/{s['fn']}/{s['tn']}  F1 {s['f1']:.2f}  "
                      f"FPR {s['fpr'] if s['fpr'] is None else round(s['fpr'], 2)}")
    for kind in sorted({r["kind"] for r in rows if r["kind"]}):
        spur = [r for r in rows if r["truth"] and r["called"] and r["kind"] == kind]
        result["naming"][kind] = {"n": len(spur)} | {
            rule: sum(r[f"top_by_{rule}"] == r["concept"] for r in spur)
            for rule in ("coverage", "presence", "contrast", "presence_contrast")}
        print(f"naming {kind}: of {len(spur)} spurious features called spurious, named right by "
              + ", ".join(f"{rule} {n}" for rule, n in result["naming"][kind].items() if rule != "n"))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"toyworld-rules-{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
