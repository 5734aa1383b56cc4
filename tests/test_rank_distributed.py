"""Feature ranking on Ray Data: the same answer as the in-process ranking, from partial sums per batch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from conftest import ROOT, TINY_YAML
from PIL import Image

from dxray.classifiers import load_classifier
from dxray.config import load_config
from dxray.distributed import rank
from dxray.errors import DxrayError
from dxray.features import ImageFolder, mean_activations, rank_from_images, read_ranking_table
from dxray.pipeline.ranking import image_folder

CLASSES = ["red", "green", "blue"]
PER_FOLDER = 4


def write_images(root, folders=3, per_folder=PER_FOLDER, seed=0):
    """Noisy tinted images, one sub-folder per class; returns them as an N×3×H×W batch in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = []
    for c in range(folders):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            x = np.clip(rng.uniform(0, 1, 3) + rng.normal(0, 0.2, (32, 32, 3)), 0, 1)
            x = (x * 255).astype(np.uint8)
            Image.fromarray(x).save(root / str(c) / f"img{i}.png")
            images.append(x)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class tiny classifier whose bias is centred on the images, so every class is predicted for
    some of them, and some images are predicted as another class than their folder's."""
    from dxray.models.tiny import tiny_classifier

    tmp = tmp_path_factory.mktemp("rank")
    images = write_images(tmp / "imgs")
    model, processor = tiny_classifier(num_labels=3, names=CLASSES)
    model.save_pretrained(tmp / "model")
    processor.save_pretrained(tmp / "model")
    logits = load_classifier(f"hf:{tmp / 'model'}", device="cpu")(images)["logits"]
    with torch.no_grad():
        model.classifier[1].bias -= logits.mean(0)
    model.save_pretrained(tmp / "model")
    clf = load_classifier(f"hf:{tmp / 'model'}", device="cpu")
    pred = clf(images)["logits"].argmax(1).tolist()
    labels = [c for c in range(3) for _ in range(PER_FOLDER)]
    assert len(set(pred)) >= 2 and pred != labels, f"the test world needs varied predictions, got {pred}"
    return tmp, clf


def config(tmp, images, *more):
    """The test's overrides, ``more`` replacing a default of the same key (a key given twice is refused)."""
    overrides = dict(o.split("=", 1) for o in [
        f"output={tmp / 'out'}", "device=cpu", f"classifier.spec=hf:{tmp / 'model'}",
        "targets.classes=[0, 1, 2]", "targets.top_k=4", "targets.feature_source=images",
        f"targets.feature_images.path={images}", "targets.feature_images.batch_size=3", *more])
    return load_config(TINY_YAML, [f"{k}={v}" for k, v in overrides.items()])


def assert_same_ranking(mine, ref):
    assert [(r.class_index, r.feature_index, r.rank, r.source, r.n_images) for r in mine] == \
           [(r.class_index, r.feature_index, r.rank, r.source, r.n_images) for r in ref]
    assert [r.importance for r in mine] == pytest.approx([r.importance for r in ref], rel=1e-4, abs=1e-7)


def test_actor_class_sums_a_batch_without_a_cluster(world):
    tmp, clf = world
    cfg = config(tmp, tmp / "imgs")
    folder = image_folder(cfg.targets.feature_images)
    paths = [p for c in range(3) for p in folder.images(c)]
    rows = {"path": np.array(paths), "folder_class": np.repeat(np.arange(3), PER_FOLDER)}
    for select in ("labelled", "predicted"):
        out = rank.ClassActivationSums(cfg, folder, [0, 1, 2], select)(rows)
        ref = mean_activations(clf, folder, [0, 1, 2], select, None)
        assert out["seen"].sum() == 12 and out["sum"].dtype == np.float64 and out["sum"].shape[1] == 16
        for c, n, s in zip(out["class_index"], out["count"], out["sum"], strict=True):
            assert n == ref[c][1]
            np.testing.assert_allclose(s / n, ref[c][0].numpy(), rtol=1e-5, atol=1e-6)
    # no image of this batch counts for class 2 when labelled: a NO_CLASS row still reports the images seen
    out = rank.ClassActivationSums(cfg, folder, [2], "labelled")({k: v[:2] for k, v in rows.items()})
    assert out["class_index"].tolist() == [rank.NO_CLASS] and out["count"].tolist() == [0]
    assert out["seen"].tolist() == [2] and not out["sum"].any()


