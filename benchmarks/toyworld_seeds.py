"""The toy world's known-answer figures over many audit seeds (quality, not speed).

    python benchmarks/toyworld_seeds.py --cache-dir C --seeds 3-10 --jobs 2 --name v4

One class-task audit per seed (``dxray explain jobs/configs/toyworld.yaml targets.top_k=0 seed=S``, one
torch thread each, ``--jobs`` at a time), each scored by ``dxray toyworld check``. One run's figure means
little (a class flips with the seed, and with the CPU's rounding): this reports the mean over seeds, the
per-seed figures, and which classes missed how often. The world is the one cached under ``--cache-dir``
(trained there on first use). Extra ``key=value`` arguments override the preset, as on the CLI.
Writes ``benchmarks/results/toyworld-NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DXRAY = [sys.executable, "-m", "dxray"]


def seeds_of(text: str) -> list[int]:
    """"3-10" or "0,2,5" -> a list of ints."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.platform()


def dxray(*args: str) -> None:
    """Run the CLI on one torch thread; a failure ends the benchmark with the CLI's own one-line error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([*DXRAY, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"dxray {args[0]} failed (exit {done.returncode}): {last}")


def audit(seed: int, cache_dir: str, out: Path, overrides: list[str]) -> dict:
    started = time.perf_counter()
    dxray("explain", str(ROOT / "jobs/configs/toyworld.yaml"), f"output={out}", "device=cpu", "targets.top_k=0",
          f"seed={seed}", f"cache_dir={cache_dir}", *overrides)
    seconds = time.perf_counter() - started
    [run] = [p for p in out.iterdir() if p.is_dir()]
    dxray("toyworld", "check", str(run))
    report = json.loads((run / "toyworld_check.json").read_text())
    return {"seed": seed, "seconds": round(seconds, 1), "bias_call_accuracy": report["bias_call_accuracy"],
            "optimised_fraction": report["optimised_fraction"],
            "classes": [{k: r[k] for k in ("class_name", "planted_biased", "called_biased", "object_fraction",
                                           "prob_before", "prob_after")} for r in report["classes"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", required=True, help="world cache (trained there on first use)")
    ap.add_argument("--seeds", default="3-10", help="audit seeds: 3-10 or 3,5,8 (0-2 chose the preset)")
    ap.add_argument("--jobs", type=int, default=2, help="audits at a time (one thread each)")
    ap.add_argument("--name", required=True, help="results/toyworld-NAME.json")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    args = ap.parse_args()
    # Train the world once, before the audits race to build it.
    subprocess.run([*DXRAY, "toyworld", "train", "--cache-dir", args.cache_dir], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(audit, s, args.cache_dir, Path(tmp) / f"seed{s}", args.overrides)
                   for s in seeds_of(args.seeds)]
        runs = []
        for f in futures:
            runs.append(f.result())
            r = runs[-1]
            print(f"seed {r['seed']}: bias calls {r['bias_call_accuracy']:.0%}, optimised {r['optimised_fraction']:.0%} "
                  f"({r['seconds']:.0f} s)", flush=True)
    misses = dict(Counter(c["class_name"] for r in runs for c in r["classes"]
                          if c["called_biased"] is not None and c["called_biased"] != c["planted_biased"]))
    mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    result = {"name": args.name, "cache_dir": args.cache_dir, "overrides": args.overrides,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}",
              "mean_bias_call_accuracy": mean("bias_call_accuracy"), "mean_optimised_fraction": mean("optimised_fraction"),
              "misses_by_class": misses, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"toyworld-{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.name}: mean bias calls {result['mean_bias_call_accuracy']:.1%}, optimised "
          f"{result['mean_optimised_fraction']:.1%} over seeds {args.seeds}; misses {misses}")


if __name__ == "__main__":
    main()
