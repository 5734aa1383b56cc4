"""Config sections → loaded models: one keyword-only factory per component, each taking only its own
config section (and where to put it). A bare preset name (``tiny``, ``toyworld``: :mod:`.presets`) is
resolved here, so the core loaders (``generator``, ``classifiers``, ``segment``) only ever see real
model references: hub ids, folders, classifier specs."""

from __future__ import annotations

import tempfile
from pathlib import Path

from dxray import classifiers
from dxray.cache import cache_root
from dxray.errors import DxrayError
from dxray.models.presets import PRESETS, classifier_built, preset

__all__ = ["PRESETS", "cache_root", "classifier_spec", "describe_classifier", "is_preset", "load_classifier",
           "load_generator", "load_segmenter", "preset_tokenizer"]


def is_preset(ref: str | None) -> bool:
    """Whether ``ref`` names a preset (built into the cache folder on first use)."""
    return preset(ref) is not None


def preset_tokenizer(ref: str):
    """A preset generator's CLIP tokenizer, made in memory (vocabulary only, no weights); None for a real model."""
    p = preset(ref)
    return p.tokenizer() if p else None


# -- classifier ----------------------------------------------------------------------------------
def classifier_spec(c, *, cache_dir: str | None = None) -> str:
    """The real spec behind ``classifier.spec`` (a preset is built into ``cache_dir`` on first use)."""
    p = preset(c.spec)
    return p.classifier(cache_dir) if p else c.spec


def _classifier_kwargs(c) -> dict:
    return {"weights": c.weights, "kwargs": c.kwargs, "class_names": c.class_names, "input_size": c.input_size}


def describe_classifier(c, *, cache_dir: str | None = None, missing: list[str] | None = None,
                        build: bool = True) -> classifiers.ClassifierInfo:
    """Classes, layer names and widths of the ``classifier`` section, from its architecture alone.
    With ``build=False`` a preset not built yet is described from its config alone (nothing is built,
    trained or saved); with ``missing`` (a list) a weights file not here is listed instead of raised."""
    p = preset(c.spec)
    if p and not build and not classifier_built(c.spec, cache_dir):
        with tempfile.TemporaryDirectory(prefix="dxray-describe-") as tmp:
            p.classifier_architecture(Path(tmp))
            return classifiers.describe(f"hf:{tmp}", **_classifier_kwargs(c), missing=missing)
    return classifiers.describe(classifier_spec(c, cache_dir=cache_dir), **_classifier_kwargs(c), missing=missing)


def load_classifier(c, *, device="cpu", cache_dir: str | None = None) -> classifiers.Classifier:
    """The ``classifier`` section's model, eval-mode and frozen, on ``device``."""
    return classifiers.load_classifier(classifier_spec(c, cache_dir=cache_dir), **_classifier_kwargs(c),
                                       final_layer=c.final_layer, device=device, allow_pickle=c.allow_pickle)


# -- generator -----------------------------------------------------------------------------------
def load_generator(g, *, device: str = "auto", cache_dir: str | None = None):
    """The ``generator`` section's differentiable LCM sampler."""
    from dxray.generator import LCMGenerator

    p = preset(g.model)
    return LCMGenerator.from_pretrained(
        p.generator(cache_dir) if p else g.model, lora=g.lora, tiny_vae=g.tiny_vae, device=device, dtype=g.dtype,
        steps=g.steps, guidance_scale=g.guidance_scale, resolution=g.resolution,
        original_inference_steps=g.original_inference_steps, checkpointing=g.checkpointing, grad_steps=g.grad_steps)


# -- segmenter -----------------------------------------------------------------------------------
def load_segmenter(s, *, device="cpu", cache_dir: str | None = None):
    """The ``segment`` section's scorer: Grounding DINO + SAM, or a preset's exact segmenter (same interface)."""
    p = preset(s.detector)
    if p and p.segmenter:
        return p.segmenter(concepts=s.concepts)
    from dxray.segment import Segmenter

    return Segmenter(_segment_ref(s.detector, "detector", cache_dir), _segment_ref(s.sam, "sam", cache_dir),
                     device=device, box_threshold=s.box_threshold, text_threshold=s.text_threshold,
                     batch_size=s.batch_size, allow_pickle=s.allow_pickle, concepts=s.concepts,
                     dtype=s.dtype)


def _segment_ref(ref: str | None, part: str, cache_dir: str | None) -> str | None:
    p = preset(ref)
    if p is None:
        return ref
    build = getattr(p, part)
    if build is None:
        raise DxrayError(f"segment.{part}: the {ref} preset has no {part} model (its segmenter is "
                         f"segment.detector={ref})")
    return build(cache_dir)
