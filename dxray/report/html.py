"""``build_report(run, out)``: one self-contained HTML file for a run folder.

Thumbnails are embedded as ``data:`` URIs; full-size images are linked (relative to the report
when it is written inside or next to a local run, by URI otherwise). No network resources.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined

from dxray.errors import DxrayError
from dxray.report.template import TEMPLATE

# Only the columns the report shows: samples also hold masks and boxes, which can be large.
_COLUMNS = {
    "tasks": ["task_id", "kind", "class_index", "class_name", "feature_index", "feature_rank", "layer", "template",
              "status", "error", "final_loss", "target_prob", "hard_prompt_text", "baseline_prob"],
    "samples": ["task_id", "seed", "image_uri", "thumbnail", "width", "height", "class_prob", "object_fraction"],
    "verdicts": ["class_index", "feature_index", "template", "mean_object_fraction", "std_object_fraction",
                 "n_samples", "delta", "verdict"],
    "classes": ["class_index", "class_name", "template", "class_object_fraction", "n_spurious", "n_features",
                "delta"],
}
THUMB_WIDTH = 96


def _read(sink, name: str) -> list[dict[str, Any]]:
    """The rows of one table (only the report's columns), [] when the run has no such table."""
    table = sink.read_table(name, columns=_COLUMNS[name])
    return [] if table is None else table.to_pylist()


def _manifest(sink) -> dict:
    path = f"{sink.root}/manifest.json"
    try:
        with sink.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except Exception:  # an interrupted run has no manifest yet: the report still works without it
        return {}


def _data_uri(data: bytes | None) -> str | None:
    if not data:
        return None
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/webp" if data[8:12] == b"WEBP" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class _Links:
    """Full-size image links: relative when the report sits inside or next to a local run."""

    def __init__(self, sink, out: Path):
        self.sink = sink
        self.local = sink.fs.type_name == "local"
        self.root = Path(sink.root).resolve() if self.local else None
        here = out.parent.resolve()
        self.relative_to = here if self.local and (here == self.root.parent or here == self.root
                                                   or self.root in here.parents) else None

    def href(self, image_uri: str | None) -> str:
        if not image_uri:
            return "#"
        marker = f"{self.sink.run_id}/images/"
        at = image_uri.find(marker)
        rel = image_uri[at + len(self.sink.run_id) + 1:] if at >= 0 else None  # "images/..."
        if not self.local:
            return self.sink.uri(rel) if rel else image_uri
        path = self.root / rel if rel else Path(image_uri)
        if self.relative_to is not None:
            return Path(os.path.relpath(path, self.relative_to)).as_posix()
        return path.resolve().as_uri() if path.is_absolute() or rel else image_uri


def _when(stamp: str | None) -> str | None:
    """An ISO time stamp from the manifest, to the second ("2026-01-31 12:00:05 UTC")."""
    if not stamp:
        return None
    try:
        t = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp)
    return t.strftime("%Y-%m-%d %H:%M:%S") + (f" {t.tzname()}" if t.tzinfo else "")


def _float(x) -> float | None:
    return None if x is None else float(x)


def _task_view(t: dict, samples: list[dict], verdict: dict | None, links: _Links, name: str) -> dict:
    images = []
    for s in sorted(samples, key=lambda s: (s["seed"] is None, s["seed"])):
        src = _data_uri(s["thumbnail"])
        if src is None:
            continue
        w, h = s["width"] or 1, s["height"] or 1
        r = _float(s["object_fraction"])
        images.append({
            "src": src, "href": links.href(s["image_uri"]), "r": r, "seed": s["seed"], "prob": _float(s["class_prob"]),
            "height": max(1, round(THUMB_WIDTH * h / w)),
            "alt": f"{name} {t['kind']} image, seed {s['seed']}" + ("" if r is None else f", r = {r:.2f}"),
        })
    v = None
    if verdict is not None:
        v = {"verdict": verdict["verdict"], "mean": _float(verdict["mean_object_fraction"]),
             "std": _float(verdict["std_object_fraction"]), "n": verdict["n_samples"]}
    stats = [f"{label} {fmt % t[key]}" for label, key, fmt in (
        ("loss", "final_loss", "%.3g"), ("p before", "baseline_prob", "%.2f"), ("p after", "target_prob", "%.2f"))
        if t[key] is not None]
    return {
        "stats": stats, "kind": t["kind"] or "class", "status": t["status"] or "error", "error": t["error"],
        "feature_index": t["feature_index"], "rank": t["feature_rank"], "layer": t["layer"],
        "template": t["template"] or "", "prompt": t["hard_prompt_text"], "final_loss": _float(t["final_loss"]),
        "baseline_prob": _float(t["baseline_prob"]), "target_prob": _float(t["target_prob"]),
        "verdict": v, "images": images,
    }


