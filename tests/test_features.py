"""Top-k features per class: image-based ranking checked against hand arithmetic, folders, tables."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, PngImagePlugin
from torch import nn

from dxray.classifiers import Classifier
from dxray.errors import DxrayError
from dxray.features import (
    ImageFolder,
    RankedFeature,
    check_image_folder,
    mean_activations,
    rank_by_activation,
    rank_by_weights,
    rank_from_images,
    ranking_rows,
    read_ranking_table,
)

# fc weights (3 classes × 4 features); the hidden features of a solid (r, g, b) image are
# f = [r, g, b, max(r - g, 0)] (channel means, then ReLU), so everything below is plain arithmetic.
W = [[2.0, -1.0, 0.5, 1.0],
     [-1.0, 2.0, 0.5, -1.0],
     [0.3, 0.1, 2.0, 0.5]]
# folder (labelled class) -> solid colours in [0, 1]; (1, .6, 0) sits in folder 1 but is predicted 0
FOLDERS = {0: [(1, 0, 0), (1, 0.4, 0)], 1: [(0, 1, 0), (0.4, 1, 0.2), (1, 0.6, 0)], 2: [(0, 0, 1), (0.2, 0, 1)]}


def hand_features(rgb):
    r, g, b = rgb
    return [r, g, b, max(r - g, 0.0)]


def hand_predict(rgb):
    f = hand_features(rgb)
    logits = [sum(w * x for w, x in zip(row, f, strict=True)) for row in W]
    return logits.index(max(logits))


def hand_ranking(c, colours):
    """[(feature, W[c, f] × mean_f)] sorted by importance, from the hand-computed features."""
    feats = [hand_features(rgb) for rgb in colours]
    mean = [sum(f[j] for f in feats) / len(feats) for j in range(4)]
    return sorted(((j, W[c][j] * mean[j]) for j in range(4)), key=lambda t: -t[1])


def make_classifier() -> Classifier:
    hidden = nn.Linear(3 * 8 * 8, 4, bias=False)
    fc = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        a = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, -1, 0]])  # feature j = a[j] · channel means
        hidden.weight.copy_(a.repeat_interleave(64, dim=1) / 64)
        fc.weight.copy_(torch.tensor(W))
    model = nn.Sequential()
    model.add_module("flatten", nn.Flatten())
    model.add_module("hidden", hidden)
    model.add_module("relu", nn.ReLU())
    model.add_module("fc", fc)
    return Classifier(model, final_layer="fc", class_names=["red", "green", "blue"], input_size=(8, 8),
                      mean=(0, 0, 0), std=(1, 1, 1))


def save_solid(path, rgb, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), tuple(round(255 * v) for v in rgb)).save(path)


def write_folders(root, folders, name=str):
    for c, colours in folders.items():
        for i, rgb in enumerate(colours):
            save_solid(root / name(c) / f"img{i}.png", rgb)
    return root


@pytest.fixture(scope="module")
def clf():
    return make_classifier()


@pytest.fixture
def folder(tmp_path):
    return ImageFolder(str(write_folders(tmp_path / "imgs", FOLDERS)), None)


def test_hand_example_is_consistent():
    """The deliberately mislabelled image really is predicted as another class."""
    assert [hand_predict(rgb) for rgb in FOLDERS[1]] == [1, 1, 0]
    assert all(hand_predict(rgb) == c for c in (0, 2) for rgb in FOLDERS[c])


def test_classifier_features_match_hand_arithmetic(clf, folder):
    for c, colours in FOLDERS.items():
        for path, rgb in zip(folder.images(c, None), colours, strict=True):
            x = torch.from_numpy(folder.load(path).copy()).permute(2, 0, 1)[None].float() / 255
            out = clf(x, layers=["penultimate"])
            assert out["penultimate"][0].tolist() == pytest.approx(hand_features(rgb), abs=1e-5)
            assert int(out["logits"].argmax()) == hand_predict(rgb)


@pytest.mark.parametrize("select", ["predicted", "labelled"])
def test_rank_from_images_matches_hand_computation(clf, folder, select):
    ranked = rank_from_images(clf, folder, [0, 1, 2], 4, select, None)
    every = [rgb for colours in FOLDERS.values() for rgb in colours]
    for c in (0, 1, 2):
        colours = [rgb for rgb in every if hand_predict(rgb) == c] if select == "predicted" else FOLDERS[c]
        expected = hand_ranking(c, colours)
        mine = [r for r in ranked if r.class_index == c]
        assert [r.feature_index for r in mine] == [f for f, _ in expected]
        assert [r.importance for r in mine] == pytest.approx([v for _, v in expected], abs=1e-5)
        assert [r.rank for r in mine] == [1, 2, 3, 4]
        assert {r.source for r in mine} == {f"images-{select}"}
        assert {r.n_images for r in mine} == {len(colours)}


def test_predicted_class0_literal_values(clf, folder):
    # images predicted 0: (1,0,0), (1,.4,0), (1,.6,0) -> mean f = [1, 1/3, 0, 2/3]; × W[0] = [2, -1/3, 0, 2/3]
    ranked = rank_from_images(clf, folder, [0], 3, "predicted", None)
    assert [(r.feature_index, r.rank) for r in ranked] == [(0, 1), (3, 2), (2, 3)]
    assert [r.importance for r in ranked] == pytest.approx([2.0, 2 / 3, 0.0], abs=1e-5)


def test_labelled_and_predicted_use_different_image_sets(clf, folder):
    lab = mean_activations(clf, folder, [0, 1], "labelled", None)
    pred = mean_activations(clf, folder, [0, 1], "predicted", None, batch_size=2)
    assert (lab[0][1], lab[1][1]) == (2, 3)
    assert (pred[0][1], pred[1][1]) == (3, 2)  # the orange image in folder 1 moves to class 0
    assert lab[1][0].tolist() == pytest.approx([1.4 / 3, 2.6 / 3, 0.2 / 3, 0.4 / 3], abs=1e-5)
    assert pred[1][0].tolist() == pytest.approx([0.2, 1.0, 0.1, 0.0], abs=1e-5)
    assert lab[0][0].shape == (4,) and lab[0][0].dtype == torch.float32


def test_limit_caps_images_per_folder(clf, folder):
    acts = mean_activations(clf, folder, [0, 1], "labelled", 1)
    assert (acts[0][1], acts[1][1]) == (1, 1)
    assert acts[1][0].tolist() == pytest.approx(hand_features((0, 1, 0)), abs=1e-5)


def test_images_of_other_sizes_are_resized(clf, tmp_path):
    save_solid(tmp_path / "f" / "0" / "big.png", (1, 0, 0), size=20)
    save_solid(tmp_path / "f" / "0" / "small.png", (1, 0.4, 0), size=5)
    acts = mean_activations(clf, ImageFolder(str(tmp_path / "f"), None), [0], "labelled", None)
    assert acts[0][1] == 2
    assert acts[0][0].tolist() == pytest.approx([1, 0.2, 0, 0.8], abs=1e-3)


def test_weight_fallback_when_nothing_is_predicted_as_a_class(clf, tmp_path):
    # folder 1 holds only a red image (predicted 0): nothing is predicted as class 1
    folder = ImageFolder(str(write_folders(tmp_path / "f", {0: [(1, 0, 0)], 1: [(1, 0, 0)]})), None)
    acts = mean_activations(clf, folder, [0, 1], "predicted", None)
    assert acts[1][1] == 0 and acts[1][0].tolist() == [0.0] * 4
    assert acts[0][1] == 2
    ranked = rank_from_images(clf, folder, [0, 1], 2, "predicted", None)
    fallback = [r for r in ranked if r.class_index == 1]
    assert [r.feature_index for r in fallback] == [1, 2]  # W[1] = [-1, 2, .5, -1]
    assert [r.importance for r in fallback] == pytest.approx([2.0, 0.5])
    assert {r.source for r in fallback} == {"weights (no images predicted as 1)"}
    assert [r.source for r in ranked if r.class_index == 0] == ["images-predicted"] * 2


def test_rank_by_activation_and_weights():
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    ranked = rank_by_activation(w, torch.tensor([4.0, -1.0, 0.5]), 0, 2, "images-labelled", 7)
    # feature 1 has the larger product than feature 2 (-2 x -1 = 2 > 1.5), but maximising it lowers class 0's score
    assert ranked == [RankedFeature(0, 0, 1, 4.0, "images-labelled", 7), RankedFeature(0, 2, 2, 1.5, "images-labelled", 7)]
    assert [r.feature_index for r in rank_by_activation(w, torch.tensor([4.0, -1.0, 0.5]), 0, 3, "x", 1)] == [0, 2, 1]
    assert [r.feature_index for r in rank_by_weights(w, 0, 5)] == [2, 0, 1]  # k larger than D
    assert rank_by_weights(w, 0, 1)[0] == RankedFeature(0, 2, 1, 3.0, "weights")


def test_wnid_folders_and_unrelated_folders(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    root = tmp_path / "in"
    for name in ("n01484850", "n01440764", "misc", "n99999999"):
        save_solid(root / name / "a.JPEG", (1, 0, 0))
    (root / "7").write_text("a file, not a folder")
    folder = ImageFolder(str(root), wnids)
    assert {c: p.rsplit("/", 1)[1] for c, p in folder.class_folders().items()} == {0: "n01440764", 2: "n01484850"}
    assert folder.images(0, None)[0].endswith("n01440764/a.JPEG")
    assert folder.images(1, None) == []
    with pytest.raises(DxrayError, match="has no images for class 1 .*named 1 / n01443537"):
        check_image_folder(folder, [0, 1], "predicted")
    check_image_folder(folder, [0, 2], "labelled")


def test_zero_padded_index_folders_and_image_files(tmp_path):
    root = tmp_path / "idx"
    for name in ("0000", "0007", "12", "other", "n01440764"):
        (root / name).mkdir(parents=True)
    for fname in ("b.png", "a.JPG", "c.webp", "d.jpeg", "e.bmp", "notes.txt", ".hidden.png"):
        Image.new("RGBA" if fname.endswith("png") else "RGB", (4, 3), (10, 20, 30)).save(
            root / "0007" / fname, format={"jpg": "JPEG", "jpeg": "JPEG", "txt": "PNG"}.get(fname.rsplit(".", 1)[1].lower()))
    folder = ImageFolder(f"file://{root}", None)  # a URI goes through pyarrow's FileSystem.from_uri
    assert sorted(folder.class_folders()) == [0, 7, 12]
    names = [p.rsplit("/", 1)[1] for p in folder.images(7, None)]
    assert names == ["a.JPG", "b.png", "c.webp", "d.jpeg", "e.bmp"]
    assert len(folder.images(7, 2)) == 2
    img = folder.load(folder.images(7, None)[1])
    assert img.shape == (3, 4, 3) and img.dtype == np.uint8 and img[0, 0].tolist() == [10, 20, 30]


def test_check_image_folder_errors(tmp_path, folder):
    check_image_folder(folder, [0, 1, 2], "predicted")
    with pytest.raises(DxrayError, match="feature image folder not found: .*nowhere"):
        check_image_folder(ImageFolder(str(tmp_path / "nowhere"), None), [0], "predicted")
    with pytest.raises(DxrayError, match=r"has no images for class 7 \(expected a sub-folder named 7\)"):
        check_image_folder(folder, [0, 7], "labelled")
    (tmp_path / "imgs" / "5").mkdir()  # an empty class folder counts as missing
    with pytest.raises(DxrayError, match="has no images for class 5"):
        check_image_folder(folder, [5], "labelled")
    with pytest.raises(DxrayError, match="'random'") as info:
        check_image_folder(folder, [0], "random")
    assert "\n" not in str(info.value)


def table_rows():
    return {"class_index": [3, 3, 3, 1, 1, 1], "feature_index": [10, 11, 12, 20, 21, 22],
            "rank": [2, 1, 3, 1, 2, 3], "importance": [0.5, 0.9, 0.1, 2.0, 1.0, 0.5]}


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_read_ranking_table(tmp_path, ext):
    path = tmp_path / f"rank.{ext}"
    table = pa.table(table_rows())
    if ext == "csv":
        path.write_text("class_index,feature_index,rank,importance\n" + "\n".join(
            ",".join(str(v) for v in row.values()) for row in table.to_pylist()))
    else:
        pq.write_table(table, path)
    ranked = read_ranking_table(str(path), [3, 1], 2)
    assert [(r.class_index, r.feature_index, r.rank) for r in ranked] == [(3, 11, 1), (3, 10, 2), (1, 20, 1), (1, 21, 2)]
    assert [r.importance for r in ranked] == pytest.approx([0.9, 0.5, 2.0, 1.0])
    assert {r.source for r in ranked} == {f"table:rank.{ext}"} and {r.n_images for r in ranked} == {None}
    assert len(read_ranking_table(str(path))) == 6
    assert [r.class_index for r in read_ranking_table(str(path), [1])] == [1, 1, 1]


def test_read_ranking_table_errors(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({k: v for k, v in table_rows().items() if k != "importance"}), path)
    ranked = read_ranking_table(str(path), [1], 1)
    assert len(ranked) == 1 and math.isnan(ranked[0].importance)
    with pytest.raises(DxrayError, match="no rows for class 4"):
        read_ranking_table(str(path), [1, 4], 5)
    bad = tmp_path / "bad.csv"
    bad.write_text("class_index,feature\n1,2\n")
    with pytest.raises(DxrayError, match="lacks column.*feature_index, rank"):
        read_ranking_table(str(bad))
    with pytest.raises(DxrayError, match="feature table not found: .*missing.csv"):
        read_ranking_table(str(tmp_path / "missing.csv"))
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(DxrayError, match=r"\.csv or \.parquet"):
        read_ranking_table(str(tmp_path / "t.txt"))


def test_ranking_rows():
    ranked = [RankedFeature(1, 5, 1, 0.25, "images-predicted", 12), RankedFeature(0, 2, 1, float("nan"), "config")]
    rows = ranking_rows("run1", ranked, ["a", "b"])
    assert rows == [
        {"run_id": "run1", "class_index": 1, "class_name": "b", "feature_index": 5, "rank": 1, "importance": 0.25,
         "source": "images-predicted", "n_images": 12},
        {"run_id": "run1", "class_index": 0, "class_name": "a", "feature_index": 2, "rank": 1, "importance": None,
         "source": "config", "n_images": None},
    ]


def _pixel_bomb(factor: float):
    """A PNG of one colour, 1 bit a pixel: KBs on disk, ``factor`` times Pillow's pixel limit once decoded."""
    side = math.ceil(math.sqrt(factor * Image.MAX_IMAGE_PIXELS))
    return lambda path: Image.new("1", (side, side)).save(path, optimize=True)


