"""`dxray audit --dry-run`: what a run would do and roughly what it costs, without loading a model.

:func:`estimate` is a pure function of the config, the classifier's architecture metadata
(:func:`dxray.classifiers.describe`, built on the meta device) and the benchmark figures; :func:`dry_run`
adds the checks of :func:`dxray.pipeline.preflight.preflight` (which also probes the output storage) and the I/O.
With ``feature_source`` ``weights`` or ``images`` the ranking needs the weights or the images, so the dry
run counts ``top_k`` features per class instead: the count, not which features, sets the cost.

A job is often planned on another machine than the one it runs on: what is not found here (the classifier's
checkpoint, a local model folder, the feature image folder or table, a wnids file) does not stop the dry run.
It describes the model from its architecture, lists what is missing (``Plan.missing``, a "missing" row in the
table and one ``warning: missing: ...`` line on stderr) and exits 0; any other bad input exits 2 with the
same one-line message as a real run, and so does a model it cannot describe at all (an ``hf:`` folder that
is not here: its architecture is in that folder). A real run still stops at the first missing thing.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dxray import classifiers
from dxray.config import Config
from dxray.features import RankedFeature

KINDS = ("class", "feature", "neuron")


@dataclass
class Timing:
    """One figure of the estimate: seconds per unit, and where it came from (None: unknown)."""

    seconds: float | None
    source: str


@dataclass
class Plan:
    run_id: str
    classes: int
    templates: list[str]
    tasks: dict[str, int]  # by kind, all templates
    feature_count: str  # how the feature tasks were counted
    restarts: int
    steps: int
    samples_per_step: int
    optimisation_steps: int  # tasks x restarts x steps (an upper bound with early stopping)
    held_out_images: int
    baseline_images: int
    training_images: int
    segment_images: int
    step: Timing
    image: Timing  # per held-out / baseline image (sampling, plus scoring when segmentation is on)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "field path" of what a real run needs but is not here

    @property
    def total_tasks(self) -> int:
        return sum(self.tasks.values())

    @property
    def images_to_generate(self) -> int:
        return self.held_out_images + self.baseline_images + self.training_images

    @property
    def gpu_hours(self) -> float | None:
        if self.step.seconds is None or self.image.seconds is None:
            return None
        return (self.optimisation_steps * self.step.seconds
                + (self.held_out_images + self.baseline_images) * self.image.seconds) / 3600


# -- benchmark figures -------------------------------------------------------------------------------
def load_figures(folder: str | Path) -> list[dict]:
    """The benchmark results in ``folder`` (``sampler-*.json``, ``segment-*.json``; a checkout's
    ``benchmarks/results``), each with its ``file``; none when the folder is not there."""
    figures = []
    for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            figures.append({**doc, "file": f"{Path(folder).as_posix().rstrip('/')}/{path.name}"})
    return figures


def _machine(fig: dict) -> str:
    if fig.get("gpu") or fig.get("device"):
        return str(fig.get("gpu") or fig.get("device"))
    parts = [fig.get("cpu"), fig.get("threads") and f"{fig['threads']} threads", fig.get("torch") and f"torch {fig['torch']}"]
    return f"CPU ({', '.join(str(p) for p in parts if p)})"


def _generator_size(cfg: Config) -> str | None:
    """The benchmark size class of the generator: the tiny preset, an SD1.5-family model, or none."""
    model = cfg.generator.model
    if model == "tiny":
        return "tiny"
    if model == "toyworld":
        return None
    return "sd15"  # the LCM checkpoints and LCM-LoRA bases dxray targets are SD1.5-family


def _sampler_figure(cfg: Config, figures: list[dict]) -> tuple[dict | None, str]:
    """The sampler benchmark measured on this generator's size, resolution, steps and checkpointing."""
    g = cfg.generator
    size = _generator_size(cfg)
    same = [f for f in figures if f.get("file", "").split("/")[-1].startswith("sampler-") and f.get("size") == size]
    for f in same:
        if (f.get("resolution") == g.resolution and f.get("lcm_steps") == g.steps
                and bool(f.get("checkpointing")) == g.checkpointing and not g.tiny_vae):
            return f, ""
    if not same:
        return None, f"no sampler benchmark for generator {g.model!r}"
    f = same[0]
    return None, (f"nearest benchmark {f['file']} ({f.get('resolution')} px, {f.get('lcm_steps')} steps, "
                  f"checkpointing {'on' if f.get('checkpointing') else 'off'}) does not match {g.resolution} px, "
                  f"{g.steps} steps, checkpointing {'on' if g.checkpointing else 'off'}"
                  f"{', tiny VAE' if g.tiny_vae else ''}")


