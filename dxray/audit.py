"""The in-process audit: validate → plan → (skip committed) → optimise + sample → write.

Everything that can be checked without loading a model is checked first
(:func:`preflight`); each task is written as its own Parquet part (samples
first, the task row last, so a task row means "committed"), and a failure in
one batch of tasks is recorded as error rows without losing the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dxray import classifiers, features, objectives, prompts
from dxray.config import Config, StorageConfig
from dxray.errors import DxrayError
from dxray.optimize import (
    HardSettings,
    OptimizeResult,
    OptimizeSettings,
    Sample,
    Target,
    best_of,
    optimize,
    sample,
)
from dxray.features import RankedFeature
from dxray.generator import check_model_ref
from dxray.objectives import Objective
from dxray.storage import package_versions, redact, redact_text
from dxray.storage.fs import check_output, check_reachable
from dxray.storage.images import encode_png, thumbnail_png
from dxray.storage.schemas import TABLES
from dxray.storage.sink import RunSink
from dxray.verdict import decide

log = logging.getLogger("dxray")


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
    verdicts: int = 0
    spurious: int = 0
    errors: list[str] = field(default_factory=list)


def short_name(class_name: str) -> str:
    """First lemma of a WordNet-style name: 'tench, Tinca tinca' → 'tench'."""
    return class_name.split(",")[0].strip()


def classifier_kwargs(cfg: Config) -> dict:
    c = cfg.classifier
    return {"weights": c.weights, "kwargs": c.kwargs, "class_names": c.class_names}


def classifier_spec(cfg: Config) -> str:
    return classifiers.resolve_alias(cfg.classifier.spec, cfg.cache_dir)


def preflight(cfg: Config, missing: list[str] | None = None) -> classifiers.ClassifierInfo:
    """Every check that needs no model weights; raises a one-line DxrayError naming the config field,
    before any weights load or any run folder is made.

    With ``missing`` (a list: the dry run of a job meant for another machine), what is not found here
    (a local model folder, the classifier's checkpoint, the feature image folder or table, a wnids file)
    is appended to it as "field path" and the checks that need it are skipped; a real run (None) raises."""
    check_cache_dir(cfg)  # before anything is built into it
    for ref, where, what in ((cfg.generator.model, "generator.model", "generator model"),
                             (cfg.generator.lora, "generator.lora", "LoRA"),
                             (cfg.generator.tiny_vae, "generator.tiny_vae", "tiny VAE")):
        if ref and not _listed_as_missing(ref, where, missing):
            check_model_ref(ref, what)
    # Before the classifier: describing 'tiny' or 'toyworld' builds it (the toy world trains for minutes).
    check_output(cfg.output, cfg.storage)
    files: list[str] = []
    info = classifiers.describe(classifier_spec(cfg), **classifier_kwargs(cfg), input_size=cfg.classifier.input_size,
                                missing=None if missing is None else files)
    if missing is not None:
        missing += [f"classifier.weights {f}" if f == cfg.classifier.weights else f"classifier.spec checkpoint {f}"
                    for f in files]
    n = info.num_classes
    t = cfg.targets
    for where, indices in [("targets.classes", t.classes), ("targets.features", list(t.features))]:
        bad = [c for c in indices if not 0 <= c < n]
        if bad:
            raise DxrayError(f"{where}: class index {bad[0]} out of range; the classifier has classes 0..{n - 1}")
    absent = sorted(set(t.features) - set(t.classes))
    if absent:
        raise DxrayError(f"targets.features names class {absent[0]}, which is not in targets.classes")
    check_target_widths(cfg, info)
    if not (t.class_task or t.top_k or t.features or t.neurons):
        raise DxrayError("targets: nothing to do (class_task is false, top_k is 0, no features or neurons)")
    check_template_lengths(cfg)
    if t.feature_source == "images":
        folder = image_folder(cfg, missing)
        if folder is not None and not _listed_as_missing(folder.root, "targets.feature_images.path", missing,
                                                         _not_found):
            features.check_image_folder(folder, t.classes, t.feature_images.select)
    elif t.feature_source == "table":
        if not _listed_as_missing(t.feature_table, "targets.feature_table", missing, _not_found):
            features.read_ranking_table(t.feature_table, t.classes, t.top_k)
    if cfg.segment.enabled:
        from dxray.segment import detection_prompt

        for ref, where, what in ((cfg.segment.detector, "segment.detector", "detector"),
                                 (cfg.segment.sam, "segment.sam", "SAM")):
            if ref and ref not in ("tiny", "toyworld") and not _listed_as_missing(ref, where, missing):
                check_model_ref(ref, what)
        for c in t.classes:
            given = cfg.segment.prompts.get(c)
            try:
                detection_prompt(info.class_names[c] if given is None else given)
            except DxrayError:
                if given is not None:
                    raise DxrayError(f"segment.prompts[{c}]: detection prompt {given!r} is empty once lower-cased "
                                     f"and cut at its first comma") from None
                raise DxrayError(f"class {c}'s name {info.class_names[c]!r} is an empty class name for a detection "
                                 f"prompt (set segment.prompts[{c}])") from None
    return info


def _local_path_absent(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().exists()


def _not_found(where: str) -> bool:
    return not features.path_exists(where)


def _listed_as_missing(ref: str, where: str, missing: list[str] | None,
                       absent: Callable[[str], bool] | None = None) -> bool:
    """In a dry run (``missing`` a list): True, after listing ``where ref``, when ``ref`` is not here.
    ``absent`` defaults to "a local path that does not exist" (a hub id is never missing)."""
    if missing is None:
        return False
    try:
        gone = absent(ref) if absent else _local_path_absent(ref)
    except (OSError, DxrayError):  # unreachable storage: the real check says why, in one line
        return False
    if gone:
        missing.append(f"{where} {ref}")
    return gone


def check_cache_dir(cfg: Config) -> None:
    """``cache_dir`` (where built-in models are built; default $DXRAY_CACHE, else ~/.cache/dxray, checked when a
    built-in model uses it) must be a folder, or creatable in one, that this process can write."""
    from dxray.tiny import cache_root

    refs = (cfg.generator.model, cfg.classifier.spec, cfg.segment.detector, cfg.segment.sam)
    if cfg.cache_dir is None and not any(r in ("tiny", "toyworld") for r in refs):
        return
    root = cache_root(cfg.cache_dir)
    name = f"cache_dir {cfg.cache_dir}" if cfg.cache_dir is not None else f"cache_dir (default {root})"
    existing = root.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DxrayError(f"{name}: {existing} is a file, not a folder")
    import tempfile

    try:  # os.access says yes to root even where nothing can be made (/proc)
        with tempfile.TemporaryDirectory(prefix=".dxray-probe-", dir=existing):
            pass
    except OSError as err:
        raise DxrayError(f"{name} is not writable: cannot create a folder in {existing} "
                         f"({err.strerror or type(err).__name__})") from None


def check_target_widths(cfg: Config, info: classifiers.ClassifierInfo) -> None:
    """Explicit features, ``top_k`` and neuron units against the widths of the classifier's layers."""
    t = cfg.targets
    d = info.feature_dim
    for c, fs in t.features.items():
        bad = [f for f in fs if not 0 <= f < d]
        if bad:
            raise DxrayError(f"targets.features[{c}]: feature {bad[0]} out of range; the penultimate layer has "
                             f"features 0..{d - 1}")
    if t.top_k > d and any(c not in t.features for c in t.classes):
        raise DxrayError(f"targets.top_k {t.top_k} is more than the {d} penultimate features of the classifier")
    for i, nt in enumerate(t.neurons):
        if nt.layer not in info.layer_names:
            names = ", ".join(info.layer_names[:30]) + (" ..." if len(info.layer_names) > 30 else "")
            raise DxrayError(f"targets.neurons: unknown layer {nt.layer!r}; available: {names}")
        width = info.layer_widths.get(nt.layer)
        if width is not None and not 0 <= nt.unit < width:
            raise DxrayError(f"targets.neurons[{i}]: unit {nt.unit} out of range; layer {nt.layer!r} has units "
                             f"0..{width - 1}")


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _offline_tokenizer(cfg: Config):
    """The generator's CLIP tokenizer when it is on this machine already (a local folder, a hub id in the local
    hub cache; a built-in model's is made in memory); None otherwise: nothing is built or downloaded."""
    model = cfg.generator.model
    if model == "tiny":
        from dxray.tiny import tiny_clip_tokenizer

        return tiny_clip_tokenizer()  # what the tiny LCM is built with: vocabulary only, no weights
    if model == "toyworld":
        from dxray.toyworld.train import world_tokenizer

        return world_tokenizer()
    elif model.startswith(("/", "./", "../", "~")):
        model = str(Path(model).expanduser())
    folder = Path(model) / "tokenizer"
    if not folder.is_dir():  # a hub id: its tokenizer files in the local hub cache, else nothing
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = [try_to_load_from_cache(model, f"tokenizer/{name}") for name in _TOKENIZER_FILES]
        except Exception:  # noqa: BLE001 - not a valid repo id
            return None
        found = [c for c in cached if isinstance(c, str)]
        if not found:
            return None
        folder = Path(found[0]).parent
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):  # else transformers builds an empty one
        return None
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - not a CLIP tokenizer: the run's own load says why
        return None


