"""Top-k features per class.

Salient ImageNet ranks feature f for class c by W[c, f] × mean activation of f
over images of c (the images the model *predicts* as c); with no images, the
weight alone ranks (``source="weights"``); a table can also be given.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch import Tensor

from dxray.errors import DxrayError
from dxray.storage.fs import filesystem

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SELECTS = ("predicted", "labelled")
TABLE_COLUMNS = ("class_index", "feature_index", "rank")


@dataclass(frozen=True)
class RankedFeature:
    class_index: int
    feature_index: int
    rank: int  # 1 = most important
    importance: float
    source: str
    n_images: int | None = None  # images behind the ranking (None: weights, table, config)


def rank_by_weights(weight: torch.Tensor, class_index: int, k: int) -> list[RankedFeature]:
    """Top-k features of a class by its final-layer weight alone (no images needed)."""
    row = weight[class_index].detach().float().cpu()
    top = torch.topk(row, min(k, row.numel()))
    return [RankedFeature(class_index, int(f), r + 1, float(v), "weights")
            for r, (v, f) in enumerate(zip(top.values, top.indices, strict=True))]


def rank_by_activation(weight: Tensor, mean_activation: Tensor, class_index: int, k: int,
                       source: str, n_images: int) -> list[RankedFeature]:
    """Top-k features of a class by W[c, f] × mean activation of f over the class's images, those with a positive
    weight first: a feature task maximises the feature, which lowers the class's score when W[c, f] <= 0, however
    large the product (a signed feature, a ViT's, has negative weight x negative activation; a ReLU's never)."""
    w = weight[class_index].detach().float().cpu()
    score = w * mean_activation.detach().float().cpu()
    order = sorted(range(score.numel()), key=lambda f: (bool(w[f] > 0), float(score[f])), reverse=True)[:k]
    return [RankedFeature(class_index, f, r + 1, float(score[f]), source, n_images) for r, f in enumerate(order)]


def _filesystem(where: str) -> tuple[pafs.FileSystem, str]:
    try:  # S3 endpoint, region and addressing from the environment (AWS_ENDPOINT_URL, AWS_REGION)
        return filesystem(where)
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise DxrayError(f"cannot open {where}: {' '.join(str(err).split())[:200]}") from None


def path_exists(where: str) -> bool:
    """Whether a local path or URI (file or folder) exists; a storage that cannot be asked raises DxrayError."""
    fs, inner = _filesystem(where)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


@dataclass(frozen=True)
class ImageFolder:
    """One sub-folder per class, named by class index ("7", "0007") or by WordNet id (with ``wnids``)."""

    root: str  # local path or URI (s3://bucket/prefix)
    wnids: list[str] | None = None  # wnids[i] = WordNet id of class i

    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return _filesystem(self.root)

    def exists(self) -> bool:
        fs, base = self._fs
        return fs.get_file_info(base).type == pafs.FileType.Directory

    def class_folders(self) -> dict[int, str]:
        """Class index -> folder path; other folders are ignored (the first of "7"/"0007" wins)."""
        fs, base = self._fs
        by_wnid = {w: i for i, w in enumerate(self.wnids or [])}
        found: dict[int, str] = {}
        for info in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.base_name):
            name = info.base_name
            c = int(name) if name.isdigit() else by_wnid.get(name)
            if info.type == pafs.FileType.Directory and c is not None:
                found.setdefault(c, info.path)
        return found

    def images(self, class_index: int, limit: int | None = None) -> list[str]:
        """Sorted image paths in the class's sub-folder (none when it has no sub-folder), the first ``limit``."""
        folder = self.class_folders().get(class_index)
        return [] if folder is None else self._images_in(folder, limit)

    def _images_in(self, folder: str, limit: int | None) -> list[str]:
        fs, _ = self._fs
        paths = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder)) if i.type == pafs.FileType.File
                       and not i.base_name.startswith(".") and i.extension.lower() in [e[1:] for e in IMAGE_EXTENSIONS])
        return paths[:limit]

    def load(self, path: str) -> np.ndarray:
        """H×W×3 uint8 RGB. A decompression bomb (a few KB on disk: more pixels than Pillow's
        ``Image.MAX_IMAGE_PIXELS``, or a text chunk past ``PngImagePlugin.MAX_TEXT_CHUNK``) is an OSError, as a
        corrupt image is, and is never decoded."""
        from PIL import Image

        with self._fs[0].open_input_file(path) as f:
            data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # past the limit but under 2x: refuse too
            try:
                return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning, ValueError, SyntaxError) as err:
                raise OSError(f"not decoded: {err}") from None  # ValueError: PNG's text-chunk bomb, SyntaxError: a bad chunk


