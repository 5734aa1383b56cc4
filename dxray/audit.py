"""The in-process audit: validate → plan → (skip committed) → optimise + sample → write.

Everything that can be checked without loading a model is checked first
(:func:`preflight`); each task is written as its own Parquet part (samples
first, the task row last, so a task row means "committed"), and a failure in
one batch of tasks is recorded as error rows without losing the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dxray import classifiers, objectives
from dxray.config import Config
from dxray.errors import DxrayError
from dxray.explain import OptimizeResult, OptimizeSettings, Target, optimize, sample
from dxray.features import rank_by_weights
from dxray.generator import check_model_ref
from dxray.objectives import Objective
from dxray.storage import package_versions, redact
from dxray.storage.images import encode_png, thumbnail_png
from dxray.storage.sink import RunSink


@dataclass
class TaskSpec:
    task_id: str
    kind: str  # class | feature | neuron
    objective: Objective
    template: str
    init: str
    seed: int
    class_index: int | None = None
    class_name: str | None = None
    feature_index: int | None = None
    feature_rank: int | None = None
    layer: str | None = None


@dataclass
class RunSummary:
    run_id: str
    root: str
    planned: int
    skipped: int
    ok: int = 0
    failed: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)


def short_name(class_name: str) -> str:
    """First lemma of a WordNet-style name: 'tench, Tinca tinca' → 'tench'."""
    return class_name.split(",")[0].strip()


def classifier_kwargs(cfg: Config) -> dict:
    c = cfg.classifier
    return {"weights": c.weights, "kwargs": c.kwargs, "class_names": c.class_names}


def classifier_spec(cfg: Config) -> str:
    if cfg.classifier.spec == "tiny":
        from dxray.tiny import ensure_tiny_classifier

        return f"hf:{ensure_tiny_classifier(cfg.cache_dir)}"
    return cfg.classifier.spec


def preflight(cfg: Config) -> classifiers.ClassifierInfo:
    """Every check that needs no model weights; raises a one-line DxrayError."""
    check_model_ref(cfg.generator.model, "generator model")
    for ref, what in ((cfg.generator.lora, "LoRA"), (cfg.generator.tiny_vae, "tiny VAE")):
        if ref:
            check_model_ref(ref, what)
    info = classifiers.describe(classifier_spec(cfg), **classifier_kwargs(cfg))
    n = info.num_classes
    t = cfg.targets
    for where, indices in [("targets.classes", t.classes), ("targets.features", list(t.features))]:
        bad = [c for c in indices if not 0 <= c < n]
        if bad:
            raise DxrayError(f"{where}: class index {bad[0]} out of range; the classifier has classes 0..{n - 1}")
    missing = sorted(set(t.features) - set(t.classes))
    if missing:
        raise DxrayError(f"targets.features names class {missing[0]}, which is not in targets.classes")
    for nt in t.neurons:
        if nt.layer not in info.layer_names:
            names = ", ".join(info.layer_names[:30]) + (" ..." if len(info.layer_names) > 30 else "")
            raise DxrayError(f"targets.neurons: unknown layer {nt.layer!r}; available: {names}")
    if not (t.class_task or t.top_k or t.features or t.neurons):
        raise DxrayError("targets: nothing to do (class_task is false, top_k is 0, no features or neurons)")
    return info


def _task_id(cfg: Config, **what) -> str:
    g, c, o = cfg.generator, cfg.classifier, cfg.optimize
    defining = {
        **what,
        "n_tokens": cfg.prompt.n_tokens, "seed": cfg.seed, "sample_seeds": cfg.sample.seed_list(),
        "generator": g.model_dump(mode="json", exclude={"checkpointing", "dtype"}),
        "classifier": c.model_dump(mode="json", exclude={"allow_pickle"}),
        "optimize": o.model_dump(mode="json", exclude={"batch_tasks"}),
    }
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def plan(cfg: Config, info: classifiers.ClassifierInfo, final_weight) -> list[TaskSpec]:
    """All tasks of the run, in a stable order: per class, the class task, then its features."""
    t = cfg.targets
    tasks: list[TaskSpec] = []

    def add(kind: str, objective: Objective, **fields) -> None:
        for template in cfg.prompt.templates:
            name = fields.get("class_name")
            init = f"word:{short_name(name)}" if cfg.prompt.init == "class" and name else cfg.prompt.init
            if init == "class":
                init = "random"  # neuron tasks have no class name to start from
            task_id = _task_id(cfg, kind=kind, objective=objective.description, template=template, init=init,
                               **{k: v for k, v in fields.items() if k != "class_name"})
            tasks.append(TaskSpec(task_id, kind, objective, template, init, int(task_id[:8], 16), **fields))

    d = final_weight.shape[1]
    for c in t.classes:
        name = info.class_names[c]
        if t.class_task:
            add("class", objectives.class_ce(c), class_index=c, class_name=name)
        if c in t.features:
            ranked = [(f, r + 1) for r, f in enumerate(t.features[c])]
        else:
            ranked = [(x.feature_index, x.rank) for x in rank_by_weights(final_weight, c, t.top_k)]
        for f, rank in ranked:
            if not 0 <= f < d:
                raise DxrayError(f"targets.features: feature {f} of class {c} out of range; penultimate has 0..{d - 1}")
            objective = objectives.class_ce(c) - cfg.optimize.feature_weight * objectives.neuron("penultimate", f)
            add("feature", objective, class_index=c, class_name=name, feature_index=f, feature_rank=rank,
                layer="penultimate")
    for nt in t.neurons:
        add("neuron", -objectives.neuron(nt.layer, nt.unit), feature_index=nt.unit, layer=nt.layer)
    return tasks


def _task_row(run_id: str, spec: TaskSpec, cfg: Config, res: OptimizeResult | None, error: str | None) -> dict:
    row = {
        "run_id": run_id, "task_id": spec.task_id, "kind": spec.kind, "class_index": spec.class_index,
        "class_name": spec.class_name, "feature_index": spec.feature_index, "feature_rank": spec.feature_rank,
        "layer": spec.layer, "objective": spec.objective.description, "template": spec.template,
        "n_tokens": cfg.prompt.n_tokens, "init": spec.init, "status": "error" if error else "ok", "error": error,
        "lr": cfg.optimize.lr, "samples_per_step": cfg.optimize.samples_per_step,
    }
    if res is not None:
        row |= {
            "steps": res.steps, "final_loss": res.final_loss, "loss_curve": res.loss_curve,
            "target_prob": res.target_prob, "stopped_early": res.stopped_early,
            "prompt_embedding": res.rows.tolist(), "train_seeds": [s[0] for s in res.train_seeds],
            "seconds": res.seconds,
        }
    return row


ProgressHook = Callable[[str, dict], None]


class Auditor:
    """Loads the models once, then runs batches of tasks and writes their rows."""

    def __init__(self, cfg: Config, generator=None, classifier=None):
        from dxray.generator import LCMGenerator

        g, c = cfg.generator, cfg.classifier
        self.cfg = cfg
        self.generator = generator or LCMGenerator.from_pretrained(
            g.model, lora=g.lora, tiny_vae=g.tiny_vae, device=cfg.device, dtype=g.dtype, cache_dir=cfg.cache_dir,
            steps=g.steps, guidance_scale=g.guidance_scale, resolution=g.resolution,
            original_inference_steps=g.original_inference_steps, checkpointing=g.checkpointing)
        self.classifier = classifier or classifiers.load_classifier(
            classifier_spec(cfg), **classifier_kwargs(cfg), input_size=c.input_size, final_layer=c.final_layer,
            device=self.generator.device, allow_pickle=c.allow_pickle)

    def run_batch(self, specs: list[TaskSpec], sink: RunSink, on_step=None) -> list[dict]:
        """Optimise and sample a batch; write samples then task rows per task. Returns the task rows."""
        cfg = self.cfg
        o = cfg.optimize
        settings = OptimizeSettings(o.steps, o.lr, o.optimizer, o.weight_decay, o.samples_per_step, o.early_stop_prob)
        targets = [Target(s.objective, s.template, cfg.prompt.n_tokens, s.init, s.seed, s.class_index) for s in specs]
        try:
            results = optimize(self.generator, self.classifier, targets, settings, on_step=on_step)
        except DxrayError:
            raise
        except Exception as err:  # one failing batch must not lose the rest of the run
            results = [None] * len(specs)
            batch_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        else:
            batch_error = None
        rows = []
        for spec, res in zip(specs, results, strict=True):
            error = batch_error or (res.error if res else None)
            if error is None:
                try:
                    self._write_samples(spec, res, sink)
                except Exception as err:
                    error = f"sampling failed: {type(err).__name__}: {err}"
            row = _task_row(sink.run_id, spec, cfg, res, error)
            sink.write_table("tasks", [row], part=spec.task_id)
            rows.append(row)
        return rows

    def _write_samples(self, spec: TaskSpec, res: OptimizeResult, sink: RunSink) -> None:
        feature = (spec.layer, spec.feature_index) if spec.layer else None
        samples = sample(self.generator, self.classifier, spec.template, res.rows, self.cfg.sample.seed_list(),
                         class_index=spec.class_index, feature=feature, batch_size=self.cfg.sample.batch_size)
        rows = []
        for s in samples:
            uri = sink.write_bytes(f"images/{spec.task_id}/{s.seed:010d}.png", encode_png(s.image))
            rows.append({
                "run_id": sink.run_id, "task_id": spec.task_id, "class_index": spec.class_index,
                "feature_index": spec.feature_index, "seed": s.seed, "image_uri": uri,
                "thumbnail": thumbnail_png(s.image), "width": s.image.shape[1], "height": s.image.shape[0],
                "class_prob": s.class_prob, "feature_activation": s.feature_activation,
            })
        sink.write_table("samples", rows, part=spec.task_id)


def run(cfg: Config, progress: ProgressHook | None = None) -> RunSummary:
    """Run the whole audit in this process (the embedded default: no cluster needed)."""
    started = datetime.now(UTC)
    info = preflight(cfg)
    run_id = cfg.resolved_run_id()
    sink = RunSink(cfg.output, run_id)
    done = sink.committed_task_ids()
    auditor = Auditor(cfg)
    specs = plan(cfg, info, auditor.classifier.final_weight)
    todo = [s for s in specs if s.task_id not in done]
    summary = RunSummary(run_id, sink.uri(""), len(specs), len(specs) - len(todo))
    emit = progress or (lambda event, data: None)
    emit("plan", {"planned": len(specs), "skipped": summary.skipped, "todo": len(todo), "root": summary.root})
    size = cfg.optimize.batch_tasks
    for start in range(0, len(todo), size):
        batch = todo[start:start + size]
        names = ", ".join(f"{s.kind}:{s.class_index if s.kind != 'neuron' else s.layer}" for s in batch)

        def on_step(step, results, names=names):
            losses = [r.loss_curve[-1] for r in results if r.loss_curve]
            emit("step", {"step": step + 1, "steps": cfg.optimize.steps, "tasks": names,
                          "loss": sum(losses) / len(losses) if losses else float("nan")})

        for row in auditor.run_batch(batch, sink, on_step=on_step):
            if row["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.errors.append(f"{row['task_id']}: {row['error']}")
            emit("task", row)
    tables = {name: sink.read_table(name) for name in ("tasks", "samples")}
    summary.samples = tables["samples"].num_rows if tables["samples"] is not None else 0
    sink.write_manifest({
        "run_id": run_id, "dxray_command": "explain", "config": redact(cfg.model_dump(mode="json")),
        "versions": package_versions(),
        "models": {"generator": cfg.generator.model, "lora": cfg.generator.lora, "tiny_vae": cfg.generator.tiny_vae,
                   "classifier": cfg.classifier.spec, "classifier_weights": cfg.classifier.weights},
        "feature_source": cfg.targets.feature_source, "device": str(auditor.generator.device),
        "started": started.isoformat(), "finished": datetime.now(UTC).isoformat(),
        "rows": {name: (t.num_rows if t is not None else 0) for name, t in tables.items()},
        "tasks": {"planned": summary.planned, "skipped": summary.skipped, "ok": summary.ok, "failed": summary.failed},
    })
    return summary