def _segment_seconds(cfg: Config, figures: list[dict]) -> tuple[float | None, str]:
    """Seconds to score one image with the configured detector (+ SAM), from a segment benchmark."""
    s = cfg.segment
    if s.detector == "toyworld":
        return 0.0, "toy-world segmenter (exact, negligible)"
    models = {f"{s.detector},{s.sam}"} | ({"tiny"} if s.detector == "tiny" and s.sam in ("tiny", None) else set())
    for f in figures:
        if f.get("file", "").split("/")[-1].startswith("segment-") and f.get("model") in models:
            rate = f.get("dino_sam_images_per_s") if s.sam else f.get("dino_only_images_per_s")
            if rate:
                return 1 / rate, f"{f['file']}: {rate} images/s on {_machine(f)}"
    return None, f"no segment benchmark for detector {s.detector!r} + SAM {s.sam!r}"


def analytic(cfg: Config) -> tuple[Timing, Timing] | None:
    """Seconds per optimisation step and per held-out image from the FLOPs of the configured generator (its size class
    at the configured resolution) and classifier, counted on the meta device, at ``estimate.mfu`` of
    ``estimate.gpu``'s dense bf16 peak; None for the toy world's generator or a classifier meta tensors cannot run."""
    from dxray import flops
    from dxray.models import is_preset

    size, c = _generator_size(cfg), cfg.classifier
    if size is None or is_preset(c.spec):
        return None
    forward, backward = classifiers.count_flops(c.spec, weights=c.weights, kwargs=c.kwargs, input_size=c.input_size)
    if backward is None:
        return None
    g, e = cfg.generator, cfg.estimate
    gen = flops.generator_flops(size, g.resolution, g.steps, g.grad_steps, bool(g.tiny_vae))
    rate = flops.PEAK_BF16_DENSE[e.gpu] * e.mfu
    per_step = (gen["image_step"] + backward) * cfg.optimize.samples_per_step
    per_image = gen["sample"] + forward
    assumed = f"at {e.mfu:.0%} MFU of an {e.gpu.upper()} ({flops.PEAK_BF16_DENSE[e.gpu] / 1e12:.0f} TFLOP/s bf16 dense)"
    where = f"{size} generator at {g.resolution} px, {c.spec}"
    step = Timing(per_step / rate, f"analytic: {per_step / 1e12:.3g} TFLOP per step ({where}; "
                                   f"{cfg.optimize.samples_per_step} samples, counted on the meta device) {assumed}"
                                   + ("; checkpointing's recompute not counted" if g.checkpointing else ""))
    seg = 1 / e.segment_images_per_s if cfg.segment.enabled and cfg.segment.detector != "toyworld" else 0.0
    image = Timing(per_image / rate + seg,
                   f"analytic: {per_image / 1e12:.3g} TFLOP per image {assumed}"
                   + (f"; scoring: Grounding DINO + SAM assumed at {e.segment_images_per_s:g} images/s "
                      f"(estimate.segment_images_per_s, unmeasured)" if seg else ""))
    return step, image


def timings(cfg: Config, figures: list[dict]) -> tuple[Timing, Timing, list[str]]:
    """Seconds per optimisation step and per held-out image: from ``estimate.*``, else a measured benchmark that fits,
    else :func:`analytic` (labelled so)."""
    e, notes = cfg.estimate, []
    fig, why = _sampler_figure(cfg, figures)
    if fig is None and (e.seconds_per_step is None or e.seconds_per_image is None):
        counted = analytic(cfg)
        if counted is not None:
            step, image = counted
            notes.append(f"no measured benchmark fits ({why}): an analytic estimate, not a measurement")
            return (Timing(e.seconds_per_step, "estimate.seconds_per_step") if e.seconds_per_step is not None else step,
                    Timing(e.seconds_per_image, "estimate.seconds_per_image") if e.seconds_per_image is not None
                    else image, notes)
    if why and (e.seconds_per_step is None or e.seconds_per_image is None):
        notes.append(why)
    s_per_step = cfg.optimize.samples_per_step
    if e.seconds_per_step is not None:
        step = Timing(e.seconds_per_step, "estimate.seconds_per_step")
    elif fig is not None:
        step = Timing(fig["opt_step_s"] * s_per_step,
                      f"{fig['file']}: {fig['opt_step_s']} s per step at batch 1, 1 noise sample (x {s_per_step} "
                      f"samples per step) on {_machine(fig)}")
    else:
        step = Timing(None, "unknown: set estimate.seconds_per_step")
    if e.seconds_per_image is not None:
        image = Timing(e.seconds_per_image, "estimate.seconds_per_image")
    elif fig is None:
        image = Timing(None, "unknown: set estimate.seconds_per_image")
    else:
        gen = fig["pipeline_sample_s"]
        source = f"{fig['file']}: {gen} s per sample without gradients on {_machine(fig)}"
        seg, seg_source = _segment_seconds(cfg, figures) if cfg.segment.enabled else (0.0, "segmentation off")
        if seg is None:
            image = Timing(None, f"unknown: set estimate.seconds_per_image ({seg_source})")
        else:
            image = Timing(gen + seg, f"{source}; scoring: {seg_source}")
    return step, image, notes


