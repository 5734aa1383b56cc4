"""Optimise prompts against objectives, then sample held-out images. No I/O.

This module owns the optimisation loop (:func:`optimize`), picking the best restart (:func:`best_of`)
and rendering a result's rows for held-out seeds with their scores (:func:`sample`). It reads and
writes nothing: the caller (:class:`dxray.pipeline.explainer.Explainer`) builds targets and stores results.

Several tasks are optimised in one batch (each with its own prompt and rows);
the batch loss is the sum of per-task means, so tasks never influence each
other's gradients, and a task that stops (early stop or non-finite loss) simply
leaves the batch.

The loop never knows how a prompt is parameterised (like Lucent's ``render_vis(param_f=...)``): it
goes through a :class:`PromptParam`, which gives the parameters to optimise (one per target) and their
learning rate, each step's rows to inject, and the result fields (before the first step: the start,
for the baseline). :func:`prompt_param` builds one of the two from ``OptimizeSettings``:

- :class:`SoftPrompts` (``hard`` is None): the learnable rows are the parameters;
- :class:`HardPrompts` (``OptimizeSettings.hard``): logits over allowed token ids; each step draws
  straight-through Gumbel-softmax rows of the embedding table (annealed temperature), injected exactly
  like soft rows; its result is the argmax tokens, their rows and their decoded text.

A caller may pass its own parameterisation: ``optimize(..., param=...)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from dxray import prompts
from dxray.generator import LCMGenerator, training_seed
from dxray.objectives import Objective


@dataclass
class Target:
    """One optimisation task: an objective and the prompt that will learn it."""

    objective: Objective
    template: str = "{}"
    n_tokens: int = 1
    init: str = "random"
    seed: int = 0
    class_index: int | None = None  # for the target probability (and early stop)
    # Stop once the target probability reaches OptimizeSettings.early_stop_prob. Only for a pure class
    # objective: a feature task (CE - λ·feature) that stopped on its class probability would skip the
    # feature term it exists for.
    stop_early: bool = True
    # Restarts of one task share a group: once one of them stops early the others stop too (the task
    # has its answer; the rest would only spend compute on a worse or equal one).
    group: int | None = None


@dataclass
class HardSettings:
    """Hard prompts: the Gumbel-softmax temperature anneals exponentially from tau_start to tau_end."""

    tau_start: float = 1.0
    tau_end: float = 0.1
    lr: float | None = None  # learning rate of the logits; None: OptimizeSettings.lr
    vocabulary: Sequence[str] | None = None  # allowed words (single tokens each); None: every whole-word token


@dataclass
class OptimizeSettings:
    steps: int = 100
    lr: float = 0.1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    samples_per_step: int = 1
    early_stop_prob: float | None = None
    hard: HardSettings | None = None  # None: soft prompts


@dataclass
class OptimizeResult:
    rows: torch.Tensor  # learnable rows (n_tokens × D, float32, CPU)
    loss_curve: list[float] = field(default_factory=list)
    prob_curve: list[float] = field(default_factory=list)
    train_seeds: list[list[int]] = field(default_factory=list)  # seeds of each step's S noise samples
    stopped_early: bool = False
    error: str | None = None
    seconds: float = 0.0
    baseline_prob: float | None = None  # held-out class probability with the initial rows (set by the caller)
    init_seed: int | None = None  # seed of the initial rows that produced this result
    start_rows: torch.Tensor | None = None  # the initial prompt's rows (hard: its argmax tokens' rows), for the baseline
    token_ids: list[int] | None = None  # hard prompt: the chosen (argmax) token ids
    text: str | None = None  # hard prompt: the chosen tokens, decoded
    # Hard prompt: the loss of the returned (argmax) prompt on the last step's seeds. Each step's loss is a
    # Gumbel draw's, whose tokens can differ from the argmax: best_of ranks restarts by this when it is set.
    chosen_loss: float | None = None

    @property
    def steps(self) -> int:
        return len(self.loss_curve)

    @property
    def final_loss(self) -> float | None:
        return self.loss_curve[-1] if self.loss_curve else None

    @property
    def target_prob(self) -> float | None:
        return self.prob_curve[-1] if self.prob_curve else None


@dataclass
class Sample:
    seed: int
    image: np.ndarray  # H × W × 3 uint8
    class_prob: float | None
    feature_activation: float | None
    penultimate: np.ndarray | None = None  # the classifier's penultimate features (``sample(penultimate=True)``)


StepCallback = Callable[[int, list[OptimizeResult]], None]


# -- prompt parameterisations --------------------------------------------------------------------
class PromptParam(Protocol):
    """How every target's prompt is parameterised: the loop in :func:`optimize` only goes through this.

    ``parameters()`` are what the optimiser updates, one per target, in target order (the loop drops a
    stopped task's gradient by that index); ``lr`` is the learning rate they want; ``rows(i, step, seed)``
    are target ``i``'s rows (n_tokens × D) to inject at ``step``, differentiable in its parameter (``seed``:
    the step's first noise seed, for a parameterisation that draws); ``result_fields(i)`` are the
    :class:`OptimizeResult` fields that describe target ``i``'s prompt now: ``rows`` (float32, CPU) and
    whatever else it has (hard: ``token_ids``, ``text``). Called before the first step it gives the start
    (``start_rows``, for the baseline); after the last, the result. An optional ``draws = True`` says each step's
    rows are a random draw rather than the prompt ``result_fields`` returns (hard prompts): the returned prompt is
    then scored once more on the last step's seeds (``OptimizeResult.chosen_loss``), for :func:`best_of`.
    """

    lr: float

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def rows(self, i: int, step: int, seed: int) -> torch.Tensor: ...

    def result_fields(self, i: int) -> dict[str, Any]: ...


class SoftPrompts:
    """Soft prompts: each target's learnable rows are its parameter (on the generator's device)."""

    draws = False

    def __init__(self, generator: LCMGenerator, targets: Sequence[Target], lr: float):
        self.lr = lr
        self.params = [torch.nn.Parameter(generator.init_rows(t.n_tokens, t.init, t.seed).to(generator.device))
                       for t in targets]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def rows(self, i: int, step: int, seed: int) -> torch.Tensor:
        return self.params[i]

    def result_fields(self, i: int) -> dict[str, Any]:
        return {"rows": self.params[i].detach().cpu().clone()}


class HardPrompts:
    """Hard prompts: per target, logits (n_tokens × V, on the CPU) over the allowed token ids. Each step's
    rows are a straight-through Gumbel-softmax draw of embedding-table rows (seeded by the step's first
    noise seed) at the annealed temperature; the prompt is the argmax tokens, their rows and their text."""

    draws = True

    def __init__(self, generator: LCMGenerator, targets: Sequence[Target], hard: HardSettings, steps: int, lr: float):
        self.hard, self.steps, self.lr = hard, steps, lr
        self.tokenizer = generator.tokenizer
        self.vocab, self.table = hard_vocabulary(generator, hard)
        self.params = [torch.nn.Parameter(init_logits(generator, self.vocab, t)) for t in targets]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def rows(self, i: int, step: int, seed: int) -> torch.Tensor:
        tau = prompts.temperature(step, self.steps, self.hard.tau_start, self.hard.tau_end)
        return prompts.hard_rows(self.params[i], self.table, tau, seed)

    def result_fields(self, i: int) -> dict[str, Any]:
        logits = self.params[i].detach()
        token_ids = prompts.chosen_ids(logits, self.vocab)
        rows = self.table[logits.argmax(-1).to(self.table.device)].float().cpu().clone()
        return {"rows": rows, "token_ids": token_ids, "text": prompts.decode(self.tokenizer, token_ids)}


def prompt_param(generator: LCMGenerator, targets: Sequence[Target], settings: OptimizeSettings) -> PromptParam:
    """The parameterisation ``settings`` asks for: hard prompts when ``settings.hard`` is set, else soft.
    Draws every target's initial rows or logits, in target order."""
    hard = settings.hard
    if hard is None:
        return SoftPrompts(generator, targets, settings.lr)
    return HardPrompts(generator, targets, hard, settings.steps, hard.lr or settings.lr)


