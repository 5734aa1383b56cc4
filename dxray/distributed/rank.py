"""Top-k features per class over a large image folder, on Ray Data.

The same ranking as :func:`dxray.features.rank_from_images` (W[c, f] × mean penultimate
activation of f over the images of c), with the images spread over a pool of stateful
actors: each actor loads the classifier once, and reduces every batch to per-class partial
sums (class, count, sum of activations), so only a few vectors per batch reach the driver,
never one per image. The driver adds them up, ranks, and writes the ``feature_ranking``
table, which a later audit reads with ``targets.feature_source=table``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from dxray import classifiers, features, models
from dxray.config import ClusterConfig, Config
from dxray.errors import DxrayError
from dxray.features import ImageFolder, RankedFeature
from dxray.generator import resolve_device
from dxray.pipeline.ranking import image_folder
from dxray.quiet import quiet_libraries

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (images done, images in all)
NO_CLASS = -1  # the row a batch returns when none of its images counts for an audited class


@dataclass(frozen=True)
class RankResult:
    ranked: list[RankedFeature]
    table: str  # the feature_ranking dataset folder (local path or URI)
    root: str  # the run folder it lives in
    images: int  # images listed (unreadable ones included)
    actors: int
    seconds: float


def check(cfg: Config) -> classifiers.ClassifierInfo:
    """Every check that needs no model weights and no cluster; raises a one-line DxrayError."""
    t = cfg.targets
    if t.feature_source != "images":
        raise DxrayError(f"rank-features reads images: set targets.feature_source=images "
                         f"(and targets.feature_images.path), got {t.feature_source!r}")
    if not t.top_k:
        raise DxrayError("targets.top_k is 0: nothing to rank")
    info = models.describe_classifier(cfg.classifier, cache_dir=cfg.cache_dir)
    bad = [c for c in t.classes if not 0 <= c < info.num_classes]
    if bad:
        raise DxrayError(f"targets.classes: class index {bad[0]} out of range; "
                         f"the classifier has classes 0..{info.num_classes - 1}")
    features.check_image_folder(image_folder(t.feature_images), t.classes, t.feature_images.select)
    return info


def list_images(folder: ImageFolder, classes: list[int], select: str, limit: int | None) -> list[dict]:
    """Rows (path, folder_class): ``labelled`` reads the audited classes' folders, ``predicted`` every
    class folder (its images count for the predicted class); the first ``limit`` images of each."""
    folders = folder.class_folders()
    todo = sorted(folders.items()) if select == "predicted" else [(c, folders[c]) for c in classes if c in folders]
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:  # one listing request per folder: overlap them
            listed = list(pool.map(lambda item: folder._images_in(item[1], limit), todo))
    except OSError as err:
        raise DxrayError(f"cannot list feature image folder {folder.root}: {' '.join(str(err).split())[:200]}") from None
    return [{"path": p, "folder_class": c} for (c, _), paths in zip(todo, listed, strict=True) for p in paths]


def quiet_logs() -> None:
    """For a command with its own progress bar: Ray Data's console shows warnings only (its full log
    stays in the session's ray-data.log) and model loads show no bars."""
    import ray.data  # noqa: F401  (configures its loggers on import)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
    quiet_libraries()


