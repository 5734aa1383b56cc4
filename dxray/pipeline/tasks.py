"""Task planning: every task of a run (class × {class task, its top-k features} × templates, then the
neuron tasks), each with a stable id, in a stable order. Plain data; no model is loaded here."""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace

from dxray import objectives
from dxray.errors import DxrayError
from dxray.features import RankedFeature
from dxray.identity import task_ids
from dxray.objectives import Objective


@dataclass
class TaskSpec:
    task_id: str
    kind: str  # class | feature | neuron | control
    objective: Objective | None  # None: a control, rendered from a plain prompt without optimisation
    template: str
    init: str
    seed: int
    class_index: int | None = None
    class_name: str | None = None
    feature_index: int | None = None
    feature_rank: int | None = None
    layer: str | None = None
    # Resolved by plan() from the config, so rows, explainers and actors need no Config for them:
    n_tokens: int | None = None  # soft-prompt tokens (prompt.n_tokens)
    lr: float | None = None  # the optimiser's learning rate (prompt.hard.lr for hard prompts, else optimize.lr)
    samples_per_step: int | None = None
    prompts: list[str] | None = None  # detection prompts its images are scored with (None: not scored)


def short_name(class_name: str) -> str:
    """First lemma of a WordNet-style name: 'tench, Tinca tinca' → 'tench'."""
    return class_name.split(",")[0].strip()


def plan(cfg, info, ranking: list[RankedFeature]) -> list[TaskSpec]:
    """All tasks of the run, in a stable order: per class, the class task, then its features.
    ``info`` is the classifier's description (class names, penultimate width)."""
    # Thousands of small objects on a heap that holds torch and pydantic: the cyclic collector's passes were 60% of
    # planning a full-ImageNet audit (0.55 s of CPU -> 0.22 s without them); plan() makes no cycles to collect.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _plan(cfg, info, ranking)
    finally:
        if paused:
            gc.enable()


def _plan(cfg, info, ranking: list[RankedFeature]) -> list[TaskSpec]:
    t = cfg.targets
    tasks: list[TaskSpec] = []
    task_id = task_ids(cfg)

    def add(kind: str, objective: Objective, **fields) -> None:
        for template in cfg.prompt.templates:
            name = fields.get("class_name")
            init = f"word:{short_name(name)}" if cfg.prompt.init == "class" and name else cfg.prompt.init
            if init == "class":
                init = "random"  # neuron tasks have no class name to start from
            tid = task_id(kind=kind, objective=objective.description, template=template, init=init,
                          **{k: v for k, v in fields.items() if k != "class_name"})
            tasks.append(TaskSpec(tid, kind, objective, template, init, int(tid[:8], 16), **fields))

    d = info.feature_dim
    resolved = {"n_tokens": cfg.prompt.n_tokens, "samples_per_step": cfg.optimize.samples_per_step,
                "lr": (cfg.prompt.kind == "hard" and cfg.prompt.hard.lr) or cfg.optimize.lr}
    by_class: dict[int, list[tuple[int, int]]] = {}  # grouped once: a scan per class is quadratic at 1000 classes
    for x in ranking:
        by_class.setdefault(x.class_index, []).append((x.rank, x.feature_index))
    for c in t.classes:
        name = info.class_names[c]
        if t.class_task:
            add("class", objectives.class_ce(c), class_index=c, class_name=name)
        for rank, f in sorted(by_class.get(c, [])):
            if not 0 <= f < d:
                raise DxrayError(f"feature {f} of class {c} out of range; penultimate has 0..{d - 1}")
            objective = objectives.class_ce(c) - cfg.optimize.feature_weight * objectives.neuron("penultimate", f)
            add("feature", objective, class_index=c, class_name=name, feature_index=f, feature_rank=rank,
                layer="penultimate")
        if cfg.segment.enabled and cfg.segment.control:
            tasks.append(control_spec(cfg, c, name, task_id))
    for nt in t.neurons:
        add("neuron", -objectives.neuron(nt.layer, nt.unit), feature_index=nt.unit, layer=nt.layer)
    return [replace(spec, **resolved, prompts=detection_prompts(cfg.segment, spec.class_index, spec.class_name))
            for spec in tasks]


def control_spec(cfg, class_index: int, class_name: str, task_id=None) -> TaskSpec:
    """The segmenter control of a class: ``segment.control_template`` filled with the class name, rendered for
    the held-out seeds with no optimisation and scored like every task (``init`` names the words)."""
    template, init = cfg.segment.control_template, f"word:{short_name(class_name)}"
    tid = (task_id or task_ids(cfg))(kind="control", template=template, init=init, class_index=class_index)
    return TaskSpec(tid, "control", None, template, init, int(tid[:8], 16), class_index=class_index,
                    class_name=class_name)


def detection_prompts(segment, class_index: int | None, class_name: str | None) -> list[str] | None:
    """Grounding DINO prompts for a class's images (``segment``: the config's section), in its order: one, or the
    class's candidates in ``segment.prompts`` (the images are scored with each); None when they are not scored."""
    if not segment.enabled or class_index is None:
        return None
    from dxray.segment import detection_prompt

    given = segment.prompts.get(class_index, class_name)
    return [detection_prompt(text) for text in ([given] if isinstance(given, str) else given)]
