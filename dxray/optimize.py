"""Optimise soft or hard prompts against objectives, then sample held-out images. No I/O.

Several tasks are optimised in one batch (each with its own prompt and rows);
the batch loss is the sum of per-task means, so tasks never influence each
other's gradients, and a task that stops (early stop or non-finite loss) simply
leaves the batch.

A hard prompt (``OptimizeSettings.hard``) learns logits over allowed token ids instead of rows:
each step draws straight-through Gumbel-softmax rows of the embedding table (annealed temperature),
injected exactly like soft rows; its result is the argmax tokens, their rows and their decoded text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


StepCallback = Callable[[int, list[OptimizeResult]], None]


def optimize(generator: LCMGenerator, classifier, targets: Sequence[Target], settings: OptimizeSettings,
             on_step: StepCallback | None = None) -> list[OptimizeResult]:
    """Optimise every target's prompt together; returns one result per target, in order."""
    soft_prompts = [generator.soft_prompt(t.template, t.n_tokens) for t in targets]
    hard = settings.hard
    lr = settings.lr
    if hard is None:
        params = [torch.nn.Parameter(generator.init_rows(t.n_tokens, t.init, t.seed).to(generator.device))
                  for t in targets]
        rows_of = lambda i, step, seed: params[i]  # noqa: E731
    else:
        vocab, table = hard_vocabulary(generator, hard)
        params = [torch.nn.Parameter(init_logits(generator, vocab, t)) for t in targets]  # logits stay on the CPU
        lr = hard.lr or settings.lr

        def rows_of(i, step, seed):
            tau = prompts.temperature(step, settings.steps, hard.tau_start, hard.tau_end)
            return prompts.hard_rows(params[i], table, tau, seed)

    opt_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=lr, weight_decay=settings.weight_decay)
    layers = sorted(set().union(*(t.objective.layers for t in targets)) - {"logits"})
    results = [OptimizeResult(rows=p.detach().cpu().clone(), init_seed=t.seed) for p, t in zip(params, targets, strict=True)]
    for r, p in zip(results, params, strict=True):
        if hard is not None:
            _set_discrete(r, p, vocab, table, generator.tokenizer)
        r.start_rows = r.rows
    active = list(range(len(targets)))
    done_groups: set[int] = set()
    s = settings.samples_per_step
    started = time.perf_counter()
    for step in range(settings.steps):
        if not active:
            break
        seeds = [[training_seed(targets[i].seed, step, j, s) for j in range(s)] for i in active]
        cond = generator.encode([soft_prompts[i] for i in active],
                                [rows_of(i, step, seeds[slot][0]) for slot, i in enumerate(active)])
        images = generator.generate(cond, seeds)
        acts = classifier(images, layers=layers)
        total = 0.0
        still = []
        for slot, i in enumerate(active):
            part = {k: v[slot * s:(slot + 1) * s] for k, v in acts.items()}
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
    for r, p in zip(results, params, strict=True):
        # Stopped tasks got no update after stopping: their rows (or logits) are the ones that did.
        if hard is None:
            r.rows = p.detach().cpu().clone()
        else:
            _set_discrete(r, p, vocab, table, generator.tokenizer)
        r.seconds = elapsed / max(len(targets), 1)
    return results


def hard_vocabulary(generator: LCMGenerator, hard: HardSettings) -> tuple[list[int], torch.Tensor]:
    """The allowed token ids and their embedding-table rows (V × D, float32, on the generator's device)."""
    vocab = prompts.vocabulary_ids(generator.tokenizer, hard.vocabulary)
    weight = prompts.embedding_table(generator.text_encoder).weight.detach()
    return vocab, weight[torch.tensor(vocab, device=weight.device)].float()


def init_logits(generator: LCMGenerator, vocab: Sequence[int], target: Target) -> torch.Tensor:
    gen = torch.Generator().manual_seed(target.seed)
    return prompts.init_logits(generator.tokenizer, vocab, target.n_tokens, target.init, gen)


def _set_discrete(res: OptimizeResult, logits: torch.Tensor, vocab, table: torch.Tensor, tokenizer) -> None:
    """A hard prompt's result: the argmax tokens, their embedding rows and their text."""
    cols = logits.detach().argmax(-1).to(table.device)
    res.token_ids = prompts.chosen_ids(logits, vocab)
    res.rows = table[cols].float().cpu().clone()
    res.text = prompts.decode(tokenizer, res.token_ids)


def best_of(results: Sequence[OptimizeResult]) -> OptimizeResult:
    """The restart with the lowest final loss (runs that failed lose to any that did not)."""
    return min(results, key=lambda r: (r.error is not None, r.final_loss if r.final_loss is not None else float("inf")))


@torch.no_grad()
def sample(generator: LCMGenerator, classifier, template: str, rows: torch.Tensor, seeds: Sequence[int], *,
           class_index: int | None = None, feature: tuple[str, int] | None = None, batch_size: int = 8) -> list[Sample]:
    """Render ``rows`` in ``template`` for each held-out seed, with the class probability and feature value."""
    prompt = generator.soft_prompt(template, rows.shape[0])
    cond = generator.encode([prompt], [rows.to(generator.device)])
    layers = [feature[0]] if feature else []
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
            ))
    return out