@pytest.mark.parametrize("select, limit", [("predicted", 3), ("labelled", None)])
def test_distributed_ranking_matches_in_process(world, ray_local, select, limit):
    tmp, clf = world
    cfg = config(tmp, tmp / "imgs", f"targets.feature_images.select={select}",
                 f"targets.feature_images.max_per_class={'null' if limit is None else limit}", f"run_id=r-{select}")
    seen = []
    result = rank.rank_features_distributed(cfg, actors=2, progress=lambda done, total: seen.append((done, total)))
    ref = rank_from_images(clf, ImageFolder(str(tmp / "imgs")), [0, 1, 2], 4, select, limit)
    assert_same_ranking(result.ranked, ref)
    assert {r.source for r in ref} == {f"images-{select}"}  # no fallback: every class has images
    total = 3 * (limit or PER_FOLDER)
    assert result.images == total and result.actors == 2 and seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.table == str(tmp / "out" / f"r-{select}" / "feature_ranking")
    back = read_ranking_table(result.table, [0, 1, 2], 4)  # what a later audit reads (feature_source=table)
    assert [(r.class_index, r.feature_index, r.rank) for r in back] == \
           [(r.class_index, r.feature_index, r.rank) for r in ref]
    rows = ds.dataset(result.table, format="parquet").to_table().to_pylist()
    assert {r["class_name"] for r in rows} == set(CLASSES) and {r["run_id"] for r in rows} == {f"r-{select}"}


def test_class_never_predicted_falls_back_to_weights(tmp_path, cache_dir, tiny_classifier, ray_local):
    """The tiny random classifier predicts every image as class 0: class 1 is ranked by weight alone."""
    write_images(tmp_path / "imgs", folders=2, per_folder=3)
    cfg = load_config(TINY_YAML, [f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}", "device=cpu",
                                  "targets.top_k=3", "targets.feature_source=images",
                                  f"targets.feature_images.path={tmp_path / 'imgs'}"])
    result = rank.rank_features_distributed(cfg, actors=1)
    ref = rank_from_images(tiny_classifier, ImageFolder(str(tmp_path / "imgs")), [0, 1], 3, "predicted", 50)
    assert_same_ranking(result.ranked, ref)
    assert [r.source for r in result.ranked] == ["images-predicted"] * 3 + ["weights (no images predicted as 1)"] * 3
    assert [r.n_images for r in result.ranked] == [6] * 3 + [0] * 3


@pytest.mark.parametrize("more, message", [
    (["targets.feature_images.path={tmp}/nowhere"], "feature image folder not found: .*nowhere"),
    (["targets.classes=[0, 7]"], "class index 7 out of range; the classifier has classes 0..2"),
    (["targets.feature_images.select=labelled", "targets.classes=[0, 1]"], None),  # fine: reaches Ray
    (["targets.feature_source=weights"], "rank-features reads images: set targets.feature_source=images"),
    (["targets.top_k=0"], "targets.top_k is 0: nothing to rank"),
])
def test_bad_input_fails_in_one_line_before_ray(world, tmp_path, monkeypatch, more, message):
    tmp, _ = world
    (tmp_path / "imgs" / "0").mkdir(parents=True)  # class 2 has no folder: fine for classes [0, 1] only
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "0" / "a.png")
    (tmp_path / "imgs" / "1").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "1" / "a.png")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("dxray.distributed.cluster.connect", no_ray)
    cfg = config(tmp, tmp_path / "imgs", *(m.format(tmp=tmp_path) for m in more))
    with pytest.raises(AssertionError if message is None else DxrayError, match=message or "Ray was started") as info:
        rank.rank_features_distributed(cfg)
    assert "\n" not in str(info.value)
    if message is None:  # the default classes [0, 1, 2] need a folder for class 2
        cfg = config(tmp, tmp_path / "imgs")
        with pytest.raises(DxrayError, match=r"has no images for class 2 \(expected a sub-folder named 2\)"):
            rank.rank_features_distributed(cfg)


def run_cli(args, cache, cmd=(sys.executable, "-m", "dxray"), timeout=180):
    env = dict(os.environ, DXRAY_CACHE=str(cache), PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_cli_rank_features_writes_a_readable_table(tmp_path, cache_dir):
    write_images(tmp_path / "imgs", folders=2, per_folder=3)
    out = tmp_path / "out"
    done = run_cli(["rank-features", str(TINY_YAML), f"output={out}", "targets.feature_source=images",
                    f"targets.feature_images.path={tmp_path / 'imgs'}", "cluster.local_cpus=2", "--actors", "1"],
                   cache_dir)
    assert done.returncode == 0, done.stderr
    folder = done.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(out)) and folder.endswith("/feature_ranking")
    rows = ds.dataset(folder, format="parquet").to_table().to_pylist()
    assert sorted((r["class_index"], r["rank"]) for r in rows) == [(0, 1), (1, 1)]  # tiny preset: top_k 1
    assert {r["source"] for r in rows} == {"images-predicted", "weights (no images predicted as 1)"}
    assert "ranked 2 classes from 6 images with 1 actor(s)" in done.stderr
    # the job entry point: one-line error, exit 2, before Ray
    bad = run_cli(["jobs/rank_features.py", str(TINY_YAML), "targets.feature_source=images",
                   f"targets.feature_images.path={tmp_path / 'nowhere'}"], cache_dir, cmd=(sys.executable,))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: feature image folder not found: {tmp_path / 'nowhere'}"]
