"""`dxray audit --dry-run` (the plan and its cost, no model, no Ray) and the CLI's help texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT, TINY_YAML

from dxray.classifiers import ClassifierInfo
from dxray.config import load_config
from dxray.plan_estimate import dry_run, estimate, load_figures, render

DXRAY = [sys.executable, "-m", "dxray"]
TINY_INFO = ClassifierInfo("hf:tiny", 2, ["goldfish", "tabby cat"], ["logits", "penultimate"], 16)


def _tiny(tmp_path, *overrides, cache=None):
    return load_config(TINY_YAML, [f"output={tmp_path / 'out'}", *([f"cache_dir={cache}"] if cache else []), *overrides])


@pytest.mark.parametrize("extra", [[], ["targets.features={0: [1, 2]}"], ["segment.control=true"]],
                         ids=["top_k", "explicit-features", "control"])
def test_counts_equal_an_independent_computation(tmp_path, cache_dir, tiny_classifier, extra):
    from dxray.pipeline.preflight import preflight
    from dxray.pipeline.ranking import choose_ranker, rank_features
    from dxray.pipeline.tasks import plan

    overrides = ["targets.top_k=3", 'prompt.templates=["{}", "a photo of {}"]', "optimize.restarts=2", "sample.k=3",
                 "targets.neurons=[{layer: penultimate, unit: 1}]", *extra]
    cfg = _tiny(tmp_path, *overrides, cache=cache_dir)
    p = dry_run(cfg, figures=[])

    # By hand: 2 classes, 2 templates, top_k 3 (or 2 explicit features for class 0), 1 neuron;
    # tiny.yaml: 5 steps, 2 noise samples per step; restarts 2, k 3; baseline and segmentation on.
    # The segmenter control (tiny.yaml has it off): one per class, rendered and scored, never optimised.
    features = 3 + (2 if "targets.features={0: [1, 2]}" in extra else 3)
    controls = 2 if "segment.control=true" in extra else 0
    kinds = {"class": 2 * 2, "feature": features * 2, "neuron": 1 * 2}
    tasks = sum(kinds.values())
    with_class = kinds["class"] + kinds["feature"]
    assert p.classes == 2 and p.templates == ["{}", "a photo of {}"] and p.tasks == {**kinds, "control": controls}
    assert p.optimisation_steps == tasks * 2 * 5
    assert p.held_out_images == (tasks + controls) * 3 and p.baseline_images == with_class * 3
    assert p.training_images == tasks * 2 * 5 * 2
    assert p.images_to_generate == (tasks + controls) * 3 + with_class * 3 + tasks * 2 * 5 * 2
    assert p.segment_images == (with_class + controls) * 3

    # ... and what the real planner makes of the same config, with the loaded classifier's ranking.
    info = preflight(cfg)
    specs = plan(cfg, info, rank_features(cfg.targets, choose_ranker(cfg.targets, lambda: tiny_classifier)))
    assert dict(Counter(s.kind for s in specs)) == {**kinds, **({"control": controls} if controls else {})}


def test_segmentation_off_and_no_baseline(tmp_path):
    cfg = _tiny(tmp_path, "segment.enabled=false", "sample.baseline=false", "targets.class_task=false")
    p = estimate(cfg, TINY_INFO)
    assert p.tasks == {"class": 0, "feature": 2, "neuron": 0, "control": 0}
    assert p.segment_images == 0 and p.baseline_images == 0 and p.held_out_images == 2 * 4


def test_estimate_uses_the_configured_seconds(tmp_path):
    cfg = _tiny(tmp_path, "estimate.seconds_per_step=2.5", "estimate.seconds_per_image=0.5")
    p = estimate(cfg, TINY_INFO, load_figures(ROOT / 'benchmarks' / 'results'))
    assert p.step.seconds == 2.5 and p.step.source == "estimate.seconds_per_step"
    assert p.image.seconds == 0.5 and p.image.source == "estimate.seconds_per_image"
    expected = (p.optimisation_steps * 2.5 + (p.held_out_images + p.baseline_images) * 0.5) / 3600
    assert p.gpu_hours == pytest.approx(expected)
    assert p.optimisation_steps == 4 * 5 and p.held_out_images + p.baseline_images == 4 * 4 * 2


def test_estimate_from_the_committed_benchmark_or_says_what_it_needs(tmp_path):
    bench = json.loads((ROOT / "benchmarks" / "results" / "sampler-tiny-64.json").read_text())
    p = estimate(_tiny(tmp_path), TINY_INFO, load_figures(ROOT / 'benchmarks' / 'results'))  # tiny preset: 64 px, 4 steps, no checkpointing
    assert p.step.seconds == pytest.approx(bench["opt_step_s"] * 2)  # 2 noise samples per step
    assert "sampler-tiny-64.json" in p.step.source and "CPU" in p.step.source
    assert "segment-tiny-128.json" in p.image.source and p.gpu_hours is not None

    p = estimate(_tiny(tmp_path, "generator.resolution=128"), TINY_INFO, load_figures(ROOT / 'benchmarks' / 'results'))
    assert p.gpu_hours is None and p.step.seconds is None and p.optimisation_steps == 20
    assert any("does not match 128 px" in n for n in p.notes)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render(p))
    text = console.export_text()
    assert "estimate.seconds_per_step" in text and "optimisation steps" in text


def test_dry_run_describes_aliases_without_building_them(tmp_path):
    empty = tmp_path / "cache"
    p = dry_run(load_config(ROOT / "jobs" / "configs" / "toyworld.yaml", [f"output={tmp_path / 'out'}", f"cache_dir={empty}"]),
                figures=[])
    assert p.tasks == {"class": 6, "feature": 6, "neuron": 0, "control": 6} and p.optimisation_steps == 12 * 5 * 60
    p = dry_run(_tiny(tmp_path, cache=empty), figures=[])
    assert p.tasks == {"class": 2, "feature": 2, "neuron": 0, "control": 0}
    assert not empty.exists() or not any(empty.iterdir())  # nothing trained, built or saved


def _cli(*args, cache, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"DXRAY_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*DXRAY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_dry_run_command_loads_no_model_and_starts_no_ray(tmp_path):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    r = _cli("audit", str(TINY_YAML), "classifier.spec=tiny", f"output={tmp_path / 'out'}", "targets.top_k=2",
             "--dry-run", cache=cache)
    assert r.returncode == 0, r.stderr
    assert list(cache.iterdir()) == []  # the tiny models were not built
    assert "Ray" not in r.stdout + r.stderr and "loading" not in r.stderr.lower()
    text = " ".join(r.stdout.split())
    assert "tasks: feature │ 4" in text and "optimisation steps │ 30" in text and "images to segment │ 24" in text

    bad = _cli("audit", str(TINY_YAML), "classifier.spec=tiny", "targets.classes=[7]", "--dry-run", cache=cache)
    assert bad.returncode == 2 and "out of range" in bad.stderr and list(cache.iterdir()) == []


def _commands() -> list[list[str]]:
    """Every command of the app, sub-groups included (a new command is checked without listing it here)."""
    import typer

    from dxray.cli import app

    def walk(group, prefix: list[str]) -> list[list[str]]:
        out = []
        for name, cmd in sorted(group.commands.items()):
            out += walk(cmd, [*prefix, name]) if hasattr(cmd, "commands") else [[*prefix, name]]
        return out

    return walk(typer.main.get_command(app), [])


COMMANDS = _commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_help_has_an_example(command, tmp_path):
    r = _cli(*command, "--help", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Example:" in r.stdout and "dxray " + " ".join(command) in " ".join(r.stdout.split())


def test_app_help_documents_exit_codes(tmp_path):
    r = _cli("--help", cache=tmp_path)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "Exit codes: 0 success; 1" in text and "2 bad input, configuration or storage error" in text


def test_an_analytic_estimate_when_no_measured_figure_fits(tmp_path):
    """Issue 34: the full-ImageNet config (SD1.5 at 512 px) matches no committed benchmark, so the dry run counts the
    configured models' FLOPs on the meta device and gives GPU-hours at a stated MFU of a named GPU, labelled
    analytic; a configured or measured figure still wins over it."""
    full = ROOT / "jobs" / "configs" / "imagenet_full.yaml"
    figures = load_figures(ROOT / "benchmarks" / "results")
    plan = dry_run(load_config(full, [f"output={tmp_path}"]), figures=figures, warn=lambda m: None)
    assert plan.step.source.startswith("analytic") and plan.image.source.startswith("analytic")
    assert "40% MFU of an H100" in plan.step.source and any("analytic estimate" in n for n in plan.notes)
    assert plan.gpu_hours > 0
    # torchvision documents ResNet-50 at 4.09 GMAC per 224 px image: 8.2 GFLOP forward, twice that with the
    # backward to the input (the classifier's weights are frozen); SD1.5 dominates the step by far
    from dxray.classifiers import count_flops

    forward, backward = count_flops("torchvision:resnet50")
    assert forward == pytest.approx(2 * 4.09e9, rel=0.01) and backward == pytest.approx(2 * forward, rel=0.01)
    # the stated assumptions move the figure as they should: half the MFU is twice the time, an A100 its slower peak
    half = dry_run(load_config(full, [f"output={tmp_path}", "estimate.mfu=0.2"]), figures=figures, warn=lambda m: None)
    assert half.step.seconds == pytest.approx(2 * plan.step.seconds)
    a100 = dry_run(load_config(full, [f"output={tmp_path}", "estimate.gpu=a100"]), figures=figures, warn=lambda m: None)
    assert a100.step.seconds == pytest.approx(plan.step.seconds * 989 / 312) and "A100" in a100.step.source
    given = dry_run(load_config(full, [f"output={tmp_path}", "estimate.seconds_per_step=1.5"]), figures=figures,
                    warn=lambda m: None)
    assert (given.step.seconds, given.step.source) == (1.5, "estimate.seconds_per_step")
    assert given.image.seconds == pytest.approx(plan.image.seconds)  # the other figure stays analytic


def test_the_dry_run_command_prints_analytic_gpu_hours_for_the_full_imagenet_config(tmp_path):
    res = _cli("audit", "jobs/configs/imagenet_full.yaml", "--dry-run", f"output={tmp_path / 'out'}", cache=tmp_path)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.replace("│", " ").split())
    assert "GPU-h analytic estimate" in text and "no measured benchmark fits" in text