def optimize(generator: LCMGenerator, classifier, targets: Sequence[Target], settings: OptimizeSettings,
             on_step: StepCallback | None = None, *, param: PromptParam | None = None) -> list[OptimizeResult]:
    """Optimise every target's prompt together; returns one result per target, in order.

    ``param``: the prompts' parameterisation (default: :func:`prompt_param` of ``settings``), built for
    these targets; ``settings.hard`` is then only read by whoever built it.
    """
    soft_prompts = [generator.soft_prompt(t.template, t.n_tokens) for t in targets]
    if param is None:
        param = prompt_param(generator, targets, settings)
    params = param.parameters()
    if len(params) != len(targets):
        raise ValueError(f"{len(targets)} targets but the prompt parameterisation has {len(params)} parameters")
    opt_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=param.lr, weight_decay=settings.weight_decay)
    layers = sorted(set().union(*(t.objective.layers for t in targets)) - {"logits"})
    results = [OptimizeResult(**param.result_fields(i), init_seed=t.seed) for i, t in enumerate(targets)]
    for r in results:
        r.start_rows = r.rows
    active = list(range(len(targets)))
    done_groups: set[int] = set()
    s = settings.samples_per_step
    started = time.perf_counter()
    for step in range(settings.steps):
        if not active:
            break
        seeds = [[training_seed(targets[i].seed, step, j, s) for j in range(s)] for i in active]
        parts = _activations(generator, classifier, [soft_prompts[i] for i in active],
                             [param.rows(i, step, seeds[slot][0]) for slot, i in enumerate(active)], seeds, layers)
        total = 0.0
        still = []
        for slot, (i, part) in enumerate(zip(active, parts, strict=True)):
            loss = targets[i].objective(part).mean()
            res = results[i]
            res.train_seeds.append(seeds[slot])
            if not torch.isfinite(loss):
                res.error = f"non-finite loss ({loss.item()}) at step {step}"
                continue
            total = total + loss
            res.loss_curve.append(loss.item())
            c = targets[i].class_index
            if c is not None:
                prob = part["logits"].float().softmax(-1)[:, c].mean().item()
                res.prob_curve.append(prob)
                if targets[i].stop_early and settings.early_stop_prob is not None and prob >= settings.early_stop_prob:
                    res.stopped_early = True
                    if targets[i].group is not None:
                        done_groups.add(targets[i].group)
                    continue  # keep the rows that reached the target: no update for this task
            still.append(i)
        still = [i for i in still if targets[i].group is None or targets[i].group not in done_groups]
        opt.zero_grad(set_to_none=True)
        if still:
            # Stopped tasks are in `total` too, but their rows get no update: the optimiser only steps
            # params whose grad we keep.
            total.backward()
            for i in set(active) - set(still):
                params[i].grad = None
            opt.step()
        active = still
        if on_step is not None:
            on_step(step, results)
    elapsed = time.perf_counter() - started
    for i, r in enumerate(results):
        # Stopped tasks got no update after stopping: their parameters are the ones that reached the target.
        for name, value in param.result_fields(i).items():
            setattr(r, name, value)
        r.seconds = elapsed / max(len(targets), 1)
    if getattr(param, "draws", False):
        _score_chosen(generator, classifier, targets, results, soft_prompts, layers)
    return results