def check_template_lengths(cfg: Config) -> None:
    """Every template, its ``{}`` as prompt.n_tokens tokens, fits the CLIP text encoder (BOS and EOS included);
    skipped when the tokenizer is not on this machine."""
    tokenizer = _offline_tokenizer(cfg)
    if tokenizer is None:
        return
    n = cfg.prompt.n_tokens
    for i, template in enumerate(cfg.prompt.templates):
        pre, suf = (part.strip() for part in template.split("{}", 1))
        length = 2 + n + sum(len(tokenizer(x, add_special_tokens=False).input_ids) for x in (pre, suf) if x)
        if length > prompts.MAX_LENGTH:
            short = template if len(template) <= 60 else template[:57] + "..."
            raise DxrayError(f"prompt.templates[{i}]: template {short!r} is {length} tokens long with "
                             f"prompt.n_tokens={n} learnable tokens (BOS and EOS included); the CLIP text "
                             f"encoder's limit is {prompts.MAX_LENGTH}")


def image_folder(cfg: Config, missing: list[str] | None = None) -> features.ImageFolder | None:
    """The feature image folder; None only in a dry run whose wnids file is missing (listed in ``missing``)."""
    fi = cfg.targets.feature_images
    wnids = fi.wnids
    if isinstance(wnids, str):
        path = Path(wnids).expanduser()
        if not path.is_file():
            if missing is not None:
                missing.append(f"targets.feature_images.wnids {wnids}")
                return None
            raise DxrayError(f"targets.feature_images.wnids file not found: {wnids}")
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return features.ImageFolder(fi.path, wnids)