def _expected_names(folder: ImageFolder, c: int) -> str:
    wnid = folder.wnids[c] if folder.wnids and 0 <= c < len(folder.wnids) else None
    return " / ".join([str(c)] + ([wnid] if wnid else []))


def check_image_folder(folder: ImageFolder, classes: list[int], select: str) -> None:
    """Cheap checks before any model loads: ``select``, the root, an image for every class."""
    if select not in SELECTS:
        raise DxrayError(f"feature image select must be 'predicted' or 'labelled', got {select!r}")
    try:
        if not folder.exists():
            raise DxrayError(f"feature image folder not found: {folder.root}")
        folders = folder.class_folders()
        empty = [c for c in classes if c not in folders or not folder._images_in(folders[c], 1)]
    except OSError as err:
        raise DxrayError(f"cannot list feature image folder {folder.root}: {' '.join(str(err).split())[:200]}") from None
    if empty:
        raise DxrayError(f"feature image folder {folder.root} has no images for class {empty[0]} "
                         f"(expected a sub-folder named {_expected_names(folder, empty[0])})")


def warn_skipped(path: str, reason: str) -> None:
    """The warning for a feature image that is not read (corrupt, truncated, a decompression bomb)."""
    log.warning("skipping unreadable image %s: %s", path, reason)


def _activations(classifier, folder: ImageFolder, paths: list[str], batch_size: int,
                 size: tuple[int, int], skipped: list[tuple[str, str]] | None = None):
    """Yield (predicted classes, penultimate activations) per batch; unreadable images are skipped with a
    warning, or, given ``skipped``, added to it as (path, reason) for the caller to report (a Ray worker's
    log may not reach the driver before it exits)."""
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            try:
                x = torch.from_numpy(folder.load(path).copy()).permute(2, 0, 1)[None].float() / 255
            except OSError as err:  # PIL.UnidentifiedImageError is an OSError; load() makes a bomb one
                if skipped is None:
                    warn_skipped(path, str(err))
                else:
                    skipped.append((path, str(err)))
                continue
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            batch.append(x)
        if batch:
            out = classifier(torch.cat(batch), layers=["penultimate"])
            yield out["logits"].argmax(1).cpu(), out["penultimate"].detach().double().cpu()


@torch.no_grad()
def mean_activations(classifier, folder: ImageFolder, classes: list[int], select: str, limit: int | None,
                     batch_size: int = 16, image_size: tuple[int, int] | None = None) -> dict[int, tuple[Tensor, int]]:
    """Per class: (mean penultimate activation over its images, number of images).

    ``labelled``: the class's own sub-folder. ``predicted`` (Salient ImageNet): up to ``limit``
    images of every class folder, each counted for the class the model predicts.
    """
    if select not in SELECTS:
        raise DxrayError(f"feature image select must be 'predicted' or 'labelled', got {select!r}")
    size = tuple(image_size or classifier.input_size)
    dim = classifier.final_weight.shape[1]
    sums = {c: torch.zeros(dim, dtype=torch.float64) for c in classes}
    counts = dict.fromkeys(classes, 0)
    folders = folder.class_folders()
    if select == "labelled":
        for c in classes:
            paths = folder._images_in(folders[c], limit) if c in folders else []
            for _, acts in _activations(classifier, folder, paths, batch_size, size):
                sums[c] += acts.sum(0)
                counts[c] += len(acts)
    else:
        for path in folders.values():
            for pred, acts in _activations(classifier, folder, folder._images_in(path, limit), batch_size, size):
                for c in classes:
                    mine = pred == c
                    sums[c] += acts[mine].sum(0)
                    counts[c] += int(mine.sum())
    return {c: ((sums[c] / max(counts[c], 1)).float(), counts[c]) for c in classes}


def rank_from_images(classifier, folder: ImageFolder, classes: list[int], k: int, select: str,
                     limit: int | None, batch_size: int = 16) -> list[RankedFeature]:
    """Top-k per class by W[c, f] × mean activation; a class with no images falls back to the weights."""
    check_image_folder(folder, classes, select)
    acts = mean_activations(classifier, folder, classes, select, limit, batch_size)
    return rank_from_means(classifier.final_weight, classes, acts, k, select)


