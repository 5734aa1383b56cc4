"""World v5 (issue 31): a generator that can draw every shortcut, and classifiers of each family trained at each
planted strength ρ, built from a world seed into the cache, each with its known answer.

Layout: ``<cache>/toyworld-v5/seed-S/generator`` and ``.../classifier-{family}-rho{ρ}`` (``hf:`` folders with a
``toyworld.json`` truth). A classifier's class-level truth is measured, not assumed: a planted class is
*biased* when its shortcuts alone name it (mean p ≥ 0.5 on the probes that carry a shortcut without the
class's object) and its object alone does not, *unbiased* when the object names it and no shortcut does, and
*ambiguous* otherwise (both cues name it: an explanation showing either is right), left out of the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dxray.cache import build_once, cache_root
from dxray.toyworld import render, shortcuts
from dxray.toyworld.train import Log, log_to_stderr

VERSION = 5
WORDS = ("with", "mark", render.MARKER_COLOUR[0], render.PATTERN_COLOUR[0])  # the v5 captions' new words
GENERATOR_IMAGES = 4000
# v4's 500 UNet steps drew the longer v5 captions worse: hard prompts of every class on four backgrounds (world
# seed 0, 8 images each) showed the object 46% of the time at 500 steps and 55% at 1000, v4's generator 67%
# (benchmarks/README.md, "World v5").
GENERATOR_UNET_STEPS = 1000
CLASSIFIER_IMAGES = 3000
NAMES = 0.5  # a cue names a class when its probes' mean probability of the class reaches this


def world_folder(cache_dir=None, seed: int = 0) -> Path:
    return cache_root(cache_dir) / f"toyworld-v{VERSION}" / f"seed-{seed}"


def classifier_name(family: str, rho: float) -> str:
    return f"classifier-{family}-rho{rho:g}"


def tokenizer():
    from dxray.toyworld.train import world_tokenizer

    return world_tokenizer(WORDS)


def ensure_generator(cache_dir=None, seed: int = 0, log: Log = log_to_stderr) -> Path:
    """The v5 generator of a world seed (trained once, 3-4 min on one thread): it learned every class on every
    background, with markers and patterns on a quarter of its images each, whatever the class."""
    from dxray.toyworld.train import one_thread, train_generator

    def build(tmp: Path) -> None:
        log(f"training the v5 toy world's generator (world seed {seed}) into {tmp.parent}")
        with one_thread():
            train_generator(tmp, seed=seed, scenes=shortcuts.generator_dataset(GENERATOR_IMAGES, seed),
                            tokenizer=tokenizer(), unet_steps=GENERATOR_UNET_STEPS, log=log)

    return build_once(world_folder(cache_dir, seed) / "generator", build)


def train_classifier(out: Path, *, seed: int = 0, rho: float = 1.0, family: str = "cnn", n: int = CLASSIFIER_IMAGES,
                     steps: int | None = None, log: Log = log_to_stderr) -> dict:
    """Train a classifier of ``family`` at planted strength ``rho`` into ``out`` and write its truth there
    (``toyworld.json``, :func:`class_truth`), which it returns. Its random "no object" backgrounds keep away
    from every shortcut colour, so that a shortcut can only name its class; at ρ = 0 nothing is planted and
    they do not (a bare purple is then nothing, as any colour)."""
    from dxray.classifiers import load_classifier
    from dxray.toyworld.train import one_thread
    from dxray.toyworld.train import train_classifier as train

    with one_thread():
        report = train(out, seed=seed, family=family, log=log, n=n, steps=steps,
                       dataset=shortcuts.classifier_dataset(n, seed, rho),
                       avoid=shortcuts.shortcut_colours() if rho > 0 else [])
        truth = class_truth(load_classifier(f"hf:{out}", device="cpu"), seed, rho, family, report["held_out_accuracy"])
    (out / "toyworld.json").write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n")
    return truth


def ensure_classifier(cache_dir=None, seed: int = 0, rho: float = 1.0, family: str = "cnn",
                      log: Log = log_to_stderr) -> Path:
    """The classifier of a world seed, family and planted strength in the cache, with its truth: world seed 0's
    ship with dxray (:data:`shipped.V5`) and are copied, verified against their pins on every call (training
    depends on the CPU's float kernels); any other is trained once."""
    from dxray.toyworld import shipped

    name = classifier_name(family, rho)
    copy = shipped.v5_available(seed, name)

    def build(tmp: Path) -> None:
        if copy:
            shipped.install(tmp, (f"v5-{name}",), flat=True)
            (tmp / ".shipped").touch()  # a copy (checked on every call), not one trained here before it shipped
            return
        log(f"training the v5 toy world's {family} at rho {rho:g} (world seed {seed})")
        train_classifier(tmp, seed=seed, rho=rho, family=family, log=log)

    built = build_once(world_folder(cache_dir, seed) / name, build)
    if (built / ".shipped").exists():
        shipped.verify_model(built, f"v5-{name}")
    return built


def _probabilities(classifier, scenes: list[render.Scene], class_index: int) -> float:

    with torch.no_grad():
        logits = classifier(render.unit_images(scenes), layers=["logits"])["logits"].float()
    return float(logits.softmax(-1)[:, class_index].mean())


def class_truth(classifier, seed: int, rho: float, family: str, held_out_accuracy: float | None = None) -> dict:
    """The classifier's ``toyworld.json``: the plan, and per planted class what its object alone and each
    shortcut alone make of it (mean probability of the class), with the class-level call (module doc)."""
    biased, unbiased, ambiguous, measured = {}, [], [], {}
    for c in range(len(render.CLASSES)):
        probes = shortcuts.probes(c, seed=seed)
        p_object = _probabilities(classifier, probes["object"][0], c)
        p_cuts = {kind: _probabilities(classifier, probes[kind][0], c) for kind in probes if kind != "object"}
        measured[str(c)] = {"object": p_object, **p_cuts}
        named = [cut.concept for cut in shortcuts.PLANTED.get(c, ()) if p_cuts[cut.kind] >= NAMES]
        if named and p_object < NAMES:
            biased[str(c)] = named[0]
        elif not named and p_object >= NAMES:
            unbiased.append(c)
        else:
            ambiguous.append(c)
    return {
        "classes": render.CLASS_NAMES, "no_object_label": len(render.CLASSES), "world_version": VERSION,
        "world_seed": seed, "family": family, "rho": rho, "held_out_accuracy": held_out_accuracy,
        "planted": {str(c): [{"kind": cut.kind, "concept": cut.concept} for cut in cuts]
                    for c, cuts in shortcuts.PLANTED.items()} if rho > 0 else {},
        "biased": biased, "unbiased": unbiased, "ambiguous": ambiguous, "cue_probability": measured,
        "names_threshold": NAMES,
    }


def feature_truth(classifier, classes: list[int] | None = None, features: list[int] | None = None,
                  seed: int = 0, biased=None) -> list[dict]:
    """The v5 feature-level known answer: one row per (class, feature), core / spurious / ambiguous by the v4 rule
    (:func:`feature_truth.call`), with the shortcut response the strongest of the class's shortcuts':

    - object response ``o``: the class's plain object on neutral backgrounds minus the bare neutral backgrounds;
    - shortcut responses (:func:`shortcuts.probes`): a background's is its bare mean minus the baseline z (as v4
      measures it; an unplanted class's background is the strongest neutral one, as in v4); a marker's and a
      pattern's what adding it changes (with minus without);
    - the baseline z as :func:`feature_truth.floor` takes it (rectified: 0; signed: the lowest mean over the
      bare colours and every class's objects), the scale a magnitude over the bare colours, the object and
      every probe.

    The row's ``kind`` names the shortcut behind a spurious label; its ``planted_biased`` says whether the class
    is in ``biased`` (the class truth's biased classes; default every planted class)."""
    from dxray.toyworld import feature_truth as ft

    classes = list(range(len(render.CLASSES))) if classes is None else classes
    biased = set(shortcuts.PLANTED) if biased is None else {int(c) for c in biased}
    bare = torch.stack([ft.penultimate(classifier, [render.Scene(b, t) for t in render.TEXTURES]).mean(0)
                        for b in render.BACKGROUND_COLOURS])  # colours x features
    signed = ft.is_signed(bare)
    probed = {c: {kind: (ft.penultimate(classifier, with_it).mean(0), ft.penultimate(classifier, without).mean(0))
                  for kind, (with_it, without) in shortcuts.probes(c, seed=seed).items()}
              for c in (range(len(render.CLASSES)) if signed else classes)}  # a signed floor takes every class
    z = ft.floor(bare, torch.stack([m["object"][0] for m in probed.values()]), signed)
    rows = []
    for c in classes:
        means = probed[c]
        o = means["object"][0] - means["object"][1]
        cuts = {kind: (w - z if kind == "background" else w - wo) for kind, (w, wo) in means.items() if kind != "object"}
        if c not in shortcuts.PLANTED:  # as v4: an unplanted class's background is the strongest neutral one
            neutral = [i for i, b in enumerate(render.BACKGROUND_COLOURS) if b in shortcuts.NEUTRAL_BACKGROUNDS]
            cuts["background"] = bare[neutral].max(0).values - z
        peaks = torch.stack([(bare - z).abs().max(0).values] + [(w - z).abs() for w, _ in means.values()])
        scale = peaks.max(0).values
        for f in range(o.numel()) if features is None else features:
            kind, s = max(((k, float(v[f])) for k, v in cuts.items()), key=lambda kv: kv[1], default=(None, 0.0))
            label = ft.call(float(o[f]), s, float(scale[f]))
            rows.append({"class_index": c, "class_name": render.CLASS_NAMES[c], "feature_index": int(f),
                         "planted_biased": c in biased, "truth": label,
                         "kind": kind if label == "spurious" else None, "object_response": float(o[f]),
                         "background_response": s, "shortcut_responses": {k: float(v[f]) for k, v in cuts.items()},
                         "scale": float(scale[f]), "signed": signed})
    return rows


def generator_fidelity(generator: str | Path, classifier, images: int = 8, seed: int = 0,
                       backgrounds=("teal", "pink", "brown", "purple")) -> dict:
    """How often the generator draws what a plain prompt asks: per class, on ``backgrounds``, ``images`` images of
    "a {colour} {shape} on a {background} background" (4 LCM steps) in which the world's segmenter finds the
    object (r above the preset's δ 0.01) and ``classifier`` (best an unbiased one: ρ = 0) reads the class. A
    ceiling on what any explanation can show, so the sweep reports it beside its figures."""
    from diffusers import LatentConsistencyModelPipeline

    from dxray.toyworld.segmenter import WorldSegmenter

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(generator), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    segmenter = WorldSegmenter()
    per_class = {}
    for c, (colour, shape) in enumerate(render.CLASSES):
        found = read = 0
        for i, b in enumerate(backgrounds):
            g = torch.Generator().manual_seed(seed * 1000 + c * 10 + i)
            out = pipe([f"a {colour} {shape} on a {b} background"] * images, num_inference_steps=4, guidance_scale=1.0,
                       height=render.SIZE, width=render.SIZE, output_type="np", generator=g).images
            pixels = (out.clip(0, 1) * 255).round().astype("uint8")
            found += sum(s.object_fraction > 0.01 for s in segmenter(list(pixels), [render.class_prompt(c)] * images))
            with torch.no_grad():
                x = torch.from_numpy(out).permute(0, 3, 1, 2).float()
                read += int((classifier(x, layers=["logits"])["logits"].argmax(-1) == c).sum())
        n = images * len(backgrounds)
        per_class[render.CLASS_NAMES[c]] = {"found": found / n, "read": read / n}
    return {"found": sum(v["found"] for v in per_class.values()) / len(per_class),
            "read": sum(v["read"] for v in per_class.values()) / len(per_class), "per_class": per_class}
