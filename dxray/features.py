"""Top-k features per class.

Salient ImageNet ranks feature f for class c by W[c, f] × mean activation of f
over images of c; with no images, the weight alone ranks (``source="weights"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankedFeature:
    class_index: int
    feature_index: int
    rank: int  # 1 = most important
    importance: float
    source: str


def rank_by_weights(weight: torch.Tensor, class_index: int, k: int) -> list[RankedFeature]:
    """Top-k features of a class by its final-layer weight alone (no images needed)."""
    row = weight[class_index].detach().float().cpu()
    top = torch.topk(row, min(k, row.numel()))
    return [RankedFeature(class_index, int(f), r + 1, float(v), "weights")
            for r, (v, f) in enumerate(zip(top.values, top.indices, strict=True))]
