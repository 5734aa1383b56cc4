"""Compaction of a finished run, measured on a synthetic full-ImageNet-sized run, before vs after in one process.

    python benchmarks/compact.py                      # 6000 tasks x 10 samples, ~8 kB thumbnails
    python benchmarks/compact.py --tasks 600 --out /tmp/x   # smaller, keep the folder

The run is written through RunSink.write_table exactly as AuditJob.commit writes it (samples part first,
task part last, one pair per task), rows shaped like pipeline/rows.py's: 1000 classes x (1 class task +
5 feature tasks), 200 optimisation steps (loss curve, train seeds), one learnable 768-d token, and 10
held-out samples per task with an 8 kB incompressible thumbnail (a PNG does not compress further), an RLE
mask, boxes and scores. Then, on the same folder:

- files per table before / after compaction;
- seconds of ``compact_run`` (the whole step, as ``AuditJob.finish`` calls it);
- seconds of ``committed_task_ids()`` (what every resume reads first) before vs after: the ratio;
- seconds of a DuckDB ``count(*)`` over ``samples/*.parquet`` (an analyst's glob) before vs after;
- the window a globbing reader can see duplicates in: the time from a compacted file appearing to the
  last of its parts deleted (measured around the compactor's delete step), longest and in total.

Writes benchmarks/results/compact.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _rows(run_id: str, i: int, k: int, thumb: int, rng: random.Random) -> tuple[dict, list[dict]]:
    c, rank = divmod(i, 6)
    kind = "class" if rank == 0 else "feature"
    feature = None if rank == 0 else rng.randrange(2048)
    task_id = f"{rng.getrandbits(64):016x}"
    steps = 200
    task = {
        "run_id": run_id, "task_id": task_id, "kind": kind, "class_index": c, "class_name": f"class {c}",
        "feature_index": feature, "feature_rank": rank or None, "layer": None if rank == 0 else "penultimate",
        "objective": f"class_ce({c})" if rank == 0 else f"class_ce({c}) - neuron('penultimate', {feature})",
        "template": "{}", "n_tokens": 1, "init": "class", "status": "ok", "error": None, "steps": steps,
        "final_loss": rng.random(), "loss_curve": [rng.random() for _ in range(steps)], "target_prob": rng.random(),
        "stopped_early": False, "prompt_embedding": [[rng.gauss(0, 1) for _ in range(768)]],
        "hard_prompt_text": None, "train_seeds": list(range(steps)), "lr": 0.1, "samples_per_step": 2,
        "seconds": 100 * rng.random(), "baseline_prob": rng.random(),
    }
    samples = []
    for s in range(k):
        samples.append({
            "run_id": run_id, "task_id": task_id, "class_index": c, "feature_index": feature, "seed": 10_000 + s,
            "image_uri": f"s3://bucket/audits/{run_id}/images/{task_id}/{10_000 + s:010d}.png",
            "thumbnail": rng.randbytes(thumb), "width": 512, "height": 512, "class_prob": rng.random(),
            "feature_activation": rng.random(), "detection_prompt": f"class {c}.", "object_fraction": rng.random(),
            "mask_rle": [rng.randrange(5000) for _ in range(40)], "boxes": [[10.0, 20.0, 300.0, 400.0]] * 2,
            "box_scores": [0.8, 0.4],
        })
    return task, samples


def _timed(call, repeat: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=6000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--thumb", type=int, default=8192, help="thumbnail bytes per sample row")
    ap.add_argument("--out", default=None, help="run folder parent (default: a temporary folder, removed)")
    ap.add_argument("--repeat", type=int, default=3, help="timings of committed_task_ids / DuckDB (median)")
    ap.add_argument("--results", default=str(RESULTS / "compact.json"))
    args = ap.parse_args()

    import duckdb

    from dxray.storage import compact
    from dxray.storage.sink import RunSink

    parent = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dxray-compact-"))
    sink = RunSink(str(parent), "run-bench")
    shutil.rmtree(sink.root, ignore_errors=True)
    rng = random.Random(0)
    start = time.perf_counter()
    for i in range(args.tasks):
        task, samples = _rows(sink.run_id, i, args.k, args.thumb, rng)
        sink.write_table("samples", samples, part=task["task_id"])
        sink.write_table("tasks", [task], part=task["task_id"])
    write_s = time.perf_counter() - start
    root = Path(sink.root)

    def files() -> dict[str, int]:
        return {t: sum(1 for p in (root / t).iterdir() if not p.name.startswith((".", "_"))) for t in ("tasks", "samples")}

    def size_mb(t: str) -> float:
        return round(sum(p.stat().st_size for p in (root / t).iterdir()) / 2**20, 1)

    def glob_count() -> int:
        return duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/samples/*.parquet')").fetchall()[0][0]

    before = {"files": files(), "mb": {t: size_mb(t) for t in ("tasks", "samples")}}
    ids_before_s, ids = _timed(sink.committed_task_ids, args.repeat)
    glob_before_s, n_glob = _timed(glob_count, args.repeat)
    assert len(ids) == args.tasks and n_glob == args.tasks * args.k

    windows: list[float] = []
    delete = compact._delete

    def timed_delete(*a, **kw):  # the parts of a file that is already visible: the duplicates window
        t0 = time.perf_counter()
        delete(*a, **kw)
        windows.append(time.perf_counter() - t0)

    compact._delete = timed_delete
    compact_s, summary = _timed(lambda: compact.compact_run(sink))
    compact._delete = delete

    after = {"files": files(), "mb": {t: size_mb(t) for t in ("tasks", "samples")}}
    ids_after_s, ids_after = _timed(sink.committed_task_ids, args.repeat)
    glob_after_s, n_glob_after = _timed(glob_count, args.repeat)
    assert ids_after == ids and n_glob_after == n_glob
    again_s, again = _timed(lambda: compact.compact_run(sink))
    assert again["samples"]["new_files"] == again["tasks"]["new_files"] == 0

    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
                   f"load average {os.getloadavg()[0]:.1f}",
        "run": {"tasks": args.tasks, "samples_per_task": args.k, "thumbnail_bytes": args.thumb,
                "write_s": round(write_s, 1)},
        "before": before, "after": after, "summary": summary,
        "compact_s": round(compact_s, 2),
        "compact_again_s": round(again_s, 3),
        "committed_task_ids_s": {"before": round(ids_before_s, 3), "after": round(ids_after_s, 4),
                                 "ratio": round(ids_before_s / ids_after_s, 1)},
        "duckdb_glob_count_s": {"before": round(glob_before_s, 3), "after": round(glob_after_s, 4),
                                "ratio": round(glob_before_s / glob_after_s, 1)},
        "duplicates_window_s": {"longest": round(max(windows, default=0.0), 4),
                                "total": round(sum(windows), 3), "files": len(windows)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text + "\n")
    if not args.out:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