# -- counting ----------------------------------------------------------------------------------------
def _features_how(cfg: Config, ranking: list[RankedFeature] | None) -> str:
    """Where the plan's features come from, in words."""
    t = cfg.targets
    if not t.top_k:
        how = "none (top_k is 0)"
    elif ranking is not None:
        how = f"from {t.feature_table}"
    else:
        how = f"top_k={t.top_k} per class ({t.feature_source}; ranked when the run starts)"
    if t.features:
        how += f"; explicit features for {len(t.features)} class(es)"
    return how


def planned(cfg: Config, info: classifiers.ClassifierInfo, ranking: list[RankedFeature] | None = None) -> list:
    """What :func:`dxray.pipeline.tasks.plan` makes of the config, building no model: with ``ranking`` (a table) its
    features, else the first ``top_k`` features of each class stand in for the ones ranked when the run starts
    (the counts are the same; only which features differs)."""
    from dxray.pipeline.ranking import rank_features, to_rank
    from dxray.pipeline.tasks import plan

    t = cfg.targets
    if ranking is None:
        k = min(t.top_k, info.feature_dim) if info.feature_dim else t.top_k
        ranking = [RankedFeature(c, f, f + 1, float("nan"), "dry run") for c in to_rank(t) for f in range(k)]
    def ranked(todo: list[int]) -> list[RankedFeature]:
        wanted = set(todo)  # 1,000 classes x 5,000 rows: a list's `in` was 5 million comparisons
        return [r for r in ranking if r.class_index in wanted]

    return plan(cfg, info, rank_features(t, ranked))


def estimate(cfg: Config, info: classifiers.ClassifierInfo, figures: list[dict] | None = None,
             ranking: list[RankedFeature] | None = None) -> Plan:
    """The plan's counts and cost. Pure: ``figures`` from :func:`load_figures`, ``ranking`` only for a table."""
    t, o, s = cfg.targets, cfg.optimize, cfg.sample
    kinds = Counter(spec.kind for spec in planned(cfg, info, ranking))  # what the run would plan, counted
    tasks = {kind: kinds[kind] for kind in ("class", "feature", "neuron")}
    total = sum(tasks.values())  # optimised
    with_class = tasks["class"] + tasks["feature"]  # neuron tasks have no class: no baseline, nothing to score
    tasks["control"] = kinds["control"]  # rendered, not optimised
    step, image, notes = timings(cfg, figures or [])
    if o.early_stop_prob is not None:
        notes.append(f"optimize.early_stop_prob={o.early_stop_prob}: step counts are an upper bound")
    return Plan(
        run_id=cfg.resolved_run_id(), classes=len(t.classes), templates=list(cfg.prompt.templates), tasks=tasks,
        feature_count=_features_how(cfg, ranking), restarts=o.restarts, steps=o.steps, samples_per_step=o.samples_per_step,
        optimisation_steps=total * o.restarts * o.steps,
        held_out_images=(total + tasks["control"]) * s.k,
        baseline_images=with_class * s.k if s.baseline else 0,
        training_images=total * o.restarts * o.steps * o.samples_per_step,
        segment_images=(with_class + tasks["control"]) * s.k if cfg.segment.enabled else 0,
        step=step, image=image, notes=notes,
    )


# -- the dry run -------------------------------------------------------------------------------------
def _warn(message: str) -> None:
    from dxray.storage import redact_text

    sys.stderr.write(f"warning: {redact_text(message)}\n")
    sys.stderr.flush()


