"""``build_report(run, out)``: the HTML report of a run folder, an index page plus one page per class.

``out`` (``report.html``) is the index: the run header, the sortable class summary and a summary of
the neuron tasks, without images, so it opens at once for 1000 classes. The pages with images go in
a sibling folder named after it (``report_files/``): ``class-{index}.html`` per class and
``neurons.html`` (``neurons-2.html``, ... past :data:`NEURONS_PER_PAGE` tasks). Every page is
self-contained: thumbnails are inlined as small WebP/JPEG ``data:`` URIs (:mod:`dxray.report.thumbs`),
full-size images are linked (relative to the page when the report sits inside or next to a local run,
by URI otherwise), and a Content-Security-Policy allows nothing else (:func:`dxray.report.template.csp`).

Written atomically as a whole: the pages go into a hidden folder beside ``out``, which then replaces
the old ``report_files/`` (renamed away, then deleted), and the index replaces ``out`` last. A crash
never leaves a partial page at a final name, and a re-run leaves no page of the previous report behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import DictLoader, Environment, StrictUndefined
from markupsafe import Markup

from dxray.errors import DxrayError, visible, what_is
from dxray.report import thumbs
from dxray.report.template import PAGES, SCRIPT, STYLE, csp
from dxray.verdict import LOW_CONFIDENCE, NOT_EXPLAINED, RESAMPLES, class_call

# Only the columns the report shows: samples also hold masks and boxes, which can be large.
_COLUMNS = {
    "tasks": ["task_id", "kind", "class_index", "class_name", "feature_index", "feature_rank", "layer", "template",
              "status", "error", "final_loss", "target_prob", "hard_prompt_text", "baseline_prob", "chosen_loss"],
    "samples": ["task_id", "seed", "image_uri", "width", "height", "class_prob", "object_fraction"],
    "verdicts": ["class_index", "feature_index", "template", "mean_object_fraction", "std_object_fraction",
                 "n_samples", "delta", "verdict", "mean_object_fraction_low", "mean_object_fraction_high",
                 "confidence", "low_confidence", "top_concepts", "top_concept_fractions", "mean_activation",
                 "control_activation", "explained"],
    "classes": ["class_index", "class_name", "template", "class_object_fraction", "n_spurious", "n_features",
                "delta", "explained", "class_prob", "n_not_explained", "n_low_confidence", "control_object_fraction", "reliable", "detection_prompt",
                "detection_candidates", "candidate_control_object_fractions", "class_top_concepts",
                "class_top_concept_fractions"],
}
THUMB_WIDTH = thumbs.WIDTH
NEURONS_PER_PAGE = 100
MARKER = ".dxray-report"  # in the pages folder: a folder holding it is a report's, safe to replace


def _read(sink, name: str) -> list[dict[str, Any]]:
    """The rows of one table (only the report's columns), [] when the run has no such table."""
    return _rows(sink, name, sink.read_table(name, columns=_COLUMNS[name]))


def _rows(sink, name: str, table) -> list[dict[str, Any]]:
    try:
        return [] if table is None else table.to_pylist()
    except UnicodeDecodeError:  # a flipped byte inside a text column reads back as bytes that are not UTF-8
        raise DxrayError(f"run {sink.uri('')}: table {name} holds text that is not UTF-8 (a corrupt part); "
                         f"delete its damaged part and re-run the run's command to write it again") from None


def _manifest(sink) -> tuple[dict, str | None]:
    """The run's manifest and, when there is none to read, why (an interrupted run has none yet: the report
    still works without it)."""
    try:
        manifest = sink.read_manifest()
        if manifest is not None:
            return manifest, None
        return {}, "its manifest.json is missing" if sink.read_bytes("manifest.json") is None else \
            "its manifest.json is not a JSON object"
    except Exception:
        return {}, "its manifest.json cannot be read"


def unfinished(model: _Model) -> str | None:
    """One line saying that the run a report shows has not finished (None when it has)."""
    what = f"{model.run['n_ok'] + model.run['n_failed']} task(s) and {model.run['n_samples']} sample(s)"
    planned = _number(_dict(model.manifest.get("tasks")).get("planned"))
    if model.manifest_problem:
        why = model.manifest_problem
    elif planned is not None and len(model.task_ids) < planned:
        why = f"it holds {len(model.task_ids)} of its {planned:.0f} planned tasks"
    else:
        return None
    return (f"run {model.run['run_id']} has not finished ({why}): the report shows what is there, {what}; "
            f"re-running the run's command finishes it")


class _Thumbnails:
    """The samples' stored thumbnails, kept as one Arrow column (not Python bytes) and re-encoded for the
    page that shows them, on a few threads."""

    def __init__(self, column, fmt: str):
        self.column = column
        self.fmt = fmt
        self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))

    def encode(self, rows: list[int]) -> list[tuple[str, int, int] | None]:
        if self.column is None:
            return [None] * len(rows)
        return list(self.pool.map(lambda i: thumbs.small(self.column[i].as_py(), self.fmt), rows))

    def close(self) -> None:
        self.pool.shutdown()


