"""Which features each class's feature tasks explain: the one module that reads ``targets.feature_source``.

A :data:`Ranker` ranks the top-k features of the classes it is given. :func:`choose_ranker` picks it once from
the config, for the runner that asks: by the final layer's weights (:class:`ByWeights`), from a ranking table
(:class:`FromTable`), over the image folder in this process (:class:`OverImages`) or, given by the Ray runner,
over it on Ray Data (``dxray.distributed.rank.OnRay``). :func:`rank_features` runs it on the classes without
explicit ``targets.features`` (explicit lists win); :func:`check_source` is preflight's check of the source and
:func:`table_ranking` the dry run's look at a table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxray import features
from dxray.config import FeatureImagesConfig, TargetsConfig
from dxray.errors import DxrayError
from dxray.features import RankedFeature

Ranker = Callable[[list[int]], list[RankedFeature]]


def image_folder(images: FeatureImagesConfig, missing: list[str] | None = None) -> features.ImageFolder | None:
    """The feature image folder; None only in a dry run whose wnids file is missing (listed in ``missing``)."""
    wnids = images.wnids
    if isinstance(wnids, str):
        path = Path(wnids).expanduser()
        if not path.is_file():
            if missing is not None:
                missing.append(f"targets.feature_images.wnids {wnids}")
                return None
            raise DxrayError(f"targets.feature_images.wnids file not found: {wnids}")
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return features.ImageFolder(images.path, wnids)


@dataclass(frozen=True)
class ByWeights:
    """Top-k by the final layer's weight W[c, f] alone (no images)."""

    classifier: Any
    top_k: int

    def __call__(self, classes: list[int]) -> list[RankedFeature]:
        return [r for c in classes for r in features.rank_by_weights(self.classifier.final_weight, c, self.top_k)]


@dataclass(frozen=True)
class FromTable:
    """Top-k read from a ``feature_ranking`` table (``dxray rank-features``, or a user's)."""

    table: str
    top_k: int

    def __call__(self, classes: list[int]) -> list[RankedFeature]:
        return features.read_ranking_table(self.table, classes, self.top_k)


@dataclass(frozen=True)
class OverImages:
    """Top-k by W[c, f] x mean activation over the image folder, in this process."""

    classifier: Any
    images: FeatureImagesConfig
    top_k: int

    def __call__(self, classes: list[int]) -> list[RankedFeature]:
        fi = self.images
        return features.rank_from_images(self.classifier, image_folder(fi), classes, self.top_k, fi.select,
                                         fi.max_per_class, batch_size=fi.batch_size)


def to_rank(targets: TargetsConfig) -> list[int]:
    """The classes a ranker ranks: those without explicit features (none with ``top_k`` 0)."""
    return [c for c in targets.classes if c not in targets.features] if targets.top_k else []


def choose_ranker(targets: TargetsConfig, classifier: Callable[[], Any],
                  on_ray: Callable[[], Ranker] | None = None) -> Ranker | None:
    """The ranker of ``targets.feature_source``, None when nothing is to be ranked. ``classifier`` gives the loaded
    classifier (called only when the source needs it: weights, or images in this process); ``on_ray`` gives the
    Ray runner's image ranker, which then ranks ``images`` instead."""
    if not to_rank(targets):
        return None
    if targets.feature_source == "table":
        return FromTable(targets.feature_table, targets.top_k)
    if targets.feature_source == "images":
        return on_ray() if on_ray is not None else OverImages(classifier(), targets.feature_images, targets.top_k)
    return ByWeights(classifier(), targets.top_k)


def rank_features(targets: TargetsConfig, ranker: Ranker | None) -> list[RankedFeature]:
    """Top-k features of every audited class from ``ranker`` (see :func:`choose_ranker`), then the explicit ones."""
    todo = to_rank(targets)
    ranked = ranker(todo) if todo and ranker is not None else []
    for c, fs in targets.features.items():
        ranked += [RankedFeature(c, f, r + 1, float("nan"), "config") for r, f in enumerate(fs)]
    return ranked


def check_source(targets: TargetsConfig, missing: list[str] | None,
                 listed_as_missing: Callable[[str, str], bool]) -> None:
    """Preflight's check of the configured source: the image folder holds the classes (``select``), or the table
    reads; ``listed_as_missing(path, field)`` is true when a dry run lists the path as missing instead."""
    if targets.feature_source == "images":
        folder = image_folder(targets.feature_images, missing)
        if folder is not None and not listed_as_missing(folder.root, "targets.feature_images.path"):
            features.check_image_folder(folder, targets.classes, targets.feature_images.select)
    elif targets.feature_source == "table":
        if not listed_as_missing(targets.feature_table, "targets.feature_table"):
            features.read_ranking_table(targets.feature_table, targets.classes, targets.top_k)


def table_ranking(targets: TargetsConfig, missing: list[str]) -> list[RankedFeature] | None:
    """The dry run's ranking, known before the run only when it is read from a table that is here."""
    if targets.feature_source != "table" or not targets.top_k or \
            f"targets.feature_table {targets.feature_table}" in missing:
        return None
    return FromTable(targets.feature_table, targets.top_k)(to_rank(targets))