def _score_chosen(generator: LCMGenerator, classifier, targets: Sequence[Target], results: list[OptimizeResult],
                  soft_prompts: list, layers: list[str]) -> None:
    """Set ``chosen_loss``: each returned prompt's loss on its last step's seeds, in one batch (one step's forward,
    no graph). Measured on the toy world's hard-prompt test: a restart whose last draw scored 0.01 returned a prompt
    scoring 8.4 on the same seeds, and picking by the draw made 2 of 6 classes worse than their start."""
    scored = [i for i, r in enumerate(results) if r.error is None and r.train_seeds]
    if not scored:
        return
    with torch.no_grad():
        parts = _activations(generator, classifier, [soft_prompts[i] for i in scored],
                             [results[i].rows.to(generator.device) for i in scored],
                             [results[i].train_seeds[-1] for i in scored], layers)
    for i, part in zip(scored, parts, strict=True):
        results[i].chosen_loss = targets[i].objective(part).mean().item()


def _activations(generator: LCMGenerator, classifier, soft_prompts: list, rows: list[torch.Tensor],
                 seeds: list[list[int]], layers: list[str]) -> list[dict[str, torch.Tensor]]:
    """Render each prompt's rows with its own seeds in one batch; per prompt, the classifier's outputs on its images."""
    acts = classifier(generator.generate(generator.encode(soft_prompts, rows), seeds), layers=layers)
    ends = np.cumsum([len(x) for x in seeds]).tolist()
    return [{k: v[end - len(x):end] for k, v in acts.items()} for x, end in zip(seeds, ends, strict=True)]