class ClassActivationSums:
    """Ray Data stateful UDF: a batch of (path, folder_class) rows -> one row per audited class met in it
    (class_index, count, sum of penultimate activations in float64, seen = images in the batch, skipped = the
    images not read, as a JSON list of [path, reason], on the first row: the driver warns of them)."""

    def __init__(self, cfg: Config, folder: ImageFolder, classes: list[int], select: str):
        quiet_libraries()  # every actor's load-time bars would reach the driver's log
        self.classifier = models.load_classifier(cfg.classifier, device=resolve_device(cfg.device),
                                                 cache_dir=cfg.cache_dir)
        self.folder, self.classes, self.select = folder, list(classes), select
        self.size = tuple(self.classifier.input_size)
        self.dim = self.classifier.final_weight.shape[1]

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        labels = [int(c) for c in batch["folder_class"]]
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        skipped: list[tuple[str, str]] = []

        def add(c: int, acts: torch.Tensor) -> None:
            if len(acts):
                sums[c] = sums.get(c, 0) + acts.sum(0)
                counts[c] = counts.get(c, 0) + len(acts)

        if self.select == "labelled":  # unreadable images are skipped: keep each folder's images together
            groups = {c: [p for p, k in zip(paths, labels, strict=True) if k == c]
                      for c in dict.fromkeys(labels) if c in self.classes}
        else:
            groups = {NO_CLASS: paths}
        for label, group in groups.items():
            for pred, acts in features._activations(self.classifier, self.folder, group, len(group), self.size,
                                                    skipped):
                if label != NO_CLASS:
                    add(label, acts)
                else:
                    for c in self.classes:
                        add(c, acts[pred == c])
        order = sorted(sums) or [NO_CLASS]
        return {
            "class_index": np.array(order, dtype=np.int64),
            "count": np.array([counts.get(c, 0) for c in order], dtype=np.int64),
            "sum": np.stack([sums[c].numpy() if c in sums else np.zeros(self.dim) for c in order]).astype(np.float64),
            "seen": np.array([len(paths)] + [0] * (len(order) - 1), dtype=np.int64),
            "skipped": np.array([json.dumps(skipped)] + [""] * (len(order) - 1)),
        }


def _rank(weight: torch.Tensor, classes: list[int], sums: dict[int, np.ndarray], counts: dict[int, int],
          k: int, select: str) -> list[RankedFeature]:
    """The ranking of :func:`features.rank_from_images`, from the activations summed on Ray."""
    means = {c: ((torch.from_numpy(sums[c]) / counts[c]).float(), counts[c]) for c in classes if counts.get(c, 0)}
    return features.rank_from_means(weight, classes, means, k, select)