class _Links:
    """Full-size image links: relative to the page when the report sits inside or next to a local run."""

    def __init__(self, sink, out: Path, pages: Path):
        self.sink = sink
        self.local = sink.fs.type_name == "local"
        self.root = Path(sink.root).resolve() if self.local else None
        here = out.parent.resolve()
        near = self.local and (here == self.root.parent or here == self.root or self.root in here.parents)
        self.relative_to = here / pages.name if near else None

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
            return quote(Path(os.path.relpath(path, self.relative_to)).as_posix())
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


# The manifest is JSON written by the job, but a reader takes what it finds: anything else is as if absent.
def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x) -> list:
    return x if isinstance(x, list) else []


def _number(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _concepts(names, fractions) -> list[dict]:
    """What a task's images show besides the object (issue 20): [{"name", "fraction"}], highest first."""
    if not names:
        return []
    return [{"name": n, "fraction": _float(f)} for n, f in zip(names, fractions or [None] * len(names), strict=True)]


def _task_view(t: dict, verdict: dict | None, concepts: list[dict] | None = None) -> dict:
    """A task's block without its images (:func:`_with_images` adds them for the page that shows them)."""
    v = None
    if verdict is not None:
        call = verdict["verdict"]
        v = {"verdict": call, "badge": "unexplained" if call == NOT_EXPLAINED else call,
             "activation": _float(verdict["mean_activation"]), "control_activation": _float(verdict["control_activation"]),
             "mean": _float(verdict["mean_object_fraction"]),
             "std": _float(verdict["std_object_fraction"]), "n": verdict["n_samples"],
             # issue 19; a run decided before it has none of these: no interval, no flag
             "low": _float(verdict["mean_object_fraction_low"]), "high": _float(verdict["mean_object_fraction_high"]),
             "confidence": _float(verdict["confidence"]), "unsure": bool(verdict["low_confidence"])}
    # A hard prompt's final_loss is its last Gumbel draw's; chosen_loss is that of the words shown (older runs: none).
    loss = "chosen_loss" if t.get("chosen_loss") is not None else "final_loss"
    stats = [f"{label} {fmt % t[key]}" for label, key, fmt in (
        ("loss", loss, "%.3g"), ("p before", "baseline_prob", "%.2f"), ("p after", "target_prob", "%.2f"))
        if t[key] is not None]
    return {
        "task_id": t["task_id"], "stats": stats, "kind": t["kind"] or "class", "status": t["status"] or "error",
        "error": t["error"], "feature_index": t["feature_index"], "rank": t["feature_rank"], "layer": t["layer"],
        "template": t["template"] or "", "prompt": t["hard_prompt_text"], "verdict": v, "images": [],
        "anchor": None, "href": None,
        "concepts": concepts if concepts is not None else
        _concepts(verdict["top_concepts"], verdict["top_concept_fractions"]) if verdict is not None else [],
    }


class _Model:
    """Everything the pages show, read once from the run's tables."""

    def __init__(self, sink, run: str):
        from dxray.runs import check_decided

        for name in ("classes", "verdicts"):
            check_decided(sink, run, name)
        # One read of the samples: its rows, and the thumbnails of the same rows as an Arrow column.
        table = sink.read_table("samples", columns=[*_COLUMNS["samples"], "thumbnail"])
        self.thumbnails = None if table is None else table.column("thumbnail")
        tasks = _read(sink, "tasks")
        samples = _rows(sink, "samples", None if table is None else table.drop_columns(["thumbnail"]))
        verdicts, classes = _read(sink, "verdicts"), _read(sink, "classes")
        manifest, self.manifest_problem = _manifest(sink)
        self.manifest = manifest
        self.task_ids = {t["task_id"] for t in tasks}
        config = _dict(manifest.get("config"))

        self.samples = samples
        self.by_task: dict[str, list[int]] = defaultdict(list)  # task id -> rows of the samples table
        for i, s in enumerate(samples):
            self.by_task[s["task_id"]].append(i)
        verdict_of = {(v["class_index"], v["feature_index"], v["template"] or ""): v for v in verdicts}
        class_rows = {(c["class_index"], c["template"] or ""): c for c in classes}

        delta = next((_float(r["delta"]) for r in [*classes, *verdicts] if r["delta"] is not None), None)
        if delta is None:
            delta = _number(_dict(config.get("verdict")).get("delta"))

        configured = [t for t in _list(_dict(config.get("prompt")).get("templates")) if isinstance(t, str)]
        used = dict.fromkeys([*(t["template"] or "" for t in tasks if t["kind"] != "control"),
                              *(tpl for _, tpl in class_rows)])
        templates = [t for t in configured if t in used] + [t for t in used if t not in configured]
        order = {t: i for i, t in enumerate(templates)}
        names: dict[int, str] = {}
        for r in [*tasks, *classes]:
            if r["class_name"] and r["class_index"] is not None:
                names.setdefault(r["class_index"], r["class_name"])

        grouped: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        controls: dict[int, dict] = {}  # the segmenter control of each class: one per class, whatever the template
        for t in tasks:
            if t["kind"] == "control" and t["class_index"] is not None:
                controls[t["class_index"]] = _task_view(t, None)
            elif t["class_index"] is not None:
                grouped[t["class_index"]][t["template"] or ""].append(t)
        for c, tpl in class_rows:
            grouped[c].setdefault(tpl, [])

        def rank(t: dict) -> tuple:
            return t["rank"] is None, t["rank"] or 0, t["feature_index"] or 0

        self.classes, self.summary = [], []
        for c in sorted(grouped):
            name = names.get(c) or f"class {c}"
            groups = []
            # issue 19; a run from before the control has no such columns: no flag
            control = next((r for (k, _), r in class_rows.items() if k == c and r.get("reliable") is not None), None)
            unreliable = bool(control and control["reliable"] is False)
            control_r = _float(control["control_object_fraction"]) if control else None
            # several detection prompts: which won on the control images, and by how much
            chosen = next((r for (k, _), r in class_rows.items() if k == c and r.get("detection_candidates")), None)
            candidates = ([{"prompt": p, "r": _float(v), "chosen": p == chosen["detection_prompt"]} for p, v in
                           zip(chosen["detection_candidates"], chosen["candidate_control_object_fractions"]
                               or [None] * len(chosen["detection_candidates"]), strict=True)]
                          if chosen else [])
            for j, tpl in enumerate(sorted(grouped[c], key=lambda t: order.get(t, len(order)))):
                row = class_rows.get((c, tpl))
                r = _float(row["class_object_fraction"]) if row else None
                call = class_call({"class_object_fraction": r, "delta": delta, "explained": row.get("explained")}
                                  ) if row else None
                biased, unexplained = call == "biased", call == "not explained"
                prob = _float(row["class_prob"]) if row else None
                seen = _concepts(row["class_top_concepts"], row["class_top_concept_fractions"]) if row else []
                ts = [_task_view(t, verdict_of.get((c, t["feature_index"], tpl)) if t["kind"] == "feature" else None,
                                 seen if t["kind"] == "class" else None)
                      for t in grouped[c][tpl]]
                groups.append({
                    "template": tpl, "anchor": f"class-{c}-t{j}", "r": r, "biased": biased,
                    "unexplained": unexplained, "class_prob": prob,
                    "n_spurious": row["n_spurious"] if row else None,
                    "n_unexplained": row["n_not_explained"] if row else None,
                    "n_unsure": row["n_low_confidence"] if row else None,
                    "n_features": row["n_features"] if row else None,
                    "class_tasks": [t for t in ts if t["kind"] == "class"],
                    "features": sorted((t for t in ts if t["kind"] == "feature"), key=rank),
                    "neurons": sorted((t for t in ts if t["kind"] == "neuron"), key=rank),
                })
                self.summary.append({
                    "class_index": c, "name": name, "template": tpl, "page": f"class-{c}.html",
                    "fragment": "" if j == 0 else f"#class-{c}-t{j}", "row_id": f"row-{c}" if j == 0 else None,
                    "r": r, "biased": biased, "unexplained": unexplained, "class_prob": prob,
                    "n_spurious": row["n_spurious"] if row else None,
                    "n_unexplained": row["n_not_explained"] if row else None,
                    "n_features": row["n_features"] if row else None,
                    "n_unsure": row["n_low_confidence"] if row else None,
                    "n_failed": sum(t["status"] != "ok" for t in ts), "unreliable": unreliable,
                    "control_r": control_r,
                })
            self.classes.append({"class_index": c, "name": name, "anchor": f"class-{c}", "groups": groups,
                                 "control": controls.get(c), "control_r": control_r, "unreliable": unreliable,
                                 "candidates": candidates})

        # Neuron tasks (Eq. 4) belong to no class: their own pages, summarised on the index.
        self.neurons = sorted((_task_view(t, None) for t in tasks if t["class_index"] is None),
                              key=lambda t: (t["layer"] or "", t["feature_index"] or 0, t["template"]))
        for i, t in enumerate(self.neurons):
            t["anchor"] = f"neuron-{i}"
            t["page"] = _neuron_page(i // NEURONS_PER_PAGE)
        n_failed = sum((t["status"] or "error") != "ok" for t in tasks)
        gen, clf = _dict(config.get("generator")), _dict(config.get("classifier"))
        self.run = {
            "run_id": sink.run_id, "generator": gen.get("model"), "classifier": clf.get("spec"), "delta": delta,
            "n_ok": len(tasks) - n_failed, "n_failed": n_failed, "n_samples": len(samples),
            "finished": _when(manifest.get("finished")), "several_templates": len(templates) > 1,
            "low_confidence": LOW_CONFIDENCE, "resamples": RESAMPLES,
        }


def _neuron_page(k: int) -> str:
    return "neurons.html" if k == 0 else f"neurons-{k + 1}.html"


def _with_images(t: dict, model: _Model, links: _Links, pictures: _Thumbnails, name: str) -> dict:
    rows = sorted(model.by_task.get(t["task_id"], []),
                  key=lambda i: (model.samples[i]["seed"] is None, model.samples[i]["seed"] or 0))
    images = []
    for i, small in zip(rows, pictures.encode(rows), strict=True):
        s = model.samples[i]
        r = _float(s["object_fraction"])
        src, w, h = small if small else (None, s["width"] or 1, s["height"] or 1)
        images.append({
            "src": src, "href": links.href(s["image_uri"]), "r": r, "seed": s["seed"], "prob": _float(s["class_prob"]),
            "width": THUMB_WIDTH, "height": max(1, round(THUMB_WIDTH * (h or 1) / (w or 1))),
            "alt": f"{name} image, seed {s['seed']}",
        })
    return {**t, "images": images}


# Control characters survive HTML escaping: text-direction controls reorder what a reader sees (a class name
# holding U+202E shows its tail reversed) and a raw ESC is a terminal escape for whoever cats the page. Every
# value rendered is passed through visible (the CLI's too), which shows each as "[U+202E]".
_ENV = Environment(loader=DictLoader(PAGES), autoescape=True, undefined=StrictUndefined, finalize=visible)


def render(page: str, **context) -> str:
    """One page (``index``, ``class``, ``neurons`` or ``compare``) with its style, script and policy."""
    script = page in ("index", "compare")  # the pages with sortable tables
    return _ENV.get_template(page).render(policy=csp(script), style=Markup(STYLE),
                                          script=Markup(SCRIPT) if script else None, **context)


def pages_folder(out: Path) -> Path:
    """Where the pages of the report whose index is ``out`` go: ``report.html`` → ``report_files``."""
    stem = out.stem if out.suffix.lower() in (".html", ".htm") else out.name
    return out.with_name(f"{stem}_files")


def _check_out(out: Path, pages: Path) -> None:
    """``out`` must be a regular file (or a symlink to one) or a new name, and its pages folder a report's
    folder or a new name, neither inside a run: a device, a FIFO or a folder is never replaced, and HTML files
    among a run's tables would break its readers (redecide, a resume)."""
    if out.exists() or out.is_symlink():
        if out.is_dir():
            raise DxrayError(f"report path {out} is {what_is(out)}; give a file name such as {out / 'report.html'}")
        if not out.is_file():
            raise DxrayError(f"report path {out} is {what_is(out)}, not a regular file: -o must be a regular file "
                             f"or a new name")
    if pages.exists() or pages.is_symlink():
        if not pages.is_dir() or pages.is_symlink():
            raise DxrayError(f"the report's pages go in {pages}, which is {what_is(pages)}; move it away or choose "
                             f"another -o")
        if not (pages / MARKER).is_file() and any(pages.iterdir()):
            raise DxrayError(f"the report's pages go in {pages}, a folder that holds something other than a dxray "
                             f"report; move it away or choose another -o")
    here = out.parent.resolve()
    run = next((d for d in (here, *here.parents) if _is_run(d)), None)
    if run is not None:
        raise DxrayError(f"report path {out} is inside the run folder {run}: a report among a run's tables breaks "
                         f"its readers; write it beside the run, e.g. -o {run.parent / 'report.html'}")


def _is_run(folder: Path) -> bool:
    """A dxray run's folder: it holds a tasks/ table or a run's manifest.json."""
    try:
        if (folder / "tasks").is_dir():
            return True
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return False
        data = json.loads(manifest.read_bytes()[:1_000_000] or b"null")
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "run_id" in data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _sweep(pages: Path) -> None:
    """Leftovers of earlier builds of this report that crashed (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(pages.name)}\.(\d+)\.(tmp|old)$")
    try:
        entries = list(pages.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


def build_report(run: str, out: str | Path, *, storage=None, image_format: str | None = None,
                 warn: Callable[[str], None] | None = None) -> Path:
    """Write the HTML report of the run folder ``run`` (local or ``s3://``): the index at ``out`` and the
    class and neuron pages in :func:`pages_folder` ``(out)``. ``image_format``: ``webp`` or ``jpeg``
    thumbnails (default :func:`dxray.report.thumbs.default_format`). ``warn`` gets one line when the run has
    not finished (the report shows what is there). Returns ``out``.

    Raises a one-line :class:`DxrayError` when ``run`` is not a run folder or ``out`` cannot take a report."""
    from dxray.runs import open_run

    run = str(run)
    fmt = image_format or thumbs.default_format()
    if fmt not in thumbs.FORMATS:
        raise DxrayError(f"image format {fmt!r} is not one of {', '.join(thumbs.FORMATS)}")
    if "://" not in run and not Path(run).is_dir():
        raise DxrayError(f"no run found at {run} ({what_is(run)} there, not a run folder)")
    sink = open_run(run, storage=storage)
    out = Path(out)
    pages = pages_folder(out)
    _check_out(out, pages)
    model = _Model(sink, run)
    if warn is not None and (line := unfinished(model)):
        warn(line)

    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep(pages)
    tmp = pages.with_name(f".{pages.name}.{os.getpid()}.tmp")
    old = pages.with_name(f".{pages.name}.{os.getpid()}.old")
    index_tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    for leftover in (tmp, old):  # this process's own, from a crash under the same pid
        shutil.rmtree(leftover, ignore_errors=True)
    swapped = False
    pictures = _Thumbnails(model.thumbnails, fmt)
    try:
        tmp.mkdir()
        _write_pages(model, tmp, out, _Links(sink, out, pages), pictures)
        (tmp / MARKER).write_text(f"dxray report of {sink.run_id}; this folder is replaced by the next report\n")
        index = render("index", run=model.run, summary=[
            {**row, "href": f"{quote(pages.name)}/{row['page']}{row['fragment']}"} for row in model.summary],
            neurons=[{**t, "href": f"{quote(pages.name)}/{t['page']}#{t['anchor']}"} for t in model.neurons])
        index_tmp.write_text(index, encoding="utf-8")
        # The swap: old pages away, new pages in, then the index (which links to them) last.
        if pages.exists():
            pages.rename(old)
        swapped = True
        tmp.rename(pages)
        swapped = False
        index_tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        index_tmp.unlink(missing_ok=True)
        if swapped and old.exists() and not pages.exists():
            old.rename(pages)  # the new pages never arrived: the old report stays whole
        raise
    finally:
        pictures.close()
        if pages.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out


def _write_pages(model: _Model, folder: Path, out: Path, links: _Links, pictures: _Thumbnails) -> None:
    index = f"../{quote(out.name)}"
    classes = model.classes
    for k, c in enumerate(classes):
        view = {**c, "groups": [{**g, **{key: [_with_images(t, model, links, pictures, t["kind"]) for t in g[key]]
                                         for key in ("class_tasks", "features", "neurons")}} for g in c["groups"]],
                "control": c["control"] and _with_images(c["control"], model, links, pictures, "control")}
        prev = f"class-{classes[k - 1]['class_index']}.html" if k > 0 else None
        nxt = f"class-{classes[k + 1]['class_index']}.html" if k + 1 < len(classes) else None
        nav = [("↑ all classes", f"{index}#row-{c['class_index']}"), ("← previous class", prev),
               ("next class →", nxt)]
        _write(folder, f"class-{c['class_index']}.html", render("class", run=model.run, c=view, links=nav))
    chunks = [model.neurons[i:i + NEURONS_PER_PAGE] for i in range(0, len(model.neurons), NEURONS_PER_PAGE)]
    for k, chunk in enumerate(chunks):
        view = [_with_images(t, model, links, pictures, f"neuron {t['layer']}:{t['feature_index']}") for t in chunk]
        nav = [("↑ summary", f"{index}#neurons"), ("← previous", _neuron_page(k - 1) if k > 0 else None),
               ("next →", _neuron_page(k + 1) if k + 1 < len(chunks) else None)]
        _write(folder, _neuron_page(k), render("neurons", run=model.run, neurons=view, links=nav, part=k + 1,
                                               parts=len(chunks)))