def hard_vocabulary(generator: LCMGenerator, hard: HardSettings) -> tuple[list[int], torch.Tensor]:
    """The allowed token ids and their embedding-table rows (V × D, float32, on the generator's device)."""
    vocab = prompts.vocabulary_ids(generator.tokenizer, hard.vocabulary)
    weight = prompts.embedding_table(generator.text_encoder).weight.detach()
    return vocab, weight[torch.tensor(vocab, device=weight.device)].float()


def init_logits(generator: LCMGenerator, vocab: Sequence[int], target: Target) -> torch.Tensor:
    """A target's initial hard-prompt logits (n_tokens × len(vocab), CPU), drawn from its seed."""
    gen = torch.Generator().manual_seed(target.seed)
    return prompts.init_logits(generator.tokenizer, vocab, target.n_tokens, target.init, gen)


def best_of(results: Sequence[OptimizeResult]) -> OptimizeResult:
    """The restart with the lowest final loss, or, for hard prompts, the lowest ``chosen_loss`` (the returned words'
    own loss; the last step's is a random draw's). Runs that failed lose to any that did not."""
    def loss(r: OptimizeResult) -> float:
        got = r.chosen_loss if r.chosen_loss is not None else r.final_loss
        return float("inf") if got is None or not math.isfinite(got) else got

    return min(results, key=lambda r: (r.error is not None, loss(r)))


@torch.no_grad()
def sample(generator: LCMGenerator, classifier, template: str, rows: torch.Tensor, seeds: Sequence[int], *,
           class_index: int | None = None, feature: tuple[str, int] | None = None, batch_size: int = 8,
           penultimate: bool = False) -> list[Sample]:
    """Render ``rows`` in ``template`` for each held-out seed, with the class probability and feature value (and, with
    ``penultimate``, every penultimate feature)."""
    prompt = generator.soft_prompt(template, rows.shape[0])
    cond = generator.encode([prompt], [rows.to(generator.device)])
    layers = list(dict.fromkeys(([feature[0]] if feature else []) + (["penultimate"] if penultimate else [])))
    out: list[Sample] = []
    for start in range(0, len(seeds), batch_size):
        chunk = [int(x) for x in seeds[start:start + batch_size]]
        images = generator.generate(cond, [chunk])
        acts = classifier(images, layers=layers)
        probs = acts["logits"].float().softmax(-1)
        feats = None
        if feature:
            f = acts[feature[0]][:, feature[1]].float()
            feats = f.flatten(1).mean(1) if f.dim() > 1 else f
        pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for j, seed in enumerate(chunk):
            out.append(Sample(
                seed=seed, image=pixels[j],
                class_prob=None if class_index is None else probs[j, class_index].item(),
                feature_activation=None if feats is None else feats[j].item(),
                penultimate=acts["penultimate"][j].float().cpu().numpy() if penultimate else None,
            ))
    return out
