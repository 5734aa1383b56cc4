"""The explainer: generator + classifier pinned on one device, optimising and sampling batches of
tasks. No table I/O, so the same object serves the in-process runner and a Ray actor."""

from __future__ import annotations

from dxray import prompts
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
from dxray.pipeline.rows import OPTIMISE, SAMPLE, Outcome, error_text
from dxray.pipeline.tasks import TaskSpec


def optimize_settings(o, prompt) -> OptimizeSettings:
    """The optimiser's settings from the ``optimize`` and ``prompt`` config sections."""
    h = prompt.hard
    hard = HardSettings(tau_start=h.tau_start, tau_end=h.tau_end, lr=h.lr,
                        vocabulary=h.vocabulary) if prompt.kind == "hard" else None
    return OptimizeSettings(steps=o.steps, lr=o.lr, optimizer=o.optimizer, weight_decay=o.weight_decay,
                            samples_per_step=o.samples_per_step, early_stop_prob=o.early_stop_prob, hard=hard)


class Explainer:
    """Optimises a batch of tasks together, then samples each; a failure becomes the task's error."""

    def __init__(self, cfg, generator=None, classifier=None):
        from dxray import models

        self.cfg = cfg
        self.generator = generator or models.load_generator(cfg.generator, device=cfg.device, cache_dir=cfg.cache_dir)
        self.classifier = classifier or models.load_classifier(cfg.classifier, device=self.generator.device,
                                                               cache_dir=cfg.cache_dir)
        self.settings = optimize_settings(cfg.optimize, cfg.prompt)
        if self.settings.hard is not None:  # a word that is not one token: one line now, before any optimisation
            prompts.vocabulary_ids(self.generator.tokenizer, self.settings.hard.vocabulary)

    def explain(self, specs: list[TaskSpec], on_step=None) -> list[Outcome]:
        """One outcome per spec, in order: controls are rendered, the other tasks optimised together."""
        controls = {id(s): self._control(s) for s in specs if s.kind == "control"}
        optimised = iter(self._optimise([s for s in specs if s.kind != "control"], on_step))
        return [controls[id(s)] if id(s) in controls else next(optimised) for s in specs]

    def _control(self, spec: TaskSpec) -> Outcome:
        """The segmenter control: the plain prompt (template + the class name's words), no optimisation."""
        g, s = self.generator, self.cfg.sample
        try:
            rows = prompts.word_rows(g.tokenizer, g.text_encoder, spec.init.removeprefix("word:"))
            samples = sample(g, self.classifier, spec.template, rows, s.seed_list(), class_index=spec.class_index,
                             batch_size=s.batch_size, penultimate=True)  # what a feature reaches unoptimised
        except Exception as err:
            return Outcome(spec, None, [], error_text(SAMPLE, err))
        return Outcome(spec, None, samples, None)

    def _optimise(self, specs: list[TaskSpec], on_step=None) -> list[Outcome]:
        if not specs:
            return []
        cfg = self.cfg
        r = cfg.optimize.restarts  # restart k of a task starts from seed + k; the lowest final loss wins
        targets = [Target(s.objective, s.template, cfg.prompt.n_tokens, s.init, s.seed + k, s.class_index,
                          stop_early=s.kind == "class", group=n) for n, s in enumerate(specs) for k in range(r)]
        try:
            runs = optimize(self.generator, self.classifier, targets, self.settings, on_step=on_step)
        except DxrayError:
            raise
        except Exception as err:  # one failing batch must not lose the rest of the run
            return [Outcome(s, None, [], error_text(OPTIMISE, err)) for s in specs]
        outcomes = []
        for i, spec in enumerate(specs):
            res = best_of(runs[i * r:(i + 1) * r])
            samples: list[Sample] = []
            error = None if res.error is None else error_text(OPTIMISE, res.error)
            if error is None:
                try:
                    samples = self._sample(spec, res)
                except Exception as err:
                    error = error_text(SAMPLE, err)
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