ImageRanker = Callable[[list[int]], list[RankedFeature]]


def rank_features(cfg: Config, classifier, image_ranker: ImageRanker | None = None) -> list[RankedFeature]:
    """Top-k features of every audited class from the configured source (explicit lists win).
    ``image_ranker`` ranks the given classes over the image folder (default: in this process)."""
    t = cfg.targets
    todo = [c for c in t.classes if c not in t.features]
    ranked: list[RankedFeature] = []
    if todo and t.top_k:
        if t.feature_source == "images" and image_ranker is not None:
            ranked = image_ranker(todo)
        elif t.feature_source == "images":
            fi = t.feature_images
            ranked = features.rank_from_images(classifier, image_folder(cfg), todo, t.top_k, fi.select,
                                               fi.max_per_class, batch_size=fi.batch_size)
        elif t.feature_source == "table":
            ranked = features.read_ranking_table(t.feature_table, todo, t.top_k)
        else:
            ranked = [r for c in todo for r in features.rank_by_weights(classifier.final_weight, c, t.top_k)]
    for c, fs in t.features.items():
        ranked += [RankedFeature(c, f, r + 1, float("nan"), "config") for r, f in enumerate(fs)]
    return ranked


def _task_id(cfg: Config, **what) -> str:
    g, c, o = cfg.generator, cfg.classifier, cfg.optimize
    defining = {
        **what,
        "n_tokens": cfg.prompt.n_tokens, "seed": cfg.seed, "sample_seeds": cfg.sample.seed_list(),
        "generator": g.model_dump(mode="json", exclude={"checkpointing", "dtype"} | ({"grad_steps"} if g.grad_steps is None else set())),
        "classifier": c.model_dump(mode="json", exclude={"allow_pickle"}),
        "optimize": o.model_dump(mode="json", exclude={"batch_tasks"}),
        "segment": cfg.segment.model_dump(mode="json", exclude={"batch_size"}),
    }
    if cfg.prompt.kind == "hard":  # only then: soft-prompt task ids stay as they were
        defining["hard_prompt"] = cfg.prompt.hard.model_dump(mode="json")
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def plan(cfg: Config, info: classifiers.ClassifierInfo, ranking: list[RankedFeature], feature_dim: int) -> list[TaskSpec]:
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

    d = feature_dim
    for c in t.classes:
        name = info.class_names[c]
        if t.class_task:
            add("class", objectives.class_ce(c), class_index=c, class_name=name)
        for rank, f in sorted((x.rank, x.feature_index) for x in ranking if x.class_index == c):
            if not 0 <= f < d:
                raise DxrayError(f"feature {f} of class {c} out of range; penultimate has 0..{d - 1}")
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
        "lr": (cfg.prompt.kind == "hard" and cfg.prompt.hard.lr) or cfg.optimize.lr,
        "samples_per_step": cfg.optimize.samples_per_step,
    }
    if res is not None:
        row |= {
            "steps": res.steps, "final_loss": res.final_loss, "loss_curve": res.loss_curve,
            "target_prob": res.target_prob, "stopped_early": res.stopped_early, "baseline_prob": res.baseline_prob,
            "prompt_embedding": res.rows.tolist(), "hard_prompt_text": res.text,
            "train_seeds": [s[0] for s in res.train_seeds],
            "seconds": res.seconds,
        }
    return row