def _text_chunk_bomb(path):
    """A small PNG whose compressed text chunk inflates past ``PngImagePlugin.MAX_TEXT_CHUNK``."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (2 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, pnginfo=info)


BOMBS = {"pixels past twice the limit": _pixel_bomb(2.2),  # Pillow raises DecompressionBombError
         "pixels just past the limit": _pixel_bomb(1.1),  # Pillow only warns (DecompressionBombWarning)
         "a text chunk": _text_chunk_bomb}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_decompression_bomb_is_skipped_with_a_warning(bomb, clf, folder, tmp_path, caplog):
    """A bomb among the feature images is skipped like a corrupt image: a warning naming it, and the ranking of
    the other images, never decoded (a 2.2x bomb alone would be gigabytes as float tensors)."""
    path = tmp_path / "imgs" / "1" / "img9-bomb.png"
    BOMBS[bomb](path)
    assert path.stat().st_size < 100_000
    clean = ImageFolder(str(write_folders(tmp_path / "clean", FOLDERS)), None)
    for select in ("labelled", "predicted"):
        caplog.clear()
        ranked = rank_from_images(clf, folder, [0, 1, 2], 4, select, None)
        expected = rank_from_images(clf, clean, [0, 1, 2], 4, select, None)
        assert [(r.class_index, r.feature_index, r.n_images) for r in ranked] == \
               [(r.class_index, r.feature_index, r.n_images) for r in expected]
        assert [r.importance for r in ranked] == pytest.approx([r.importance for r in expected], abs=1e-6)
        [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warning.startswith(f"skipping unreadable image {path}: ")


def test_the_ray_ranking_actor_hands_skipped_images_to_the_driver(tiny_config, tmp_path):
    """On Ray the images are read in actors, whose log may never reach the driver: the batch's result names the
    images it skipped, for the driver to warn of them."""
    from dxray.distributed.rank import ClassActivationSums

    root = write_folders(tmp_path / "imgs", {0: FOLDERS[0], 1: FOLDERS[1]})
    bomb = root / "0" / "img9-bomb.png"
    BOMBS["pixels past twice the limit"](bomb)
    folder = ImageFolder(str(root), None)
    paths = folder.images(0) + folder.images(1)
    rows = {"path": np.array(paths), "folder_class": np.array([0] * len(folder.images(0)) + [1] * 3)}
    actor = ClassActivationSums(tiny_config, folder, [0, 1], "labelled")
    out = actor(rows)
    assert [(p, why.startswith("not decoded: Image size")) for p, why in json.loads(out["skipped"][0])] == \
           [(str(bomb), True)]
    keep = np.array([p != str(bomb) for p in paths])
    clean = actor({k: v[keep] for k, v in rows.items()})
    assert out["count"].tolist() == clean["count"].tolist() == [2, 3] and json.loads(clean["skipped"][0]) == []
    np.testing.assert_allclose(out["sum"], clean["sum"], rtol=1e-6)


@pytest.mark.parametrize("command", ["explain", "rank-features"])  # ranked in this process / on Ray Data
def test_a_run_over_a_decompression_bomb_warns_and_ranks_the_other_images(command, tmp_path, cache_dir):
    from conftest import ROOT, TINY_YAML

    root = write_folders(tmp_path / "imgs", {0: FOLDERS[0], 1: FOLDERS[1]})
    bomb = root / "1" / "img9-bomb.png"
    BOMBS["pixels past twice the limit"](bomb)
    out = tmp_path / "out"
    args = [str(TINY_YAML), f"output={out}", f"cache_dir={cache_dir}", "device=cpu", "targets.feature_source=images",
            f"targets.feature_images.path={root}", "targets.feature_images.select=labelled"]
    if command == "explain":
        args += ["targets.class_task=false", "optimize.steps=1", "sample.k=1", "segment.enabled=false"]
    res = subprocess.run([sys.executable, "-m", "dxray", command, *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, DXRAY_CACHE=str(cache_dir)))
    assert res.returncode == 0, res.stderr
    assert f"skipping unreadable image {bomb}: not decoded: Image size" in res.stderr
    [run] = [p for p in out.iterdir() if p.is_dir()]
    ranking = pq.read_table(run / "feature_ranking").to_pylist()
    assert {(r["class_index"], r["n_images"], r["source"]) for r in ranking} == \
           {(0, 2, "images-labelled"), (1, 3, "images-labelled")}