def _user_error(err: BaseException) -> DxrayError:
    """The DxrayError inside a Ray/Ray Data exception chain, else a one-line summary."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DxrayError):
            return DxrayError(str(e))
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    return DxrayError(f"feature ranking failed on Ray: {type(err).__name__}: {first[:300]}")


def default_actors(cl: ClusterConfig, cluster_gpus: float) -> int:
    """``cluster.explainers``, else one per ``gpus_per_explainer`` of the cluster's GPUs, else 1 (``cl``: the
    ``cluster`` section)."""
    if cl.explainers:
        return cl.explainers
    if cluster_gpus and cl.gpus_per_explainer:
        return max(1, int(cluster_gpus // cl.gpus_per_explainer))
    return 1


class OnRay:
    """The Ray runner's :data:`dxray.pipeline.ranking.Ranker`: W[c, f] x mean activation over the image folder on
    Ray Data, in the cluster the caller has joined (it connects to nothing, checks nothing preflight checked and
    writes nothing: the audit writes the ranking it returns). The classifier is loaded once on the driver's CPU
    for W; ``images`` and ``actors`` say what the last call listed and used."""

    def __init__(self, cfg: Config, actors: int, progress: Progress | None = None):
        # workers build tiny models in the driver's cache
        self.cfg = cfg.model_copy(update={"cache_dir": str(models.cache_root(cfg.cache_dir))})
        self.max_actors, self.progress = actors, progress
        self.images = self.actors = 0

    def __call__(self, classes: list[int]) -> list[RankedFeature]:
        import ray

        cfg = self.cfg
        t, fi = cfg.targets, cfg.targets.feature_images
        folder = image_folder(fi)
        rows = list_images(folder, classes, fi.select, fi.max_per_class)
        classifier = models.load_classifier(cfg.classifier, device="cpu", cache_dir=cfg.cache_dir)
        weight = classifier.final_weight.detach().float().cpu()
        del classifier
        gpus = float(ray.cluster_resources().get("GPU", 0))
        self.images = len(rows)
        self.actors = max(1, min(self.max_actors, math.ceil(len(rows) / fi.batch_size)))
        sums, counts, done = _run(cfg, dataclasses.replace(folder), rows, classes, self.actors, gpus, self.progress)
        if done != len(rows):
            raise DxrayError(f"feature ranking saw {done} of {len(rows)} images; a batch was lost")
        return _rank(weight, classes, sums, counts, t.top_k, fi.select)


def rank_features_distributed(cfg: Config, *, address: str | None = None, actors: int | None = None,
                              progress: Progress | None = None) -> RankResult:
    """``dxray rank-features``: rank the top-k features of every class in ``targets.classes`` from
    ``targets.feature_images`` on Ray Data (:class:`OnRay`) and write the ``feature_ranking`` table of the run.
    Joins the cluster at ``address`` (else ``cluster.address`` / RAY_ADDRESS), or starts a local Ray; re-uses an
    initialised one."""
    import ray

    from dxray.distributed.cluster import connect
    from dxray.storage.sink import RunSink

    started = time.monotonic()
    info = check(cfg)
    if actors is not None and actors < 1:
        raise DxrayError(f"actors must be >= 1, got {actors}")
    how = connect(cfg.cluster, address)
    try:
        ranker = OnRay(cfg, actors or default_actors(cfg.cluster, float(ray.cluster_resources().get("GPU", 0))), progress)
        ranked = ranker(list(cfg.targets.classes))
    finally:
        if how != "existing":
            ray.shutdown()
    sink = RunSink(cfg.output, cfg.resolved_run_id(), storage=cfg.storage)
    sink.write_table("feature_ranking", features.ranking_rows(sink.run_id, ranked, info.class_names), part="all")
    return RankResult(ranked, sink.uri("feature_ranking"), sink.uri(""), ranker.images, ranker.actors,
                      time.monotonic() - started)


def _run(cfg: Config, folder: ImageFolder, rows: list[dict], classes: list[int], pool: int, gpus: float,
         progress: Progress | None) -> tuple[dict[int, np.ndarray], dict[int, int], int]:
    import ray.data
    from ray.util.debug import log_once

    fi, cl = cfg.targets.feature_images, cfg.cluster
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # the caller shows its own (and Ray Data need not warn it is off)
    log_once("ray_data_progress_manager_disabled")
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    done = 0
    if progress:
        progress(0, len(rows))
    try:
        ds = ray.data.from_items(rows, override_num_blocks=min(math.ceil(len(rows) / fi.batch_size), 4096))
        partial = ds.map_batches(
            ClassActivationSums, batch_size=fi.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool),
            fn_constructor_kwargs={"cfg": cfg, "folder": folder, "classes": list(classes), "select": fi.select},
            **_resources(cl.gpus_per_explainer if gpus else 0, cl.cpus_per_explainer))
        for batch in partial.iter_batches(batch_size=None, batch_format="numpy"):
            for c, n, s, seen, skipped in zip(batch["class_index"], batch["count"], batch["sum"], batch["seen"],
                                              batch["skipped"], strict=True):
                for path, reason in json.loads(skipped or "[]"):
                    features.warn_skipped(path, reason)
                if c != NO_CLASS:
                    sums[int(c)] = sums[int(c)] + s if int(c) in sums else np.array(s, dtype=np.float64)
                    counts[int(c)] = counts.get(int(c), 0) + int(n)
                done += int(seen)
            if progress:
                progress(done, len(rows))
    except DxrayError:
        raise
    except Exception as err:  # a Ray Data / actor failure: one line, the user's error if there is one
        raise _user_error(err) from None
    finally:
        ctx.enable_progress_bars = bars
    return sums, counts, done


def _resources(num_gpus: float, num_cpus: float) -> dict:
    """Per-actor resources; a GPU actor reserves 1 CPU by default (Ray Data warns when both are given)."""
    if num_gpus and num_cpus == 1:
        return {"num_gpus": num_gpus}
    return {"num_gpus": num_gpus, "num_cpus": num_cpus}


def progress_printer(every_s: float = 30.0, out=None) -> Progress:
    """A progress callback for job logs: one line at the start, every ``every_s`` seconds, and at the end."""
    last = [-math.inf]
    started = time.monotonic()

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last[0] >= every_s:
            last[0] = now
            rate = done / max(now - started, 1e-9)
            print(f"feature ranking: {done}/{total} images ({rate:.1f}/s)", file=out or sys.stderr, flush=True)

    return show
