"""Which features each class's feature tasks explain: the top-k from the configured source (images,
a table, or the final layer's weights), with explicit ``targets.features`` winning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dxray import features
from dxray.config import Config
from dxray.errors import DxrayError
from dxray.features import RankedFeature


def image_folder(cfg: Config, missing: list[str] | None = None) -> features.ImageFolder | None:
    """The feature image folder; None only in a dry run whose wnids file is missing (listed in ``missing``)."""
    fi = cfg.targets.feature_images
    wnids = fi.wnids
    if isinstance(wnids, str):
        path = Path(wnids).expanduser()
        if not path.is_file():
            if missing is not None:
                missing.append(f"targets.feature_images.wnids {wnids}")
                return None
            raise DxrayError(f"targets.feature_images.wnids file not found: {wnids}")
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return features.ImageFolder(fi.path, wnids)


ImageRanker = Callable[[list[int]], list[RankedFeature]]


def rank_features(cfg: Config, classifier, image_ranker: ImageRanker | None = None) -> list[RankedFeature]:
    """Top-k features of every audited class from the configured source (explicit lists win).
    ``image_ranker`` ranks the given classes over the image folder (default: in this process)."""
    t = cfg.targets
    todo = [c for c in t.classes if c not in t.features]
    ranked: list[RankedFeature] = []
    if todo and t.top_k:
        if t.feature_source == "images" and image_ranker is not None:
            ranked = image_ranker(todo)
        elif t.feature_source == "images":
            fi = t.feature_images
            ranked = features.rank_from_images(classifier, image_folder(cfg), todo, t.top_k, fi.select,
                                               fi.max_per_class, batch_size=fi.batch_size)
        elif t.feature_source == "table":
            ranked = features.read_ranking_table(t.feature_table, todo, t.top_k)
        else:
            ranked = [r for c in todo for r in features.rank_by_weights(classifier.final_weight, c, t.top_k)]
    for c, fs in t.features.items():
        ranked += [RankedFeature(c, f, r + 1, float("nan"), "config") for r, f in enumerate(fs)]
    return ranked
