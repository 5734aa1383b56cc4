import math

import pytest
import torch

from dxray.objectives import Objective, class_ce, neuron
from dxray.optimize import OptimizeSettings, Target, optimize, sample
from dxray.pipeline.ranking import choose_ranker


def test_optimize_records_curves_and_fresh_noise_each_step(tiny_generator, tiny_classifier):
    t = Target(class_ce(1), "a shape of {}", 2, "random", seed=5, class_index=1)
    [res] = optimize(tiny_generator, tiny_classifier, [t], OptimizeSettings(steps=3, lr=0.05, samples_per_step=2))
    assert res.error is None and res.steps == 3
    assert len(res.loss_curve) == len(res.prob_curve) == 3
    assert all(math.isfinite(x) for x in res.loss_curve) and all(0 <= p <= 1 for p in res.prob_curve)
    flat = [s for step in res.train_seeds for s in step]
    assert len(res.train_seeds) == 3 and len(set(flat)) == 6  # new noise every step
    assert res.rows.shape == (2, tiny_generator.embedding_dim)
    start = tiny_generator.init_rows(2, "random", 5)
    assert not torch.allclose(res.rows, start)  # the rows moved


def test_tasks_in_one_batch_do_not_influence_each_other(tiny_generator, tiny_classifier):
    a = Target(class_ce(0), "{}", 1, "random", seed=1, class_index=0)
    b = Target(class_ce(1) - neuron("penultimate", 3), "a texture of {}", 1, "word:cat", seed=2, class_index=1)
    settings = OptimizeSettings(steps=2, lr=0.1)
    together = optimize(tiny_generator, tiny_classifier, [a, b], settings)
    alone = optimize(tiny_generator, tiny_classifier, [b], settings)
    torch.testing.assert_close(together[1].rows, alone[0].rows, rtol=1e-4, atol=1e-6)
    assert together[1].loss_curve == pytest.approx(alone[0].loss_curve, rel=1e-4)


def test_non_finite_loss_stops_only_that_task(tiny_generator, tiny_classifier):
    bad = Objective(lambda acts: acts["logits"][:, 0] * float("nan"), "nan")
    good = Target(class_ce(0), "{}", 1, "random", seed=1, class_index=0)
    res_bad, res_good = optimize(tiny_generator, tiny_classifier, [Target(bad), good], OptimizeSettings(steps=3))
    assert res_bad.error == "non-finite loss (nan) at step 0" and res_bad.steps == 0
    assert res_good.error is None and res_good.steps == 3


def test_early_stop_on_target_probability(tiny_generator, tiny_classifier):
    t = Target(class_ce(0), "{}", 1, "random", seed=1, class_index=0)
    [res] = optimize(tiny_generator, tiny_classifier, [t], OptimizeSettings(steps=5, early_stop_prob=1e-9))
    assert res.stopped_early and res.steps == 1
    torch.testing.assert_close(res.rows, tiny_generator.init_rows(1, "random", 1))  # no update after reaching it


def test_sample_is_reproducible_and_scored(tiny_generator, tiny_classifier):
    rows = tiny_generator.init_rows(1, "random", 0)
    a = sample(tiny_generator, tiny_classifier, "{}", rows, [3, 4, 5], class_index=1, feature=("penultimate", 2),
               batch_size=2)
    b = sample(tiny_generator, tiny_classifier, "{}", rows, [5], class_index=1, feature=("penultimate", 2))
    assert [s.seed for s in a] == [3, 4, 5]
    assert (a[2].image == b[0].image).all() and a[2].class_prob == pytest.approx(b[0].class_prob, rel=1e-5)
    assert a[0].image.shape == (64, 64, 3) and a[0].image.dtype.name == "uint8"
    assert 0 <= a[0].class_prob <= 1 and a[0].feature_activation is not None
    with torch.no_grad():
        img = torch.from_numpy(a[0].image).permute(2, 0, 1)[None].float() / 255
        acts = tiny_classifier(img, layers=["penultimate"])
    assert acts["penultimate"][0, 2].item() == pytest.approx(a[0].feature_activation, abs=0.05)


def test_best_of_restarts_takes_the_lowest_final_loss():
    from dxray.optimize import OptimizeResult, best_of

    rows = torch.zeros(1, 2)
    a = OptimizeResult(rows, loss_curve=[3.0, 2.0], init_seed=1)
    b = OptimizeResult(rows, loss_curve=[3.0, 0.5], init_seed=2)
    failed = OptimizeResult(rows, loss_curve=[], error="non-finite loss (nan) at step 0", init_seed=3)
    assert best_of([a, b, failed]).init_seed == 2
    assert best_of([failed, a]).init_seed == 1


def _job(cfg):
    """A prepared in-process job and its runner (the pieces ``dxray explain`` drives)."""
    from dxray.pipeline.job import AuditJob
    from dxray.pipeline.local import LocalRunner

    job = AuditJob(cfg, "explain")
    job.preflight()
    runner = LocalRunner(cfg)
    job.prepare(choose_ranker(cfg.targets, lambda: runner.classifier))
    return job, runner


def test_restarts_in_the_audit_keep_the_winner_and_its_init(tiny_config):
    cfg = tiny_config.model_copy(update={"optimize": tiny_config.optimize.model_copy(update={"restarts": 2})})
    job, auditor = _job(cfg)
    spec = next(s for s in job.todo if s.kind == "class")
    rows = [job.commit(*t) for t in auditor.run_batch([spec], job.sink)]
    assert rows[0]["status"] == "ok"
    runs = optimize(auditor.generator, auditor.classifier,
                    [Target(spec.objective, spec.template, 1, spec.init, spec.seed + k, spec.class_index) for k in (0, 1)],
                    OptimizeSettings(steps=cfg.optimize.steps, lr=cfg.optimize.lr,
                                     samples_per_step=cfg.optimize.samples_per_step))
    best = min(runs, key=lambda r: r.final_loss)
    assert rows[0]["final_loss"] == pytest.approx(best.final_loss, rel=1e-5)


