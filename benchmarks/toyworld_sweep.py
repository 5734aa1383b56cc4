"""World v5's known-answer sweep (issue 31): worlds x audit seeds x planted strength ρ x classifier family.

    python benchmarks/toyworld_sweep.py --cache-dir C --worlds 0-2 --seeds 0-2 --name settings   # choose settings
    python benchmarks/toyworld_sweep.py --cache-dir C --worlds 3-7 --seeds 3-6 --rho 1 --name headline
    python benchmarks/toyworld_sweep.py --cache-dir C --worlds 3-4 --seeds 3-6 --rho 0,0.5,0.8,0.95,1 --name rho

Each world seed's v5 generator and each (family, ρ) classifier are trained once into ``--cache-dir``
(``dxray/toyworld/v5.py``; one thread each, ``--jobs`` at a time). Each audit is ``dxray explain
jobs/configs/toyworld.yaml`` on that generator and classifier (:data:`V5_OVERRIDES` plus yours), scored by
``dxray toyworld check``; its run stays in ``--cache-dir/sweep-runs`` (:func:`run_folder`), so running the command
again resumes a stopped sweep and re-scores finished audits in seconds. The calls are pooled over (world, audit seed) units, the bootstrap's independent unit,
and scored per family, per family and ρ, and per family and shortcut kind: precision, recall, F1, false-positive
rate and AUROC of r with 95% intervals, beside the baselines (everything core, shuffled calls, the segmenter
control alone; ``dxray/toyworld/scores.py``). Also: how often a spurious feature's top concept is its shortcut.
Each world's generator fidelity (how often a plain prompt's object is drawn and read, ``v5.generator_fidelity``)
is reported beside the figures: no explanation shows more than its generator can draw.
Each finished audit also leaves a **record** in ``benchmarks/results/toyworld-sweep-runs/`` (its calls, classes and
concepts as the check scored them, the CPU and the dxray commit; a few KB, :func:`record_path`), and each world its
generator fidelity. A record stands for its audit: a later sweep, on this machine or another, counts it without
training that world or auditing again, so a sweep longer than one sitting accumulates in the repository (a held-out
world retrained on another CPU is another instance of the same world; each record was scored against the truth of
the classifier it audited). ``--no-records`` ignores them; delete them when the verdict rules change.
Writes ``benchmarks/results/toyworld-sweep-NAME.json`` and, with more than one ρ, ``toyworld-sweep-NAME.png``
(recall and false-positive rate against ρ). Settings are chosen on world seeds 0-2 only; figures are reported
on world seeds >= 3 and audit seeds >= 3 (the script refuses to mix them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toyworld_seeds import RESULTS, ROOT, cpu_name, dxray, seeds_of  # noqa: E402

# The v5 audit on top of the toyworld preset: the world's colours (backgrounds, marker, pattern) as concepts.
CONCEPTS = "segment.concepts=[purple,orange,gray,teal,pink,brown,cyan,magenta]"
V5_OVERRIDES = [CONCEPTS]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def train(cache_dir: str, worlds: list[int], cells: list[tuple[str, float]], jobs: int) -> None:
    """Every generator and classifier the sweep needs, in processes of their own (one thread each)."""
    import subprocess

    def one(code: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"training failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")

    head = "from dxray.toyworld import v5; "
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, [head + f"v5.ensure_generator({cache_dir!r}, {w}, log=lambda m: None)" for w in worlds]
                      + [head + f"v5.ensure_classifier({cache_dir!r}, {w}, {rho!r}, {family!r}, log=lambda m: None)"
                         for w in worlds for family, rho in cells]))


def fidelity(cache_dir: str, worlds: list[int]) -> dict:
    """Per world: how often its generator draws what a plain prompt asks (``v5.generator_fidelity``, read by that
    world's ρ = 0 CNN), the ceiling on what an explanation can show."""
    import torch

    from dxray.classifiers import load_classifier
    from dxray.toyworld import v5

    torch.set_num_threads(1)
    out = {}
    for w in worlds:
        folder = v5.world_folder(cache_dir, w)
        reader = load_classifier(f"hf:{folder / v5.classifier_name('cnn', 0.0)}", device="cpu")
        out[str(w)] = v5.generator_fidelity(folder / "generator", reader, seed=w)
        print(f"world {w}: its generator draws the prompted object {out[str(w)]['found']:.0%} of the time, read as the "
              f"class {out[str(w)]['read']:.0%}", flush=True)
    return out


RECORDS = RESULTS / "toyworld-sweep-runs"


def record_path(world: int, family: str, rho: float, seed: int, top_k: int, overrides: list[str],
                records: Path = RECORDS) -> Path:
    """Where one audit's record lives in the repository: named as its run folder is."""
    return records / f"{run_folder('', world, family, rho, seed, top_k, overrides).name}.json"


def _commit() -> str | None:
    import subprocess

    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def run_folder(cache_dir: str, world: int, family: str, rho: float, seed: int, top_k: int, overrides: list[str]) -> Path:
    """Where one audit's run lives: in the cache, named by everything that makes the audit, so a sweep stopped
    part-way (or a later sweep over an overlapping grid) resumes its audits instead of redoing them."""
    tag = hashlib.sha256(json.dumps([*V5_OVERRIDES, *overrides]).encode()).hexdigest()[:8]
    return Path(cache_dir) / "sweep-runs" / f"w{world}-{family}-rho{rho:g}-s{seed}-k{top_k}-{tag}"


def audit(cache_dir: str, world: int, family: str, rho: float, seed: int, top_k: int, overrides: list[str]) -> dict:
    """One audit (resumed, or nothing to do, when its run is in the cache), scored afresh by the check."""
    from dxray.toyworld import v5

    folder = v5.world_folder(cache_dir, world)
    out = run_folder(cache_dir, world, family, rho, seed, top_k, overrides)
    started = time.perf_counter()
    dxray("explain", str(ROOT / "jobs/configs/toyworld.yaml"), f"output={out}", "device=cpu", f"seed={seed}",
          f"targets.top_k={top_k}", f"cache_dir={cache_dir}", f"generator.model={folder / 'generator'}",
          f"classifier.spec=hf:{folder / v5.classifier_name(family, rho)}", *V5_OVERRIDES, *overrides)
    timing = out / "audit-seconds.json"  # the first (complete) audit's time: a resumed one takes only seconds
    seconds = json.loads(timing.read_text()) if timing.is_file() else time.perf_counter() - started
    timing.write_text(json.dumps(seconds))
    [run] = [p for p in out.iterdir() if p.is_dir()]
    dxray("toyworld", "check", str(run))
    report = json.loads((run / "toyworld_check.json").read_text())
    unit = f"world {world} seed {seed}"
    return {"world": world, "family": family, "rho": rho, "seed": seed, "seconds": round(seconds, 1),
            "calls": {level: [c | {"unit": unit} for c in calls] for level, calls in (report.get("calls") or {}).items()},
            "concepts": report.get("concepts"), "classes": report.get("classes"),
            "machine": cpu_name(), "commit": _commit()}


def recorded(world: int, family: str, rho: float, seed: int, top_k: int, overrides: list[str],
             records: Path | None) -> dict | None:
    """The audit's record, None when there is none (or records are off)."""
    if records is None:
        return None
    path = record_path(world, family, rho, seed, top_k, overrides, records)
    return json.loads(path.read_text()) if path.is_file() else None


def audit_or_record(cache_dir: str, world: int, family: str, rho: float, seed: int, top_k: int, overrides: list[str],
                    records: Path | None) -> dict:
    """The audit's record when there is one; else the audit, whose record is then written (atomically)."""
    known = recorded(world, family, rho, seed, top_k, overrides, records)
    if known is not None:
        return known
    result = audit(cache_dir, world, family, rho, seed, top_k, overrides)
    if records is not None:
        path = record_path(world, family, rho, seed, top_k, overrides, records)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
        tmp.replace(path)
    return result


def pooled(runs: list[dict], key=lambda r: "all", kind: str | None = None) -> dict:
    """Scores of the pooled calls, grouped by ``key(run)``; ``kind``: only the feature calls whose truth is that
    shortcut kind, or whose truth is core (the false positives a kind's figures must count too)."""
    from dxray.toyworld import scores

    groups: dict = defaultdict(lambda: {"classes": [], "features": []})
    for r in runs:
        g = groups[key(r)]
        g["classes"] += r["calls"].get("classes") or []
        g["features"] += [c for c in r["calls"].get("features") or []
                          if kind is None or not c["truth"] or c.get("kind") == kind]
    return {name: {level: scores.scored(calls, lambda c: c["control"]) if calls else None
                   for level, calls in g.items()} for name, g in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def reliable(run: dict) -> dict:
    """The run with only the calls of classes whose segmenter control found the object (``control`` False)."""
    return run | {"calls": {level: [c for c in calls if c.get("control") is False]
                            for level, calls in run["calls"].items()}}


def concept_shares(runs: list[dict]) -> dict:
    """Per shortcut kind: of the spurious features dxray called spurious, how many have their shortcut's concept
    as the top concept (issue 31's naming target)."""
    tally: dict = defaultdict(Counter)
    for r in runs:
        for c in r["calls"].get("features") or []:
            if c["truth"] and c["called"] and c.get("kind"):
                tally[c["kind"]]["n"] += 1
                tally[c["kind"]]["named"] += c.get("top_concept") == c.get("concept")
    return {k: {"n": v["n"], "named": v["named"], "share": v["named"] / v["n"] if v["n"] else None}
            for k, v in sorted(tally.items())}


def plot(result: dict, path: Path) -> None:
    """Recall and false-positive rate of the feature-level spurious call, and the class-level bias call's
    false-positive rate, against ρ, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    for ax, level, metric, label in ((axes[0], "features", "recall", "spurious features: recall"),
                                     (axes[1], "features", "false_positive_rate", "spurious features: FPR"),
                                     (axes[2], "classes", "false_positive_rate", "class bias calls: FPR")):
        for family, cells in result["by_family_and_rho"].items():
            xs, ys, lo, hi = [], [], [], []
            for rho, levels in sorted(cells.items(), key=lambda kv: float(kv[0])):
                f = (levels.get(level) or {}).get("dxray")
                if f and f[metric] is not None:
                    ci = f.get(f"{metric}_ci") or [f[metric], f[metric]]
                    xs.append(float(rho))
                    ys.append(f[metric])
                    lo.append(f[metric] - ci[0])
                    hi.append(ci[1] - f[metric])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=family)
        ax.set_xlabel("planted correlation ρ")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"world v5 ({result['name']}; 95% bootstrap intervals over (world, seed) units)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--worlds", default="3-7", help="world seeds (0-2 choose settings, >= 3 report)")
    ap.add_argument("--seeds", default="3-6", help="audit seeds (0-2 choose settings, >= 3 report)")
    ap.add_argument("--rho", default="1", help="planted strengths, e.g. 0,0.5,0.8,0.95,1")
    ap.add_argument("--families", default="cnn,vit")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="trainings / audits at a time (one thread each)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--no-records", action="store_true", help="audit again even where a record stands for the audit")
    ap.add_argument("--recorded-only", action="store_true",
                    help="train and audit nothing: pool the audits already recorded (a sweep part-way, named NAME-partial)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the audit")
    args = ap.parse_args()
    records = None if args.no_records else RECORDS
    worlds, seeds, rhos = seeds_of(args.worlds), seeds_of(args.seeds), _floats(args.rho)
    families = args.families.split(",")
    held_out = [min(worlds) >= 3, min(seeds) >= 3]
    if any(held_out) and not all(held_out):
        raise SystemExit("report on world seeds >= 3 AND audit seeds >= 3, or choose settings on 0-2: not a mix")
    cells = [(f, rho) for f in families for rho in rhos]
    started = time.perf_counter()
    grid = [(w, f, rho, s) for s in seeds for w in worlds for f, rho in cells]  # seed-major: a stopped sweep covers every cell
    todo = [g for g in grid if recorded(*g, args.top_k, args.overrides, records) is None]
    if args.recorded_only:
        if records is None:
            raise SystemExit("--recorded-only pools the records: not with --no-records")
        grid, todo = [g for g in grid if g not in todo], []
        worlds = sorted({w for w, *_ in grid}) or worlds
        args.name += "-partial"
    fidelity_records = {w: RECORDS / f"world-{w}-fidelity.json" for w in worlds}
    need = [] if args.recorded_only else sorted({w for w, *_ in todo} | {w for w in worlds if records is None
                                                                         or not fidelity_records[w].is_file()})
    print(f"{len(grid) - len(todo)} of {len(grid)} audits recorded in {RECORDS.relative_to(ROOT)}; training "
          f"world(s) {need or 'none'}", flush=True)
    train(args.cache_dir, need, list(dict.fromkeys([*cells, ("cnn", 0.0)])), args.jobs)  # ρ 0's CNN reads fidelity
    trained = time.perf_counter() - started
    print(f"trained {len(need)} worlds x {len(cells)} classifiers ({trained:.0f} s)", flush=True)
    generators = {str(w): json.loads(fidelity_records[w].read_text()) for w in worlds
                  if w not in need and fidelity_records[w].is_file()}
    generators |= fidelity(args.cache_dir, need)
    if records is not None:
        RECORDS.mkdir(parents=True, exist_ok=True)
        for w in need:
            fidelity_records[w].write_text(json.dumps(generators[str(w)]) + "\n")
    generators = {str(w): generators.get(str(w)) for w in worlds}
    runs = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(audit_or_record, args.cache_dir, w, f, rho, s, args.top_k, args.overrides, records)
                   for w, f, rho, s in grid]
        for fut in futures:
            runs.append(fut.result())
            r = runs[-1]
            feats = r["calls"].get("features") or []
            right = sum(c["truth"] == c["called"] for c in feats)
            print(f"world {r['world']} {r['family']} rho {r['rho']:g} seed {r['seed']}: feature calls {right}/"
                  f"{len(feats)} right ({r['seconds']:.0f} s)", flush=True)
    result = {
        "name": args.name, "held_out": all(held_out), "worlds": worlds, "seeds": seeds, "rho": rhos,
        "families": families, "top_k": args.top_k, "overrides": [*V5_OVERRIDES, *args.overrides],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}",
        "audits_machines": dict(Counter(r.get("machine") or "?" for r in runs)),
        "seconds": {"training": round(trained), "total": round(time.perf_counter() - started)},
        "generator_fidelity": generators,
        "by_family": pooled(runs, lambda r: r["family"]),
        # dxray marks a class unreliable when its control (the generator's plain pictures of it) shows no object:
        # the same figures on the classes it calls reliable, and how many calls that keeps
        "by_family_reliable": pooled([reliable(r) for r in runs], lambda r: r["family"]),
        "by_family_and_rho": {f: {f"{rho:g}": v for (_, rho), v in pooled(
            [r for r in runs if r["family"] == f], lambda r: (r["family"], r["rho"])).items()} for f in families},
        "by_family_and_kind": {f: {k: (pooled([r for r in runs if r["family"] == f and r["rho"] >= 0.95], kind=k)
                                       .get("all") or {}).get("features") for k in ("background", "marker", "pattern")}
                               for f in families},
        "concepts_by_kind": concept_shares(runs),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"toyworld-sweep-{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if len(rhos) > 1:
        plot(result, out.with_suffix(".png"))
    from dxray.toyworld import scores

    for key, where in (("by_family", ""), ("by_family_reliable", ", classes dxray calls reliable")):
        for family, levels in result[key].items():
            for level, what in (("classes", "class-level bias call"), ("features", "feature-level spurious call")):
                if levels[level]:
                    print(f"{args.name} {family}: {what}{where}, 95% intervals over (world, seed) units:")
                    for caller, figures in levels[level].items():
                        print(f"  {scores.describe(caller.replace('_', ' '), figures)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