ProgressHook = Callable[[str, dict], None]


@dataclass
class Outcome:
    """What the explainer made of one task: its best optimisation result and held-out samples."""

    spec: TaskSpec
    result: OptimizeResult | None
    samples: list[Sample]
    error: str | None


@dataclass
class Finished:
    """A task ready to commit once its images are scored: the task row, its sample rows (images
    already written) and the detection prompt (None: nothing to score)."""

    task_row: dict
    sample_rows: list[dict]
    prompt: str | None


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def one_line(err: BaseException) -> str:
    """An error's message on one line (its type when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


class Explainer:
    """Generator + classifier pinned on one device: optimises and samples tasks. No table I/O, so
    the same object serves the in-process audit and a Ray actor."""

    def __init__(self, cfg: Config, generator=None, classifier=None):
        from dxray.generator import LCMGenerator

        g, c = cfg.generator, cfg.classifier
        self.cfg = cfg
        self.generator = generator or LCMGenerator.from_pretrained(
            g.model, lora=g.lora, tiny_vae=g.tiny_vae, device=cfg.device, dtype=g.dtype, cache_dir=cfg.cache_dir,
            steps=g.steps, guidance_scale=g.guidance_scale, resolution=g.resolution,
            original_inference_steps=g.original_inference_steps, checkpointing=g.checkpointing,
            grad_steps=g.grad_steps)
        self.classifier = classifier or classifiers.load_classifier(
            classifier_spec(cfg), **classifier_kwargs(cfg), input_size=c.input_size, final_layer=c.final_layer,
            device=self.generator.device, allow_pickle=c.allow_pickle)
        h = cfg.prompt.hard
        self.hard = HardSettings(h.tau_start, h.tau_end, h.lr, h.vocabulary) if cfg.prompt.kind == "hard" else None
        if self.hard is not None:  # a word that is not one token: one line now, before any optimisation
            prompts.vocabulary_ids(self.generator.tokenizer, self.hard.vocabulary)

    def explain(self, specs: list[TaskSpec], on_step=None) -> list[Outcome]:
        """Optimise the batch together, then sample each task; a failure becomes the task's error."""
        cfg = self.cfg
        o = cfg.optimize
        settings = OptimizeSettings(o.steps, o.lr, o.optimizer, o.weight_decay, o.samples_per_step, o.early_stop_prob,
                                    self.hard)
        r = o.restarts  # restart k of a task starts from seed + k; the lowest final loss wins
        targets = [Target(s.objective, s.template, cfg.prompt.n_tokens, s.init, s.seed + k, s.class_index,
                          stop_early=s.kind == "class", group=n) for n, s in enumerate(specs) for k in range(r)]
        try:
            runs = optimize(self.generator, self.classifier, targets, settings, on_step=on_step)
        except DxrayError:
            raise
        except Exception as err:  # one failing batch must not lose the rest of the run
            return [Outcome(s, None, [], _one_line(err)) for s in specs]
        outcomes = []
        for i, spec in enumerate(specs):
            res = best_of(runs[i * r:(i + 1) * r])
            samples: list[Sample] = []
            error = res.error
            if error is None:
                try:
                    samples = self._sample(spec, res)
                except Exception as err:
                    error = f"sampling failed: {_one_line(err)}"
            outcomes.append(Outcome(spec, res, samples, error))
        return outcomes

    def _sample(self, spec: TaskSpec, res: OptimizeResult) -> list[Sample]:
        s = self.cfg.sample
        feature = (spec.layer, spec.feature_index) if spec.layer else None
        samples = sample(self.generator, self.classifier, spec.template, res.rows, s.seed_list(),
                         class_index=spec.class_index, feature=feature, batch_size=s.batch_size)
        if s.baseline and spec.class_index is not None:
            start = res.start_rows  # the initial prompt (hard: its argmax words)
            before = sample(self.generator, self.classifier, spec.template, start, s.seed_list(),
                            class_index=spec.class_index, batch_size=s.batch_size)
            res.baseline_prob = sum(b.class_prob for b in before) / len(before)
        return samples


