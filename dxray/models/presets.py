"""Presets: the models dxray builds itself, by bare name, into the cache folder on first use.

One plain registry (segment-anything's ``build_sam.py`` style): a name maps to a :class:`Preset` whose
builders return the real reference the core loaders take (a local folder, an ``hf:`` spec). Only this
module, :mod:`dxray.models` and the presets' own builders know these names; the core loaders
(``generator``, ``classifiers``, ``segment``) never do.

- ``tiny``: random tiny LCM + CLIP + ResNet classifier + Grounding DINO + SAM (plumbing, seconds).
- ``toyworld``: the planted-bias toy world's trained generator and classifier (minutes, once) and its
  exact colour segmenter in place of Grounding DINO + SAM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dxray.cache import built, cache_root


@dataclass(frozen=True)
class Preset:
    generator: Callable[[str | None], str]  # cache_dir -> the LCM pipeline folder (built on first use)
    classifier: Callable[[str | None], str]  # cache_dir -> a classifiers spec (built on first use)
    classifier_folder: Callable[[str | None], Path]  # where the classifier is built (complete once built)
    classifier_architecture: Callable[[Path], None]  # writes the classifier's config alone: describe without building
    tokenizer: Callable[[], object]  # the generator's CLIP tokenizer, in memory (vocabulary only)
    detector: Callable[[str | None], str] | None = None  # cache_dir -> Grounding DINO folder
    sam: Callable[[str | None], str] | None = None  # cache_dir -> SAM folder
    segmenter: Callable[..., object] | None = None  # (concepts=) an exact segmenter that replaces Grounding DINO + SAM


# -- tiny ----------------------------------------------------------------------------------------
def _tiny_generator(cache_dir):
    from dxray.models.tiny import ensure_tiny_lcm

    return str(ensure_tiny_lcm(cache_dir))


def _tiny_classifier(cache_dir):
    from dxray.models.tiny import ensure_tiny_classifier

    return f"hf:{ensure_tiny_classifier(cache_dir)}"


def _tiny_architecture(folder: Path) -> None:
    from dxray.models.tiny import tiny_classifier

    model, _ = tiny_classifier()  # a few kB of random weights in memory; only its config is written
    model.config.save_pretrained(folder)


def _tiny_tokenizer():
    from dxray.models.tiny import tiny_clip_tokenizer

    return tiny_clip_tokenizer()


def _tiny_detector(cache_dir):
    from dxray.models.tiny_segment import ensure_tiny_grounding_dino

    return str(ensure_tiny_grounding_dino(cache_dir))


def _tiny_sam(cache_dir):
    from dxray.models.tiny_segment import ensure_tiny_sam

    return str(ensure_tiny_sam(cache_dir))


# -- toyworld ------------------------------------------------------------------------------------
def _world(cache_dir) -> Path:
    from dxray.toyworld.train import ensure_toyworld

    return ensure_toyworld(cache_dir)


def _world_folder(cache_dir) -> Path:
    from dxray.toyworld.train import folder

    return folder(cache_dir)


def _world_architecture(folder: Path) -> None:
    from dxray.toyworld.train import classifier_config

    classifier_config().save_pretrained(folder)


def _world_tokenizer():
    from dxray.toyworld.train import world_tokenizer

    return world_tokenizer()


def _world_segmenter(concepts=None):
    from dxray.toyworld.segmenter import WorldSegmenter

    return WorldSegmenter(concepts=concepts)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        generator=_tiny_generator, classifier=_tiny_classifier,
        classifier_folder=lambda cache_dir: cache_root(cache_dir) / "tiny-classifier",
        classifier_architecture=_tiny_architecture, tokenizer=_tiny_tokenizer,
        detector=_tiny_detector, sam=_tiny_sam),
    "toyworld": Preset(
        generator=lambda cache_dir: str(_world(cache_dir) / "generator"),
        classifier=lambda cache_dir: f"hf:{_world(cache_dir) / 'classifier'}",
        classifier_folder=_world_folder, classifier_architecture=_world_architecture,
        tokenizer=_world_tokenizer, segmenter=_world_segmenter),
}


def preset(name: str | None) -> Preset | None:
    """The preset of that name; None for a real model reference."""
    return PRESETS.get(name) if isinstance(name, str) else None


def classifier_built(name: str, cache_dir: str | None) -> bool:
    return built(PRESETS[name].classifier_folder(cache_dir))
