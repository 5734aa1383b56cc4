"""How many explainer actors of how many GPUs a cluster holds beside its segmenters."""

from __future__ import annotations

import math

from dxray.config import Config
from dxray.errors import DxrayError


def layout(cfg: Config, cluster_gpus: float, scales_up: bool = False) -> tuple[int, float]:
    """(explainer count, GPUs per explainer): as many explainers of ``gpus_per_explainer`` as fit beside
    the segmenters. A fractional request must fit on one GPU (Ray never splits an actor across GPUs),
    so packing is per GPU. A CPU-only cluster gets one CPU explainer unless told otherwise; on a cluster
    that ``scales_up`` (one we joined, not a local one) explicit ``cluster.explainers`` keep their GPUs even
    while it has none, so the autoscaler adds GPU nodes for them."""
    c = cfg.cluster
    gpe = c.gpus_per_explainer if cluster_gpus > 0 or (scales_up and c.explainers is not None) else 0.0
    if c.explainers is not None:
        return c.explainers, gpe
    if gpe == 0:
        return 1, 0.0
    gpus = int(cluster_gpus + 1e-9)
    segs = c.segmenters if cfg.segment.enabled and c.gpus_per_segmenter > 0 else 0
    gps = c.gpus_per_segmenter
    if gpe >= 1:
        n = int((gpus - math.ceil(segs * gps - 1e-9)) / gpe + 1e-9)
    else:
        per = [int(1 / gpe + 1e-9)] * gpus  # explainers on each GPU
        free = [1 - k * gpe for k in per]
        for _ in range(segs):  # each segmenter into a GPU's leftover, else in place of an explainer
            fits = [g for g in range(gpus) if free[g] + 1e-9 >= gps]
            if not fits:
                g = max(range(gpus), key=lambda g: (per[g], free[g]), default=None)
                if g is None or per[g] == 0:
                    break
                per[g] -= 1
                free[g] += gpe
                fits = [g] if free[g] + 1e-9 >= gps else []
            if fits:
                free[fits[0]] -= gps
        n = sum(per)
    if n < 1:
        raise DxrayError(f"cluster has {cluster_gpus:g} GPU(s): no room for an explainer of {gpe:g} GPU beside "
                         f"{c.segmenters} segmenter(s) of {c.gpus_per_segmenter:g}; lower cluster.gpus_per_explainer "
                         f"or set cluster.explainers (an autoscaling cluster adds nodes on demand)")
    return n, gpe