def test_early_stop_stops_class_tasks_but_not_feature_tasks(tiny_config):
    """early_stop_prob is about the class probability: a feature task (CE - λ·feature) runs all its steps."""
    cfg = tiny_config.model_copy(update={"optimize": tiny_config.optimize.model_copy(
        update={"early_stop_prob": 1e-9, "steps": 3})})
    job, auditor = _job(cfg)
    batch = [next(s for s in job.todo if s.kind == "class"), next(s for s in job.todo if s.kind == "feature")]
    rows = {r["kind"]: r for r in (job.commit(*t) for t in auditor.run_batch(batch, job.sink))}
    assert rows["class"]["stopped_early"] and rows["class"]["steps"] == 1
    assert not rows["feature"]["stopped_early"] and rows["feature"]["steps"] == 3


def test_a_restart_that_stops_early_stops_its_siblings_only(tiny_generator, tiny_classifier):
    """Restarts of one task share a group: the first to reach early_stop_prob ends the task."""
    def targets(groups):
        return [Target(class_ce(0), "{}", 1, "random", seed=s, class_index=0, group=g) for s, g in zip((1, 2, 3), groups, strict=True)]

    [p1, p2, p3] = [r.prob_curve[0] for r in optimize(tiny_generator, tiny_classifier, targets([None] * 3),
                                                      OptimizeSettings(steps=1))]
    assert p1 != p2  # step 0 depends only on the initial rows and seeds: the threshold below splits them
    hi, lo = (1, 2) if p1 > p2 else (2, 1)
    threshold = (p1 + p2) / 2
    assert p3 < threshold  # the third target (its own group) must not stop by itself
    res = optimize(tiny_generator, tiny_classifier, targets([0, 0, 1]),
                   OptimizeSettings(steps=3, early_stop_prob=threshold))
    first, sibling, other = res[hi - 1], res[lo - 1], res[2]
    assert first.stopped_early and first.steps == 1
    assert not sibling.stopped_early and sibling.steps == 1  # its group is done
    assert other.steps == 3  # another task's group runs on


def test_the_loop_goes_through_any_prompt_parameterisation(tiny_generator, tiny_classifier):
    """optimize() knows prompts only through PromptParam: a caller's own parameterisation (Lucent's
    param_f) gets each step's rows asked for with the step's first noise seed, its lr used, and its
    result fields written; a wrapper around the default soft prompts changes nothing."""
    from dxray.optimize import SoftPrompts, prompt_param

    g = tiny_generator
    targets = [Target(class_ce(c), "{}", 2, "random", seed=c + 3, class_index=c) for c in (0, 1)]
    settings = OptimizeSettings(steps=3, lr=0.1, samples_per_step=2)

    class Recording:
        def __init__(self, inner, lr):
            self.inner, self.lr, self.calls = inner, lr, []

        def parameters(self):
            return self.inner.parameters()

        def rows(self, i, step, seed):
            self.calls.append((i, step, seed))
            return self.inner.rows(i, step, seed)

        def result_fields(self, i):
            return self.inner.result_fields(i)

    default = optimize(g, tiny_classifier, targets, settings)
    assert isinstance(prompt_param(g, targets, settings), SoftPrompts)
    wrapped = Recording(prompt_param(g, targets, settings), settings.lr)
    same = optimize(g, tiny_classifier, targets, settings, param=wrapped)
    assert sorted(wrapped.calls) == sorted((i, step, same[i].train_seeds[step][0]) for i in (0, 1) for step in range(3))
    for a, b in zip(default, same, strict=True):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.start_rows, b.start_rows)
        assert a.loss_curve == b.loss_curve and a.train_seeds == b.train_seeds
    # The optimiser takes the parameterisation's lr, not settings.lr: at lr 0 nothing moves.
    frozen = optimize(g, tiny_classifier, targets, settings, param=Recording(prompt_param(g, targets, settings), 0.0))
    assert all(torch.equal(r.rows, r.start_rows) for r in frozen)
    assert not any(torch.equal(r.rows, r.start_rows) for r in default)

    class ScaledDirection:
        """Rows = a learnable scale × a fixed direction (a parameterisation optimize() has never heard of)."""

        lr = 0.5

        def __init__(self):
            self.direction = g.init_rows(2, "random", 0)
            self.scales = [torch.nn.Parameter(torch.ones(1)) for _ in targets]

        def parameters(self):
            return self.scales

        def rows(self, i, step, seed):
            return self.scales[i] * self.direction

        def result_fields(self, i):
            return {"rows": self.rows(i, 0, 0).detach().clone(), "text": f"scale {self.scales[i].item():.3f}"}

    scaled = ScaledDirection()
    results = optimize(g, tiny_classifier, targets, settings, param=scaled)
    for r, p in zip(results, scaled.scales, strict=True):
        assert torch.equal(r.start_rows, scaled.direction) and r.steps == 3
        assert p.item() != 1.0 and torch.equal(r.rows, (p * scaled.direction).detach())
        assert r.text == f"scale {p.item():.3f}"
    with pytest.raises(ValueError, match="2 targets but the prompt parameterisation has 1 parameters"):
        optimize(g, tiny_classifier, targets, settings, param=Recording(prompt_param(g, targets[:1], settings), 0.1))