def _context(sink, out: Path) -> dict:
    tasks, samples = _read(sink, "tasks"), _read(sink, "samples")
    verdicts, classes = _read(sink, "verdicts"), _read(sink, "classes")
    manifest = _manifest(sink)
    config = manifest.get("config") or {}
    links = _Links(sink, out)

    by_task: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_task[s["task_id"]].append(s)
    verdict_of = {(v["class_index"], v["feature_index"], v["template"] or ""): v for v in verdicts}
    class_rows = {(c["class_index"], c["template"] or ""): c for c in classes}

    delta = next((_float(r["delta"]) for r in [*classes, *verdicts] if r["delta"] is not None), None)
    if delta is None:
        delta = _float((config.get("verdict") or {}).get("delta"))

    configured = (config.get("prompt") or {}).get("templates") or []
    used = dict.fromkeys([*(t["template"] or "" for t in tasks), *(tpl for _, tpl in class_rows)])
    templates = [t for t in configured if t in used] + [t for t in used if t not in configured]
    order = {t: i for i, t in enumerate(templates)}
    names: dict[int, str] = {}
    for r in [*tasks, *classes]:
        if r["class_name"] and r["class_index"] is not None:
            names.setdefault(r["class_index"], r["class_name"])

    grouped: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for t in tasks:
        if t["class_index"] is not None:
            grouped[t["class_index"]][t["template"] or ""].append(t)
    for c, tpl in class_rows:
        grouped[c].setdefault(tpl, [])

    def r_and_bias(row: dict | None) -> tuple[float | None, bool]:
        r = _float(row["class_object_fraction"]) if row else None
        return r, bool(r is not None and delta is not None and r < delta)

    view, summary = [], []
    for c in sorted(grouped):
        name = names.get(c) or f"class {c}"
        groups = []
        for j, tpl in enumerate(sorted(grouped[c], key=lambda t: order.get(t, len(order)))):
            row = class_rows.get((c, tpl))
            r, biased = r_and_bias(row)
            ts = [_task_view(t, by_task.get(t["task_id"], []), verdict_of.get((c, t["feature_index"], tpl))
                             if t["kind"] == "feature" else None, links, name) for t in grouped[c][tpl]]
            rank = lambda t: (t["rank"] is None, t["rank"] or 0, t["feature_index"] or 0)  # noqa: E731
            anchor = f"class-{c}" if j == 0 else f"class-{c}-t{j}"
            groups.append({
                "template": tpl, "anchor": f"class-{c}-t{j}", "r": r, "biased": biased,
                "n_spurious": row["n_spurious"] if row else None, "n_features": row["n_features"] if row else None,
                "class_tasks": [t for t in ts if t["kind"] == "class"],
                "features": sorted((t for t in ts if t["kind"] == "feature"), key=rank),
                "neurons": sorted((t for t in ts if t["kind"] == "neuron"), key=rank),
            })
            summary.append({
                "class_index": c, "name": name, "template": tpl, "anchor": anchor, "r": r,
                "biased": biased, "n_spurious": row["n_spurious"] if row else None,
                "n_features": row["n_features"] if row else None,
                "n_failed": sum(t["status"] != "ok" for t in ts),
            })
        view.append({"class_index": c, "name": name, "anchor": f"class-{c}", "groups": groups})

    # Neuron tasks (Eq. 4) belong to no class: their own section, after the classes.
    neurons = sorted((_task_view(t, by_task.get(t["task_id"], []), None, links, f"{t['layer']}:{t['feature_index']}")
                      for t in tasks if t["class_index"] is None),
                     key=lambda t: (t["layer"] or "", t["feature_index"] or 0, t["template"]))
    n_failed = sum((t["status"] or "error") != "ok" for t in tasks)
    gen, clf = config.get("generator") or {}, config.get("classifier") or {}
    return {
        "run_id": sink.run_id, "generator": gen.get("model"), "classifier": clf.get("spec"), "delta": delta,
        "n_ok": len(tasks) - n_failed, "n_failed": n_failed, "n_samples": len(samples),
        "finished": _when(manifest.get("finished")), "several_templates": len(templates) > 1,
        "summary": summary, "classes": view, "neurons": neurons,
    }


# Text-direction controls survive HTML escaping and can reorder what a reader sees (a class name holding U+202E
# shows its tail reversed): every value rendered is passed through _visible, which shows each as "[U+202E]".
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(value):
    if isinstance(value, str) and _BIDI.search(value):
        return _BIDI.sub(lambda m: f"[U+{ord(m.group()):04X}]", value)
    return value


def render(context: dict) -> str:
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=False, lstrip_blocks=False,
                      finalize=_visible)
    return env.from_string(TEMPLATE).render(**context)


def build_report(run: str, out: str | Path, *, storage=None) -> Path:
    """Write a self-contained HTML report of the run folder ``run`` (local or ``s3://``) to ``out``.

    Raises a one-line :class:`DxrayError` when ``run`` is not a run folder."""
    from dxray.runs import open_run

    run = str(run)
    if "://" not in run and not Path(run).is_dir():
        raise DxrayError(f"no run found at {run} (not a folder)")
    sink = open_run(run, storage=storage)
    out = Path(out)
    if out.is_dir():
        raise DxrayError(f"report path {out} is a folder; give a file name such as {out / 'report.html'}")
    html = render(_context(sink, out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out