def load_segmenter(cfg: Config, device="cpu"):
    """The configured scorer: Grounding DINO + SAM, or the toy world's exact segmenter (same interface)."""
    s = cfg.segment
    if s.detector == "toyworld":
        from dxray.toyworld.segmenter import WorldSegmenter

        return WorldSegmenter()
    from dxray.segment import Segmenter

    return Segmenter(s.detector, s.sam, device=device, box_threshold=s.box_threshold,
                     text_threshold=s.text_threshold, batch_size=s.batch_size, cache_dir=cfg.cache_dir)


def scoring_prompt(cfg: Config, spec: TaskSpec) -> str | None:
    """Grounding DINO prompt for the task's images; None when they are not scored."""
    if not cfg.segment.enabled or spec.class_index is None:
        return None
    from dxray.segment import detection_prompt

    return detection_prompt(cfg.segment.prompts.get(spec.class_index, spec.class_name))


def package(outcome: Outcome, cfg: Config, sink: RunSink) -> tuple[Finished, list]:
    """Write the task's full-size images and build its rows; returns the rows and the images to score."""
    spec = outcome.spec
    prompt = scoring_prompt(cfg, spec) if outcome.error is None else None
    rows = []
    for s in outcome.samples:
        uri = sink.write_bytes(f"images/{spec.task_id}/{s.seed:010d}.png", encode_png(s.image))
        rows.append({
            "run_id": sink.run_id, "task_id": spec.task_id, "class_index": spec.class_index,
            "feature_index": spec.feature_index, "seed": s.seed, "image_uri": uri,
            "thumbnail": thumbnail_png(s.image), "width": s.image.shape[1], "height": s.image.shape[0],
            "class_prob": s.class_prob, "feature_activation": s.feature_activation, "detection_prompt": prompt,
        })
    task_row = _task_row(sink.run_id, spec, cfg, outcome.result, outcome.error)
    images = [s.image for s in outcome.samples] if prompt else []
    return Finished(task_row, rows, prompt), images


