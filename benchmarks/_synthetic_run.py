"""A synthetic finished run, written through the real sink: ``write_run(sink, classes=1000, ...)``.

``write_run(sink, classes=1000, features=5, samples=10, thumb_px=96, seed=0)`` writes into
``sink`` (a :class:`dxray.storage.sink.RunSink`, local folder or S3) what a finished full-ImageNet audit
leaves behind, without any model:

- ``tasks``: per class one class task (Eq.3) and ``features`` feature tasks (Eq.5, ranks 1..features,
  layer ``penultimate``), template ``"{}"``, status ok, with a 200-step loss curve, a 1 × 768 prompt
  embedding, 200 train seeds and the other columns :func:`dxray.pipeline.rows.task_row` fills in;
- ``samples``: ``samples`` rows per task (held-out seeds 1000..), each with a distinct PNG thumbnail of
  ``thumb_px`` × ``thumb_px`` (encoded like :func:`dxray.storage.images.thumbnail_png`: PNG, optimize) that
  looks like a small generated picture: a two-colour gradient, a few soft-edged ellipses and boxes, and
  multi-octave colour texture, so PNG, JPEG and WebP sizes behave as they do on real thumbnails (about
  14 KB PNG, 1.5 KB JPEG q70 at 96 px). ``image_uri`` points at ``images/{task_id}/{seed:010d}.png`` in
  the run, as the job writes it, but the full-size images themselves are not written (pass
  ``full_images=True`` to write a ``thumb_px`` PNG there); width/height say 512 × 512; r
  (``object_fraction``), a mask RLE, boxes and scores are drawn per image;
- ``verdicts`` and ``classes``: decided from those tables by :func:`dxray.verdict.decide` at ``delta``;
- ``feature_ranking``: the top ``features`` per class (source ``weights``);
- ``manifest.json``, written last, with the config sections the readers use (prompt templates,
  generator, classifier, verdict), row counts, task counts and the decision.

Parts are named as the job names them: one ``tasks`` and one ``samples`` part per task when
``tasks_per_part=1`` (the real layout; 12,000 files for full ImageNet), or one per ``tasks_per_part``
tasks to write faster; ``verdicts``, ``classes`` and ``feature_ranking`` are ``part-all``.
Everything is a pure function of ``seed`` (the same arguments give the same bytes), except the
manifest's time stamps. Returns a dict of row counts per table.

Thumbnails are made in batches with numpy and PNG-encoded on a thread pool; full ImageNet
(60,000 thumbnails) takes a few minutes on a 2-core box.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image

from dxray.storage.schemas import TABLES
from dxray.verdict import decide

TEMPLATE = "{}"
FULL_PX = 512
STEPS = 200
EMBED_DIM = 768


def class_name(c: int) -> str:
    """A WordNet-style synthetic name ("synthetic 0042, Fictus exemplaris 42")."""
    return f"synthetic {c:04d}, Fictus exemplaris {c}"


def _interp(px: int, n: int) -> np.ndarray:
    """(px, n) linear interpolation weights from an n-point grid to px pixels (grid spans the image)."""
    pos = (np.arange(px) + 0.5) / px * (n - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n - 2)
    frac = pos - lo
    m = np.zeros((px, n), np.float32)
    m[np.arange(px), lo] = 1 - frac
    m[np.arange(px), lo + 1] = frac
    return m


def pictures(rng: np.random.Generator, n: int, px: int) -> np.ndarray:
    """``n`` synthetic pictures, uint8 (n, px, px, 3): gradient + soft shapes + multi-octave texture."""
    t = np.linspace(0, 1, px, dtype=np.float32)[None, :, None, None]
    top, bottom = rng.uniform(0, 255, (2, n, 1, 1, 3)).astype(np.float32)
    img = top * (1 - t) + bottom * t + np.zeros((1, 1, px, 1), np.float32)
    low = max(8, px // 4)  # shapes are drawn on a coarse grid and upsampled: soft edges, a quarter of the work
    yy, xx = (np.mgrid[0:low, 0:low].astype(np.float32) + 0.5) / low
    up = _interp(px, low)
    for _ in range(4):  # shapes: soft-edged ellipses and boxes, each image its own
        cy, cx = rng.uniform(-0.1, 1.1, (2, n, 1, 1)).astype(np.float32)
        ry, rx = (1 / rng.uniform(0.08, 0.3, (2, n, 1, 1))).astype(np.float32)
        colour = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
        dy, dx = np.abs(yy - cy) * ry, np.abs(xx - cx) * rx
        dist = np.where(rng.random((n, 1, 1)) < 0.5, np.sqrt(dy * dy + dx * dx), np.maximum(dy, dx))
        shown = (rng.random((n, 1, 1)) < 0.8).astype(np.float32)
        alpha = np.clip((1 - dist) * 3 + 0.5, 0, 1) * shown
        alpha = np.einsum("yi,nij,xj->nyx", up, alpha, up, optimize=True)[..., None]
        img += alpha * (colour - img)
    for octave, amp in ((4, 28.0), (8, 20.0), (16, 14.0), (32, 9.0), (px // 2, 6.0)):  # texture, coarse to fine
        grid = rng.normal(0, amp, (n, octave, octave, 3)).astype(np.float32)
        m = _interp(px, octave)
        img += np.einsum("yi,nijc,xj->nyxc", m, grid, m, optimize=True)
    return np.clip(img, 0, 255).astype(np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _task_id(seed: int, kind: str, c: int, f: int | None) -> str:
    return hashlib.sha256(f"{seed}/{kind}/{c}/{f}".encode()).hexdigest()[:16]


def _rle(rng: np.random.Generator, r: float) -> list[int]:
    """A plausible union-mask RLE (background first) of a FULL_PX² image with object fraction ~r."""
    total, fg = FULL_PX * FULL_PX, int(r * FULL_PX * FULL_PX)
    runs = int(rng.integers(1, 40))
    fg_runs = np.diff(np.sort(rng.integers(0, fg + 1, runs - 1)), prepend=0, append=fg) if fg else np.zeros(runs, int)
    bg = total - fg
    bg_runs = np.diff(np.sort(rng.integers(0, bg + 1, runs)), prepend=0, append=bg)
    out = []
    for i in range(runs):
        out += [int(bg_runs[i]), int(fg_runs[i])]
    out.append(int(bg_runs[runs]))
    return out


def write_run(sink, classes: int = 1000, features: int = 5, samples: int = 10, thumb_px: int = 96, seed: int = 0,
              *, delta: float = 0.5, tasks_per_part: int = 1, full_images: bool = False,
              batch: int = 256) -> dict[str, int]:
    """Write a synthetic finished run into ``sink`` (see the module docstring); returns row counts."""
    if classes < 1 or features < 0 or samples < 1 or thumb_px < 8 or tasks_per_part < 1:
        raise ValueError("classes >= 1, features >= 0, samples >= 1, thumb_px >= 8, tasks_per_part >= 1")
    rng = np.random.default_rng(seed)
    run_id, started = sink.run_id, datetime(2026, 1, 1, tzinfo=UTC)
    seeds = list(range(1000, 1000 + samples))
    feature_dim = 2048
    specs, ranking = [], []
    for c in range(classes):
        name = class_name(c)
        specs.append(("class", c, name, None, None))
        picked = rng.choice(feature_dim, size=features, replace=False)
        for rank, f in enumerate(picked.tolist(), start=1):
            specs.append(("feature", c, name, f, rank))
            ranking.append({"run_id": run_id, "class_index": c, "class_name": name, "feature_index": f,
                            "rank": rank, "importance": float(rng.gamma(2.0, 0.05) / rank),
                            "source": "weights", "n_images": 0})

    pool = ThreadPoolExecutor(max_workers=4)
    counts = {"tasks": 0, "samples": 0}
    pending_tasks: list[dict] = []
    pending_samples: list[dict] = []
    pending_ids: list[str] = []

    def flush() -> None:
        if not pending_tasks:
            return
        part = pending_ids[0] if tasks_per_part == 1 else f"{pending_ids[0]}-{len(pending_ids)}"
        sink.write_table("samples", pending_samples, part=part)  # samples first, the task rows last
        sink.write_table("tasks", pending_tasks, part=part)
        counts["tasks"] += len(pending_tasks)
        counts["samples"] += len(pending_samples)
        pending_tasks.clear(), pending_samples.clear(), pending_ids.clear()

    per_batch = max(1, batch // samples)
    for start in range(0, len(specs), per_batch):
        chunk = specs[start:start + per_batch]
        thumbs = list(pool.map(_png, pictures(rng, len(chunk) * samples, thumb_px)))
        for i, (kind, c, name, f, rank) in enumerate(chunk):
            tid = _task_id(seed, kind, c, f)
            objective = f"class_ce({c})" if kind == "class" else f"class_ce({c}) - 1 * neuron('penultimate', {f})"
            loss = np.cumsum(rng.normal(-0.01, 0.05, STEPS)).astype(np.float32) + 3.0
            baseline = float(rng.uniform(0, 0.2))
            pending_tasks.append({
                "run_id": run_id, "task_id": tid, "kind": kind, "class_index": c, "class_name": name,
                "feature_index": f, "feature_rank": rank, "layer": "penultimate" if kind == "feature" else None,
                "objective": objective, "template": TEMPLATE, "n_tokens": 1, "init": f"word:synthetic {c:04d}",
                "status": "ok", "error": None, "steps": STEPS, "final_loss": float(loss[-1]),
                "loss_curve": loss.tolist(), "target_prob": float(rng.uniform(0.3, 1.0)), "stopped_early": False,
                "prompt_embedding": [rng.normal(0, 0.02, EMBED_DIM).astype(np.float32).tolist()],
                "hard_prompt_text": None, "train_seeds": [int(x) for x in rng.integers(0, 2**31, STEPS)],
                "lr": 0.1, "samples_per_step": 1, "seconds": float(rng.uniform(60, 200)), "baseline_prob": baseline,
            })
            mean_r = float(rng.beta(2, 2))
            for j, s in enumerate(seeds):
                png = thumbs[i * samples + j]
                rel = f"images/{tid}/{s:010d}.png"
                uri = sink.write_bytes(rel, png) if full_images else sink.uri(rel)
                r = float(np.clip(rng.normal(mean_r, 0.15), 0, 1))
                n_boxes = int(rng.integers(0, 4)) if r > 0 else 0
                boxes = [sorted(rng.uniform(0, FULL_PX, 2).tolist()) + sorted(rng.uniform(0, FULL_PX, 2).tolist())
                         for _ in range(n_boxes)]
                pending_samples.append({
                    "run_id": run_id, "task_id": tid, "class_index": c, "feature_index": f, "seed": s,
                    "image_uri": uri, "thumbnail": png, "width": FULL_PX, "height": FULL_PX,
                    "class_prob": float(rng.uniform(0, 1)), "feature_activation": float(rng.gamma(2, 1)),
                    "detection_prompt": f"synthetic {c:04d}.", "object_fraction": r, "mask_rle": _rle(rng, r),
                    "boxes": [[b[0], b[2], b[1], b[3]] for b in boxes],
                    "box_scores": rng.uniform(0.3, 0.9, n_boxes).tolist(),
                })
            pending_ids.append(tid)
            if len(pending_ids) >= tasks_per_part:
                flush()
    flush()
    pool.shutdown()

    sink.write_table("feature_ranking", ranking, part="all")
    tasks, sample_table = sink.read_table("tasks"), sink.read_table("samples", columns=None)
    verdicts, class_rows = decide(tasks, sample_table, delta, run_id)
    sink.write_table("verdicts", verdicts, part="all")
    sink.write_table("classes", class_rows, part="all")
    rows = {**counts, "verdicts": len(verdicts), "classes": len(class_rows), "feature_ranking": len(ranking),
            "agreement": 0}
    sink.write_manifest({
        "run_id": run_id, "dxray_command": "benchmarks/_synthetic_run.py",
        "config": {"output": sink.uri("").rsplit("/", 1)[0], "prompt": {"templates": [TEMPLATE], "n_tokens": 1},
                   "generator": {"model": "synthetic/lcm"}, "classifier": {"spec": "synthetic/resnet50"},
                   "targets": {"classes": list(range(classes)), "top_k": features},
                   "sample": {"k": samples, "seeds": seeds}, "verdict": {"delta": delta}},
        "versions": {}, "models": {"generator": "synthetic/lcm", "classifier": "synthetic/resnet50"},
        "feature_source": ["weights"], "device": "synthetic",
        "started": started.isoformat(), "finished": (started + timedelta(hours=12)).isoformat(),
        "rows": {name: rows.get(name, 0) for name in TABLES},
        "tasks": {"planned": counts["tasks"], "skipped": 0, "ok": counts["tasks"], "failed": 0},
        "decision": {"delta": delta, "source": "config"},
    })
    return rows