def rank_from_means(weight: Tensor, classes: list[int], means: dict[int, tuple[Tensor, int]], k: int,
                    select: str) -> list[RankedFeature]:
    """Top-k per class from (mean activation, image count) per class; a class with no images falls
    back to the weights alone (said in its ``source``). In-process and Ray ranking both end here."""
    ranked: list[RankedFeature] = []
    for c in classes:
        mean, n = means.get(c, (None, 0))
        if n:
            ranked += rank_by_activation(weight, mean, c, k, f"images-{select}", n)
        else:
            how = "predicted as" if select == "predicted" else "labelled"
            log.warning("no images %s class %d; ranking its features by weight alone", how, c)
            ranked += [RankedFeature(r.class_index, r.feature_index, r.rank, r.importance,
                                     f"weights (no images {how} {c})", 0) for r in rank_by_weights(weight, c, k)]
    return ranked


def read_tabular(fs: pafs.FileSystem, inner: str, kind: pafs.FileType, path: str, what: str,
                 unsupported: str) -> pa.Table:
    """A Parquet folder, a .parquet/.pq file or a .csv as one table; ``unsupported`` is the error for
    another suffix, and a read failure is one line naming ``what`` and ``path``."""
    import pyarrow.csv as pcsv
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    ext = posixpath.splitext(inner)[1].lower()
    try:
        if kind == pafs.FileType.Directory:
            return ds.dataset(inner, filesystem=fs, format="parquet").to_table()
        if ext == ".csv":
            with fs.open_input_stream(inner) as f:
                return pcsv.read_csv(f)
        if ext in (".parquet", ".pq"):
            return pq.read_table(inner, filesystem=fs)
    except (OSError, ValueError) as err:
        raise DxrayError(f"cannot read {what} {path}: {' '.join(str(err).split())[:200]}") from None
    raise DxrayError(unsupported)


def read_ranking_table(path: str, classes: list[int] | None = None, k: int | None = None) -> list[RankedFeature]:
    """Rankings from a CSV/Parquet file (or Parquet folder) with class_index, feature_index, rank [, importance]."""
    fs, inner = _filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise DxrayError(f"feature table not found: {path}")
    table = read_tabular(fs, inner, kind, path, "feature table", f"feature table must be .csv or .parquet, got {path}")
    missing = [c for c in TABLE_COLUMNS if c not in table.column_names]
    if missing:
        raise DxrayError(f"feature table {path} lacks column(s) {', '.join(missing)} "
                         f"(needs {', '.join(TABLE_COLUMNS)}, optional importance)")
    rows = table.select([c for c in (*TABLE_COLUMNS, "importance") if c in table.column_names]).to_pylist()
    for i, row in enumerate(rows):
        if any(row[c] is None for c in TABLE_COLUMNS):
            raise DxrayError(f"feature table {path}: row {i + 1} has an empty class_index, feature_index or rank")
    present = {int(r["class_index"]) for r in rows}
    wanted = sorted(present) if classes is None else list(classes)
    absent = [c for c in wanted if c not in present]
    if absent:
        raise DxrayError(f"feature table {path} has no rows for class {absent[0]}")
    name = f"table:{posixpath.basename(inner.rstrip('/'))}"
    order = {c: i for i, c in enumerate(wanted)}
    keep = [r for r in rows if int(r["class_index"]) in order and (k is None or int(r["rank"]) <= k)]
    keep.sort(key=lambda r: (order[int(r["class_index"])], int(r["rank"])))
    return [RankedFeature(int(r["class_index"]), int(r["feature_index"]), int(r["rank"]),
                          float("nan") if r.get("importance") is None else float(r["importance"]), name)
            for r in keep]


def ranking_rows(run_id: str, ranked: list[RankedFeature], class_names: list[str] | None) -> list[dict]:
    """Rows of the ``feature_ranking`` table (NaN importance becomes null)."""
    names = class_names or []
    return [{"run_id": run_id, "class_index": r.class_index,
             "class_name": names[r.class_index] if 0 <= r.class_index < len(names) else None,
             "feature_index": r.feature_index, "rank": r.rank,
             "importance": None if math.isnan(r.importance) else r.importance,
             "source": r.source, "n_images": r.n_images} for r in ranked]
