"""Agreement of dxray's core/spurious verdicts with the Salient ImageNet human labels (paper Sec. 4.2, Fig. 6).

Pure functions over pyarrow tables; no model is loaded.

- **Human labels** come from Salient ImageNet's MTurk results, ``discover_spurious_features.csv``
  (https://github.com/singlasahil14/salient_imagenet, ``mturk_results/``; its licence forbids
  redistribution, so dxray never ships it). Each (class, feature) pair of a class's top 5 has five
  rows, one per annotator; a pair is **spurious** when at least 3 of its answers (``Answer.main``) are
  ``separate_object`` or ``background``, else **core**. Other answers count as not spurious and are
  counted in ``n_other_answers``.
- **Groups** (Fig. 6): animate / inanimate × unbiased (0 human-spurious pairs among the class's top 5) /
  medium (1-4) / biased (5). Animate: with Salient ImageNet's ``class_metadata.csv``, a class whose
  ``supercategory`` names animals (Dogs, Birds, Other mammals, "Reptiles, fish, amphibians",
  invertebrates), or an explicit ``animate`` column (true/false, 1/0); without metadata, ImageNet
  classes 0-397 (the WordNet animal subtree) are animate and 398-999 inanimate.
- **salient90**: for every count k = 0..5 of human-spurious pairs among the top 5, the classes with all
  five ranks annotated and exactly k spurious ones are ordered by ``sha256("salient90:{seed}:{class}")``
  (seed 0) and the first 15 are taken: 90 classes. A count with fewer than 15 candidates gives all of
  them and is reported as a shortfall.
- **δ sweep**: the verdicts are re-decided from the stored per-image r with :func:`dxray.verdict.decide`.
- **ROC AUC** (threshold-free, issue 19): mean r as a score for "core", against the human labels: the
  probability that a human-core pair has a higher mean r than a human-spurious one, ties counted half
  (Mann-Whitney U from average ranks, :func:`roc_auc`). 1.0: some δ separates them perfectly; 0.5: r
  tells them apart no better than chance; 0.0: perfectly inverted. It does not depend on δ, so every
  row of a group (stored and swept) carries the same ``roc_auc``; it is null where the group holds only
  one kind of human label or no mean r (a bare verdicts file without ``mean_object_fraction``).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dxray.errors import DxrayError, what_is
from dxray.storage.fs import filesystem
from dxray.storage.schemas import VERDICTS, to_table
from dxray.storage.sink import RunSink
from dxray.verdict import NOT_EXPLAINED, check_delta, decide

COLUMNS = {"class_index": "Input.class_index", "feature_index": "Input.feature_index",
           "feature_rank": "Input.feature_rank", "answer": "Answer.main"}
SPURIOUS_ANSWERS = ("separate_object", "background")
KNOWN_ANSWERS = ("main_object", *SPURIOUS_ANSWERS)
SPURIOUS_VOTES = 3  # of the five annotators of a pair
TOP = 5  # Salient ImageNet annotated each class's top 5 features
LAST_ANIMATE_CLASS = 397  # ImageNet-1k: classes 0..397 are animals
ANIMAL_WORDS = {"dog", "dogs", "cat", "cats", "bird", "birds", "mammal", "mammals", "reptile", "reptiles", "fish",
                "amphibian", "amphibians", "invertebrate", "invertebrates", "inverterbrates", "insect", "insects",
                "animal", "animals"}
SUBSETS = ("salient90",)
SALIENT90_PER_COUNT = 15
SALIENT90_SEED = 0
BIASES = ("unbiased", "medium", "biased")
ANIMACIES = ("animate", "inanimate")
GROUPS = [("all", "all"), *((a, "all") for a in ANIMACIES), *(("all", b) for b in BIASES),
          *((a, b) for a in ANIMACIES for b in BIASES)]
DEFAULT_DELTAS = tuple(round(0.1 * i, 1) for i in range(11))


def _read_csv(path: str, what: str) -> pa.Table:
    import pyarrow.csv as pcsv

    try:
        fs, inner = filesystem(path)
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.NotFound:
            raise DxrayError(f"{what} file not found: {path}")
        if kind != pafs.FileType.File:  # a folder, a device, a FIFO: say which
            shown = what_is(inner) if fs.type_name == "local" else "a folder"
            raise DxrayError(f"{what} {path} is {shown}, not a file")
        with fs.open_input_stream(inner) as f:
            return pcsv.read_csv(f)
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise DxrayError(f"cannot read {what} {path}: {' '.join(str(err).split())[:200]}") from None


def _int_column(table: pa.Table, column: str, path: str, what: str) -> pa.Array:
    col = table[column]
    if col.null_count:
        row = pc.index(pc.is_null(col), True).as_py() + 1
        raise DxrayError(f"{what} {path}: column {column} is empty in row {row}")
    try:
        return pc.cast(col, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DxrayError(f"{what} {path}: column {column} must hold integers, got {col.type}") from None


def read_annotations(path: str) -> pa.Table:
    """Human label per (class, feature): class_index, feature_index, feature_rank, n_answers,
    n_spurious_answers, n_other_answers, human ('core' or 'spurious'), sorted by class and rank."""
    return annotation_labels(path)[0]


def annotation_labels(path: str) -> tuple[pa.Table, int]:
    """:func:`read_annotations` and how many rows it left out: a negative class or feature index, or a
    feature rank outside 1..5 (no such annotation exists; the caller says how many)."""
    raw = _read_csv(path, "annotations")
    missing = [c for c in COLUMNS.values() if c not in raw.column_names]
    if missing:
        raise DxrayError(f"annotations {path} lacks column {missing[0]} "
                         f"(Salient ImageNet MTurk format: {', '.join(COLUMNS.values())})")
    if not raw.num_rows:
        raise DxrayError(f"annotations {path} has no rows")
    answer = pc.cast(raw[COLUMNS["answer"]], pa.string())
    table = pa.table({
        **{k: _int_column(raw, COLUMNS[k], path, "annotations") for k in ("class_index", "feature_index", "feature_rank")},
        "spurious": pc.cast(pc.fill_null(pc.is_in(answer, pa.array(SPURIOUS_ANSWERS)), False), pa.int64()),
        "other": pc.cast(pc.invert(pc.fill_null(pc.is_in(answer, pa.array(KNOWN_ANSWERS)), False)), pa.int64()),
    })
    valid = pc.and_(pc.and_(pc.greater_equal(table["class_index"], 0), pc.greater_equal(table["feature_index"], 0)),
                    pc.and_(pc.greater_equal(table["feature_rank"], 1), pc.less_equal(table["feature_rank"], TOP)))
    dropped = table.num_rows - pc.sum(pc.cast(valid, pa.int64())).as_py()
    table = table.filter(valid)
    pairs = table.group_by(["class_index", "feature_index"], use_threads=False).aggregate([
        ("feature_rank", "min"), ("feature_rank", "max"), ("spurious", "count"), ("spurious", "sum"), ("other", "sum")])
    rows = []
    for p in pairs.to_pylist():
        if p["feature_rank_min"] != p["feature_rank_max"]:
            raise DxrayError(f"annotations {path}: class {p['class_index']} feature {p['feature_index']} has "
                             f"two feature ranks ({p['feature_rank_min']} and {p['feature_rank_max']})")
        rows.append({"class_index": p["class_index"], "feature_index": p["feature_index"],
                     "feature_rank": p["feature_rank_min"], "n_answers": p["spurious_count"],
                     "n_spurious_answers": p["spurious_sum"], "n_other_answers": p["other_sum"],
                     "human": "spurious" if p["spurious_sum"] >= SPURIOUS_VOTES else "core"})
    rows.sort(key=lambda r: (r["class_index"], r["feature_rank"], r["feature_index"]))
    if not rows:
        raise DxrayError(f"annotations {path}: none of its {raw.num_rows} rows has class and feature indices >= 0 "
                         f"and a feature rank in 1..{TOP}")
    return pa.Table.from_pylist(rows), dropped


def dropped_line(n: int) -> str:
    """The warning for ``n`` annotation rows :func:`annotation_labels` left out."""
    return f"warning: {n} annotation row(s) left out: a negative class or feature index, or a feature rank outside 1..{TOP}"


def _truth(value, path: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "animate"):
        return True
    if text in ("0", "false", "no", "inanimate"):
        return False
    raise DxrayError(f"class metadata {path}: column animate must be true/false or 1/0, got {value!r}")


def read_class_metadata(path: str) -> dict[int, bool]:
    """Class index -> animate, from Salient ImageNet's ``class_metadata.csv`` (its ``supercategory``) or
    any CSV with ``class_index`` and ``animate`` (true/false, 1/0)."""
    raw = _read_csv(path, "class metadata")
    if "class_index" not in raw.column_names:
        raise DxrayError(f"class metadata {path} lacks column class_index")
    source = next((c for c in ("animate", "supercategory") if c in raw.column_names), None)
    if source is None:
        raise DxrayError(f"class metadata {path} lacks column animate (or Salient ImageNet's supercategory)")
    classes = _int_column(raw, "class_index", path, "class metadata").to_pylist()
    values = raw[source].to_pylist()
    if source == "animate":
        return {c: _truth(v, path) for c, v in zip(classes, values, strict=True)}
    return {c: bool(ANIMAL_WORDS & set(re.findall(r"[a-z]+", str(v or "").lower())))
            for c, v in zip(classes, values, strict=True)}


def class_groups(labels: pa.Table, animate: dict[int, bool] | None = None, path: str = "") -> dict[int, dict]:
    """Per annotated class: n_ranked (annotated ranks 1..5), n_spurious (human-spurious among them),
    bias (unbiased 0 / medium 1-4 / biased 5) and animacy."""
    out: dict[int, dict] = {}
    for r in labels.to_pylist():
        g = out.setdefault(r["class_index"], {"n_ranked": 0, "n_spurious": 0})
        if 1 <= r["feature_rank"] <= TOP:
            g["n_ranked"] += 1
            g["n_spurious"] += r["human"] == "spurious"
    for c, g in out.items():
        g["bias"] = "unbiased" if g["n_spurious"] == 0 else "biased" if g["n_spurious"] == TOP else "medium"
        if animate is None:
            alive = c <= LAST_ANIMATE_CLASS
        elif c in animate:
            alive = animate[c]
        else:
            raise DxrayError(f"class metadata {path} has no row for class {c}")
        g["animacy"] = "animate" if alive else "inanimate"
    return out


def _order(seed: int, c: int) -> str:
    return hashlib.sha256(f"salient90:{seed}:{c}".encode()).hexdigest()


def salient90(groups: dict[int, dict], per_count: int = SALIENT90_PER_COUNT,
              seed: int = SALIENT90_SEED) -> tuple[list[int], dict[int, int]]:
    """(the subset's classes sorted, {k: candidates} for every count k with fewer than ``per_count``)."""
    chosen, short = [], {}
    for k in range(TOP + 1):
        candidates = sorted((c for c, g in groups.items() if g["n_ranked"] == TOP and g["n_spurious"] == k),
                            key=lambda c: _order(seed, c))
        chosen += candidates[:per_count]
        if len(candidates) < per_count:
            short[k] = len(candidates)
    return sorted(chosen), short


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """ROC AUC of ``scores`` for the ``positive`` items: P(score of a positive > score of a negative), ties
    counted half, from average ranks (Mann-Whitney U / (n_pos x n_neg)). None when either side is empty
    (the AUC is undefined) or a score is missing or not finite."""
    s = np.asarray([np.nan if x is None else x for x in scores], dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.shape != pos.shape:
        raise ValueError(f"{len(s)} scores for {len(pos)} labels")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return None
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # where each run of equal scores starts
    ends = np.r_[first[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((first + ends + 1) / 2, ends - first)  # 1-based ranks, a tie gets their mean
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def agreement_rows(verdicts: pa.Table, labels: pa.Table, groups: dict[int, dict], *, stored: bool,
                   subset: str = "all", classes: Iterable[int] | None = None, annotations: str = "",
                   exclude_unreliable: bool = False) -> list[dict]:
    """``agreement`` rows per (template, delta) × group for the verdict pairs that have a human label.
    ``exclude_unreliable``: leave out the pairs of classes whose segmenter control failed (``reliable`` false);
    either way ``n_unreliable`` counts them."""
    human = {(r["class_index"], r["feature_index"]): r["human"] for r in labels.to_pylist()}
    keep = None if classes is None else set(classes)
    pairs: dict[tuple, list[dict]] = {}
    unreliable: dict[tuple, list[dict]] = {}
    run_id = None
    columns = ["run_id", "class_index", "feature_index", "template", "delta", "verdict", "mean_object_fraction",
               "reliable"]
    for v in verdicts.select([c for c in columns if c in verdicts.column_names]).to_pylist():
        if v["verdict"] == NOT_EXPLAINED:  # not called spurious: beside a human it counts as core
            v["verdict"] = "core"
        key = (v["class_index"], v["feature_index"])
        run_id = run_id or v["run_id"]
        if key in human and (keep is None or v["class_index"] in keep):
            g = groups[v["class_index"]]
            delta = None if v["delta"] is None else round(float(v["delta"]), 6)
            pair = {**v, "human": human[key], "animacy": g["animacy"], "bias": g["bias"]}
            mine = pairs.setdefault((v["template"], delta), [])
            if exclude_unreliable and v.get("reliable") is False:
                unreliable.setdefault((v["template"], delta), []).append(pair)
            else:
                mine.append(pair)
    rows = []
    for (template, delta), mine in sorted(pairs.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or 0.0)):
        for animacy, bias in GROUPS:
            sel = [p for p in mine if animacy in ("all", p["animacy"]) and bias in ("all", p["bias"])]
            out = [p for p in unreliable.get((template, delta), []) if animacy in ("all", p["animacy"])
                   and bias in ("all", p["bias"])]
            agree = sum(p["verdict"] == p["human"] for p in sel)
            rows.append({
                "run_id": run_id, "annotations": annotations, "subset": subset, "template": template, "delta": delta,
                "stored": stored, "animacy": animacy, "bias": bias, "n_classes": len({p["class_index"] for p in sel}),
                "n_pairs": len(sel), "n_agree": agree, "agreement": agree / len(sel) if sel else None,
                "n_human_spurious": sum(p["human"] == "spurious" for p in sel),
                "n_dxray_spurious": sum(p["verdict"] == "spurious" for p in sel),
                "n_both_spurious": sum(p["human"] == p["verdict"] == "spurious" for p in sel),
                "roc_auc": roc_auc([p.get("mean_object_fraction") for p in sel], [p["human"] == "core" for p in sel]),
                "exclude_unreliable": exclude_unreliable,
                "n_unreliable": len(out) if exclude_unreliable else sum(p.get("reliable") is False for p in sel),
            })
    return rows


def sweep_rows(tasks: pa.Table, samples: pa.Table, deltas: Sequence[float], labels: pa.Table,
               groups: dict[int, dict], run_id: str, **kw) -> list[dict]:
    """Agreement of the verdicts re-decided (:func:`dxray.verdict.decide`) at every δ."""
    rows = []
    for delta in deltas:
        verdicts, _ = decide(tasks, samples, check_delta(delta), run_id, uncertainty=False)  # only verdicts are read
        rows += agreement_rows(to_table("verdicts", verdicts), labels, groups, stored=False, **kw)
    return rows


def parse_deltas(text: str) -> list[float]:
    try:
        deltas = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise DxrayError(f"--deltas must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not deltas or any(not 0 <= d <= 1 for d in deltas):
        raise DxrayError(f"--deltas must be comma-separated numbers in [0, 1], got {text!r}")
    return deltas


@dataclass
class Source:
    """What ``dxray agreement`` compares: verdicts (with tasks + samples for a run) and where to write."""

    verdicts: pa.Table
    sink: RunSink
    tasks: pa.Table | None = None
    samples: pa.Table | None = None


def _bare_verdicts(path: str, fs: pafs.FileSystem, inner: str, kind: pafs.FileType) -> pa.Table:
    from dxray.features import read_tabular

    table = read_tabular(fs, inner, kind, path, "verdicts",
                         f"verdicts must be a run folder, a Parquet file/folder or a .csv, got {path}")
    for column in ("class_index", "feature_index", "verdict"):
        if column not in table.column_names:
            raise DxrayError(f"verdicts {path} lacks column {column}")
    rows = table.to_pylist()
    bad = [r["verdict"] for r in rows if r["verdict"] not in ("core", "spurious", NOT_EXPLAINED)]
    if bad:
        raise DxrayError(f"verdicts {path}: column verdict must be core, spurious or {NOT_EXPLAINED}, got {bad[0]!r}")
    known = set(VERDICTS.names)
    return to_table("verdicts", [{"template": "{}", "run_id": posixpath.basename(posixpath.dirname(inner)) or "verdicts",
                                  **{k: v for k, v in r.items() if k in known}} for r in rows])


def open_source(path: str) -> Source:
    """A run folder ({output}/{run_id} with tasks/, samples/, verdicts/), or a bare verdicts file or
    folder (Parquet or CSV); outputs go into the run, or beside the bare file."""
    try:
        fs, inner = filesystem(path)
        kind = fs.get_file_info(inner).type
        is_run = kind == pafs.FileType.Directory and fs.get_file_info(f"{inner}/tasks").type == pafs.FileType.Directory
    except OSError as err:
        raise DxrayError(f"cannot open {path}: {' '.join(str(err).split())[:200]}") from None
    if kind == pafs.FileType.NotFound:
        raise DxrayError(f"no run folder or verdicts file at {path}")
    if is_run:
        folder, _, name = inner.rstrip("/").rpartition("/")
        sink = RunSink(folder, name, filesystem=fs)
        verdicts = sink.read_table("verdicts")
        if verdicts is None:
            raise DxrayError(f"run {path} has no verdicts table (was segment.enabled false?)")
        return Source(verdicts, sink, sink.read_table("tasks"), sink.read_table("samples"))
    inner = inner.rstrip("/")
    if kind == pafs.FileType.Directory and fs.get_file_info(f"{inner}/verdicts").type == pafs.FileType.Directory:
        inner = f"{inner}/verdicts"  # a folder holding a verdicts table (but no run)
    verdicts = _bare_verdicts(path, fs, inner, kind)
    beside = posixpath.dirname(inner)
    folder, _, name = beside.rpartition("/")
    return Source(verdicts, RunSink(folder, name, filesystem=fs))


@dataclass
class AgreementResult:
    rows: list[dict]
    table: str  # the agreement dataset folder
    chart: str  # the PNG
    subset: str
    classes: list[int]  # classes with compared pairs
    missing: list[int] = field(default_factory=list)  # subset classes without verdicts
    unlabelled: int = 0  # verdict pairs with no human label
    shortfall: dict[int, int] = field(default_factory=dict)  # salient90 counts with too few classes
    other_answers: int = 0  # annotator answers other than main_object/separate_object/background
    dropped: int = 0  # annotation rows left out: a negative index or a rank outside 1..5


def chart_template(rows: list[dict]) -> str | None:
    templates = sorted({r["template"] for r in rows if r["stored"]}, key=lambda t: (t != "{}", t or ""))
    return templates[0] if templates else None


def run_agreement(path: str, annotations: str, class_metadata: str | None = None, subset: str | None = None,
                  deltas: Sequence[float] | None = None, exclude_unreliable: bool = False) -> AgreementResult:
    """Compare, write the ``agreement`` table (part ``{subset}``) and ``agreement[-{subset}].png``."""
    if subset is not None and subset not in SUBSETS:
        raise DxrayError(f"--subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    for d in deltas or ():
        check_delta(d)
    labels, dropped = annotation_labels(annotations)
    groups = class_groups(labels, read_class_metadata(class_metadata) if class_metadata else None, class_metadata or "")
    source = open_source(path)
    if deltas and source.samples is None:
        raise DxrayError(f"--deltas needs a run folder (tasks and samples tables); {path} holds verdicts only")
    chosen, short = salient90(groups) if subset else (None, {})
    kw = {"subset": subset or "all", "classes": chosen, "annotations": posixpath.basename(annotations),
          "exclude_unreliable": exclude_unreliable}
    rows = agreement_rows(source.verdicts, labels, groups, stored=True, **kw)
    if not rows:
        raise DxrayError(f"no verdict of {path} has a human label in {annotations}"
                         f"{' among the salient90 classes' if subset else ''} (audit the annotated top-5: "
                         f"dxray rank-features --from-annotations)")
    if source.samples is not None and source.tasks is not None:
        run_id = source.verdicts["run_id"][0].as_py() if source.verdicts.num_rows else source.sink.run_id
        rows += sweep_rows(source.tasks, source.samples, DEFAULT_DELTAS if deltas is None else deltas,
                           labels, groups, run_id, **kw)
    human = {(r["class_index"], r["feature_index"]) for r in labels.to_pylist()}
    judged = {(c, f) for c, f in zip(source.verdicts["class_index"].to_pylist(),
                                     source.verdicts["feature_index"].to_pylist(), strict=True)}
    wanted = None if chosen is None else set(chosen)
    in_scope = {p for p in judged if wanted is None or p[0] in wanted}
    compared = sorted({c for c, f in in_scope if (c, f) in human})
    name = f"agreement-{subset}" if subset else "agreement"
    sink = source.sink
    sink.write_table("agreement", rows, part=subset or "all")
    chart = sink.write_bytes(f"{name}.png", render_chart(rows, title=f"{name}: {path.rstrip('/').rsplit('/', 1)[-1]}"))
    return AgreementResult(rows, sink.uri("agreement"), chart, subset or "all", compared,
                           sorted(set(chosen or ()) - {c for c, _ in judged}), len(in_scope - human), short,
                           sum(labels["n_other_answers"].to_pylist()), dropped)


_COLOURS = {"all": (120, 120, 120), "animate": (214, 96, 77), "inanimate": (67, 147, 195)}


def render_chart(rows: list[dict], title: str = "agreement") -> bytes:
    """A PNG bar chart like the paper's Fig. 6: agreement of the stored verdicts per bias group
    (all / unbiased / medium / biased), one bar each for all, animate and inanimate classes, n on top."""
    from PIL import Image, ImageDraw, ImageFont

    template = chart_template(rows)
    mine = [r for r in rows if r["stored"] and r["template"] == template]
    delta = min((r["delta"] for r in mine), key=lambda d: -1.0 if d is None else d, default=None)
    cell = {(r["animacy"], r["bias"]): r for r in mine if r["delta"] == delta}
    w, h, left, bottom, top = 760, 420, 60, 60, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=11)
    sub = f"stored verdicts, delta = {'-' if delta is None else f'{delta:g}'}, template {template!r}"
    draw.text((left, 10), title, fill="black", font=font)
    draw.text((left, 30), sub, fill=(80, 80, 80), font=small)
    plot_h, plot_w = h - top - bottom, w - left - 20
    for i in range(0, 101, 25):  # y axis: agreement in %
        y = top + plot_h - plot_h * i / 100
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{i}%", fill="black", font=small, anchor="rm")
    clusters = ["all", *BIASES]
    slot = plot_w / len(clusters)
    bar = slot / 4.5
    for j, bias in enumerate(clusters):
        x0 = left + j * slot + (slot - 3 * bar) / 2
        for k, animacy in enumerate(_COLOURS):
            r = cell.get((animacy, bias))
            value = r["agreement"] if r and r["agreement"] is not None else None
            x = x0 + k * bar
            if value is not None:
                y = top + plot_h * (1 - value)
                draw.rectangle([x + 2, y, x + bar - 2, top + plot_h], fill=_COLOURS[animacy])
            label = f"n={r['n_pairs'] if r else 0}"
            draw.text((x + bar / 2, (top + plot_h * (1 - (value or 0))) - 3), label, fill="black", font=small, anchor="mb")
        draw.text((left + j * slot + slot / 2, top + plot_h + 8), bias, fill="black", font=font, anchor="ma")
    for k, (animacy, colour) in enumerate(_COLOURS.items()):
        x = left + k * 130
        draw.rectangle([x, h - 22, x + 12, h - 10], fill=colour)
        draw.text((x + 18, h - 16), animacy, fill="black", font=small, anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rank_from_annotations(path: str, classes: Sequence[int], k: int) -> list:
    """The annotated top-k of each class as :class:`dxray.features.RankedFeature` (feature_rank is the
    rank; no importance). A class without annotations is an error."""
    from dxray.features import RankedFeature

    labels = read_annotations(path)
    by_class: dict[int, list[dict]] = {}
    for r in labels.to_pylist():
        by_class.setdefault(r["class_index"], []).append(r)
    absent = [c for c in classes if c not in by_class]
    if absent:
        raise DxrayError(f"annotations {path} have no rows for class {absent[0]} (targets.classes)")
    source = f"annotations:{posixpath.basename(path)}"
    return [RankedFeature(c, r["feature_index"], r["feature_rank"], float("nan"), source)
            for c in classes for r in by_class[c] if r["feature_rank"] <= k]


def write_annotation_ranking(cfg, path: str) -> tuple[str, int]:
    """``dxray rank-features --from-annotations``: the annotated top-k of ``targets.classes`` written as
    the run's ``feature_ranking`` table (read back with ``targets.feature_source=table``). Returns
    (table folder, classes)."""
    from dxray.features import ranking_rows
    from dxray.runs import open_sink

    if not cfg.targets.top_k:
        raise DxrayError("targets.top_k is 0: nothing to rank")
    ranked = rank_from_annotations(path, cfg.targets.classes, cfg.targets.top_k)
    sink = open_sink(cfg)  # the run folder the audit of this config writes to
    sink.write_table("feature_ranking", ranking_rows(sink.run_id, ranked, None), part="all")
    return sink.uri("feature_ranking"), len(cfg.targets.classes)