def dry_run(cfg: Config, figures: list[dict] | None = None, warn: Callable[[str], None] | None = None) -> Plan:
    """Every check of :func:`dxray.pipeline.preflight.preflight` (output storage included), then the plan; loads no
    model weights and starts no Ray. What a real run needs but is not on this machine is listed in
    ``Plan.missing`` and in one ``warn`` line (default: ``warning: ...`` on stderr) instead of stopping it."""
    from dxray.models import is_preset
    from dxray.pipeline.preflight import preflight

    target = None if is_preset(cfg.classifier.spec) else classifiers.imported_callable(cfg.classifier.spec)
    if target:  # said before preflight runs it: describing the model calls it
        (warn or _warn)(f"classifier.spec imports and calls {target} (a config is trusted like code)")
    missing: list[str] = []
    info = preflight(cfg, missing, build=False)  # a preset not built yet: described from its architecture
    from dxray.pipeline.ranking import table_ranking

    t = cfg.targets
    ranking = table_ranking(t, missing)
    plan = estimate(cfg, info, load_figures(cfg.estimate.figures) if figures is None else figures, ranking)
    plan.missing = missing
    if target:
        plan.notes.append(f"classifier.spec imports and calls {target} (a config is trusted like code)")
    if missing:
        (warn or _warn)(f"missing: {'; '.join(missing)} (not found here; the plan is the config's, and a real run "
                        f"stops at the first of them)")
    return plan


def _n(x: int) -> str:
    return f"{x:,}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f} GPU-h" if seconds >= 36 else f"{seconds:,.1f} GPU-s"


def render(plan: Plan):
    """The plan as a rich table."""
    from rich.table import Table
    from rich.text import Text

    from dxray.storage import redact_text

    table = Table("", "count", "how", title=Text(f"dxray audit --dry-run: {plan.run_id}"), title_justify="left")
    # Cells as plain Text: templates, paths and model names are the user's strings, not rich markup ('[/]'),
    # and may hold a credential (a URI's userinfo or query), masked as everywhere else.
    add_row = table.add_row
    table.add_row = lambda *cells, **kw: add_row(*(Text(redact_text(c)) if isinstance(c, str) else c
                                                   for c in cells), **kw)
    templates = ", ".join(repr(x) for x in plan.templates)
    table.add_row("classes", _n(plan.classes), "targets.classes")
    table.add_row("templates", _n(len(plan.templates)), templates)
    table.add_row("tasks: class", _n(plan.tasks["class"]), "one per class and template")
    table.add_row("tasks: feature", _n(plan.tasks["feature"]), plan.feature_count)
    table.add_row("tasks: neuron", _n(plan.tasks["neuron"]), "targets.neurons x templates")
    table.add_row("tasks: control", _n(plan.tasks.get("control", 0)), "one per class (segment.control), not optimised")
    table.add_row("tasks", _n(plan.total_tasks), "", end_section=True)
    table.add_row("optimisation steps", _n(plan.optimisation_steps),
                  f"tasks x {plan.restarts} restart(s) x {plan.steps} steps")
    table.add_row("images: held-out", _n(plan.held_out_images), "tasks (controls too) x sample.k")
    table.add_row("images: baseline", _n(plan.baseline_images), "class and feature tasks x sample.k (sample.baseline)")
    table.add_row("images: training", _n(plan.training_images),
                  f"tasks x restarts x steps x {plan.samples_per_step} samples per step")
    table.add_row("images to generate", _n(plan.images_to_generate), "")
    table.add_row("images to segment", _n(plan.segment_images), "held-out images of class and feature tasks",
                  end_section=True)
    step, image = plan.step, plan.image
    table.add_row("seconds per step", "-" if step.seconds is None else f"{step.seconds:.3g}", step.source)
    table.add_row("seconds per image", "-" if image.seconds is None else f"{image.seconds:.3g}", image.source)
    hours = plan.gpu_hours
    if hours is None:
        missing = " and ".join(n for n, t in (("estimate.seconds_per_step", step), ("estimate.seconds_per_image", image))
                               if t.seconds is None)
        table.add_row("estimate", "-", f"needs {missing} (no committed benchmark fits this config)")
    else:
        kind = ("analytic estimate (counted FLOPs at an assumed MFU; see the seconds rows)"
                if "analytic" in step.source + image.source else "estimate")
        table.add_row("estimate", _hours(hours * 3600),
                      f"{kind}: optimisation steps x seconds per step + (held-out + baseline images) x seconds per image")
    for note in plan.notes:
        table.add_row("note", "", note)
    for item in plan.missing:
        table.add_row("missing", "", f"{item} (not found here; a real run needs it)")
    return table