def score(segmenter, images: list, prompt: str) -> list[dict]:
    """Segmentation columns of each image."""
    return [{"object_fraction": g.object_fraction, "mask_rle": g.mask_rle, "boxes": g.boxes, "box_scores": g.box_scores}
            for g in segmenter(images, [prompt] * len(images))]


def commit(sink: RunSink, done: Finished, scores: list[dict] | None = None, error: str | None = None) -> dict:
    """Samples first, the task row last: a task row on storage means the task is complete."""
    row = dict(done.task_row)
    if error is not None:
        row |= {"status": "error", "error": error}
    if row["error"]:  # an exception's text may echo a model URL or a library's view of a credential
        row["error"] = redact_text(row["error"])
    if row["status"] == "ok":
        rows = [r | s for r, s in zip(done.sample_rows, scores, strict=True)] if scores else done.sample_rows
        if rows:
            sink.write_table("samples", rows, part=row["task_id"])
    sink.write_table("tasks", [row], part=row["task_id"])
    return row


class Auditor:
    """The in-process audit: an explainer and a segmenter in this process."""

    def __init__(self, cfg: Config, generator=None, classifier=None):
        self.cfg = cfg
        self.explainer = Explainer(cfg, generator, classifier)
        self.generator, self.classifier = self.explainer.generator, self.explainer.classifier
        self.segmenter = load_segmenter(cfg, self.generator.device) if cfg.segment.enabled else None

    def run_batch(self, specs: list[TaskSpec], sink: RunSink, on_step=None) -> list[dict]:
        """Optimise and sample a batch; write samples then task rows per task. Returns the task rows."""
        rows = []
        for outcome in self.explainer.explain(specs, on_step=on_step):
            scores, error = None, None
            try:
                done, images = package(outcome, self.cfg, sink)
                if images:
                    scores = score(self.segmenter, images, done.prompt)
            except DxrayError:
                raise
            except Exception as err:
                done = Finished(_task_row(sink.run_id, outcome.spec, self.cfg, outcome.result, None), [], None)
                error = f"sampling failed: {_one_line(err)}"
            rows.append(commit(sink, done, scores, error))
        return rows


def open_sink(cfg: Config, run_id: str | None = None) -> RunSink:
    return RunSink(cfg.output, run_id or cfg.resolved_run_id(), storage=cfg.storage)


def committed(sink: RunSink) -> set[str]:
    """Tasks already complete in the run (status ok); a failed task is tried again on the next run."""
    table = sink.read_table("tasks")
    if table is None:
        return set()
    return {t for t, status in zip(table["task_id"].to_pylist(), table["status"].to_pylist(), strict=True)
            if status == "ok"}


@dataclass
class Prepared:
    """A planned run: the sink, the feature ranking and the tasks still to do."""

    sink: RunSink
    info: classifiers.ClassifierInfo
    ranking: list[RankedFeature]
    specs: list[TaskSpec]
    todo: list[TaskSpec]
    started: datetime

    def summary(self) -> RunSummary:
        return RunSummary(self.sink.run_id, self.sink.uri(""), len(self.specs), len(self.specs) - len(self.todo))


def prepare(cfg: Config, info: classifiers.ClassifierInfo, classifier=None, image_ranker: ImageRanker | None = None,
            started: datetime | None = None) -> Prepared:
    """Rank features, write the ranking, plan every task and drop the committed ones."""
    sink = open_sink(cfg)
    ranking = rank_features(cfg, classifier, image_ranker)
    sink.write_table("feature_ranking", features.ranking_rows(sink.run_id, ranking, info.class_names), part="all")
    specs = plan(cfg, info, ranking, info.feature_dim)
    done = committed(sink)
    return Prepared(sink, info, ranking, specs, [s for s in specs if s.task_id not in done], started or datetime.now(UTC))


def count(summary: RunSummary, row: dict) -> None:
    if row["status"] == "ok":
        summary.ok += 1
    else:
        summary.failed += 1
        summary.errors.append(f"{row['task_id']}: {row['error']}")


def finalize(cfg: Config, p: Prepared, summary: RunSummary, command: str, device: str, extra: dict | None = None) -> None:
    """Verdicts and classes from the stored tables, then the manifest, written last."""
    sink = p.sink
    decision = decision_in_force(cfg, sink.read_manifest())
    tables = {name: sink.read_table(name) for name in ("tasks", "samples")}
    summary.samples = tables["samples"].num_rows if tables["samples"] is not None else 0
    if cfg.segment.enabled and tables["tasks"] is not None and tables["samples"] is not None:
        verdicts, classes = decide(tables["tasks"], tables["samples"], decision["delta"], sink.run_id)
        sink.write_table("verdicts", verdicts, part="all")
        sink.write_table("classes", classes, part="all")
        summary.spurious = sum(v["verdict"] == "spurious" for v in verdicts)
        summary.verdicts = len(verdicts)
    tables |= {name: sink.read_table(name) for name in TABLES if name not in tables}  # the small derived ones
    sink.write_manifest({
        "run_id": sink.run_id, "dxray_command": command, "config": redact(cfg.model_dump(mode="json")),
        "versions": package_versions(),
        "models": {"generator": cfg.generator.model, "lora": cfg.generator.lora, "tiny_vae": cfg.generator.tiny_vae,
                   "classifier": cfg.classifier.spec, "classifier_weights": cfg.classifier.weights},
        "feature_source": sorted({r.source for r in p.ranking}), "device": device,
        "started": p.started.isoformat(), "finished": datetime.now(UTC).isoformat(),
        "rows": {name: (t.num_rows if t is not None else 0) for name, t in tables.items()},
        "tasks": {"planned": summary.planned, "skipped": summary.skipped, "ok": summary.ok, "failed": summary.failed},
        "decision": decision,
        **(extra or {}),
    })


def run(cfg: Config, progress: ProgressHook | None = None) -> RunSummary:
    """Run the whole audit in this process (the embedded default: no cluster needed)."""
    started = datetime.now(UTC)
    info = preflight(cfg)
    auditor = Auditor(cfg)
    p = prepare(cfg, info, auditor.classifier, started=started)
    summary = p.summary()
    emit = progress or (lambda event, data: None)
    emit("plan", {"planned": len(p.specs), "skipped": summary.skipped, "todo": len(p.todo), "root": summary.root})
    size = cfg.optimize.batch_tasks
    for start in range(0, len(p.todo), size):
        batch = p.todo[start:start + size]
        names = ", ".join(f"{s.kind}:{s.class_index if s.kind != 'neuron' else s.layer}" for s in batch)

        def on_step(step, results, names=names):
            losses = [r.loss_curve[-1] for r in results if r.loss_curve]
            emit("step", {"step": step + 1, "steps": cfg.optimize.steps, "tasks": names,
                          "loss": sum(losses) / len(losses) if losses else float("nan")})

        for row in auditor.run_batch(batch, p.sink, on_step=on_step):
            count(summary, row)
            emit("task", row)
    finalize(cfg, p, summary, "explain", str(auditor.generator.device))
    return summary


def open_run(run: str, storage: StorageConfig | None = None) -> RunSink:
    """The sink of an existing run folder (local path or URI ending in the run id)."""
    parent, _, run_id = run.rstrip("/").rpartition("/")
    sink = RunSink(parent or ".", run_id, storage=storage)
    if sink.fs.type_name == "s3":
        check_reachable(run, sink.root, sink.storage)  # seconds, not storage.retry_seconds of retries
    if sink.read_table("tasks") is None:
        raise DxrayError(f"no run found at {run} (expected a tasks/ table inside)")
    return sink


def decision_in_force(cfg: Config, manifest: dict | None) -> dict:
    """The δ a (re-)finished run decides with: a δ set by ``dxray redecide`` stays in force over the
    config's ``verdict.delta`` (which does not change the run id), until the next redecide."""
    previous = (manifest or {}).get("decision")
    if isinstance(previous, dict) and previous.get("source") == "redecide" and \
            isinstance(previous.get("delta"), int | float) and 0 <= previous["delta"] <= 1:
        if previous["delta"] != cfg.verdict.delta:
            log.warning("keeping delta %s set by dxray redecide (the config says verdict.delta %s); "
                        "run dxray redecide again to change it", previous["delta"], cfg.verdict.delta)
        return previous
    return {"delta": cfg.verdict.delta, "source": "config"}


_DECIDED = ("verdicts/part-all.parquet", "classes/part-all.parquet", "manifest.json")


def redecide(run: str, delta: float) -> tuple[list[dict], list[dict]]:
    """Re-decide core/spurious for another δ from the stored r values; rewrites verdicts and classes
    and records the δ in the manifest, all or nothing: when a write fails, the files written so far
    are put back as they were, so the run is never left half re-decided."""
    from dxray.verdict import check_delta

    check_delta(delta)
    sink = open_run(run)
    manifest = sink.read_manifest()
    if manifest is None:
        raise DxrayError(f"run {run} has not finished (no readable manifest.json): re-run its command to finish "
                         f"it, then redecide")
    samples = sink.read_table("samples")
    if samples is None:
        raise DxrayError(f"run {run} has no samples table")
    verdicts, classes = decide(sink.read_table("tasks"), samples, delta, sink.run_id)
    decision = {"delta": delta, "source": "redecide", "at": datetime.now(UTC).isoformat()}
    before = {rel: sink.read_bytes(rel) for rel in _DECIDED}
    written: list[str] = []  # each write is atomic (sink._atomic): the one that failed left its file as it was
    writes = {_DECIDED[0]: lambda: sink.write_table("verdicts", verdicts, part="all"),
              _DECIDED[1]: lambda: sink.write_table("classes", classes, part="all"),
              _DECIDED[2]: lambda: sink.write_manifest(manifest | {"decision": decision})}
    for rel, write in writes.items():
        try:
            write()
        except (OSError, DxrayError) as err:
            _restore(sink, before, written)
            raise DxrayError(f"run {run}: could not write {rel} ({one_line(err)}); the run is unchanged "
                             f"(still decided at its earlier delta)") from None
        written.append(rel)
    return verdicts, classes


def _restore(sink: RunSink, before: dict[str, bytes | None], written: list[str]) -> None:
    for rel in reversed(written):
        try:
            if before[rel] is None:
                sink.delete(rel)
            else:
                sink.write_bytes(rel, before[rel])
        except (OSError, DxrayError) as err:
            raise DxrayError(f"run {sink.uri('')}: redecide failed and {rel} could not be put back "
                             f"({one_line(err)}); run dxray redecide again to make the run consistent") from None
