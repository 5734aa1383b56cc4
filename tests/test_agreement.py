"""Salient ImageNet agreement: human labels from a synthetic MTurk CSV (the real file may not be
redistributed), a run written with the real sink, hand-computed agreement, salient90, presets, CLI."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dxray import agreement as ag
from dxray.config import load_config
from dxray.errors import DxrayError
from dxray.storage.schemas import to_table
from dxray.storage.sink import RunSink
from dxray.verdict import decide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ["WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index", "Input.feature_rank",
          "Answer.main", "Answer.confidence", "Answer.reasons"]
M, S, B = "main_object", "separate_object", "background"


def write_annotations(path, pairs: dict[tuple[int, int, int], list[str]], drop: str | None = None, shuffle: int | None = None):
    """MTurk-format CSV: one row per (class, feature, rank) and annotator answer."""
    rows = [[str(w), f"n{c:08d}", c, f, r, a, "4.0", f"focus is on {a}, says worker {w}"]
            for (c, f, r), answers in pairs.items() for w, a in enumerate(answers)]
    if shuffle is not None:
        random.Random(shuffle).shuffle(rows)
    keep = [i for i, h in enumerate(HEADER) if h != drop]
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow([HEADER[i] for i in keep])
        out.writerows([[row[i] for i in keep] for row in rows])
    return str(path)


def test_majority_labels_with_the_edge_cases(tmp_path):
    path = write_annotations(tmp_path / "a.csv", {
        (1, 10, 1): [B, B, B, M, M],  # 3 of 5: spurious
        (1, 11, 2): [S, S, M, M, M],  # 2 of 5: core
        (1, 12, 3): [S, B, B, M, M],  # separate_object and background both count
        (1, 13, 4): [B, B, "unsure", "", M],  # unknown and empty answers count as not spurious
        (1, 14, 5): [M, M, M, M, M],
    })
    got = {r["feature_index"]: r for r in ag.read_annotations(path).to_pylist()}
    assert {f: r["human"] for f, r in got.items()} == {10: "spurious", 11: "core", 12: "spurious", 13: "core", 14: "core"}
    assert (got[13]["n_answers"], got[13]["n_spurious_answers"], got[13]["n_other_answers"]) == (5, 2, 2)
    assert [got[f]["feature_rank"] for f in range(10, 15)] == [1, 2, 3, 4, 5]


def test_missing_column_and_bad_values_are_one_line(tmp_path):
    pairs = {(1, 10, 1): [M] * 5}
    with pytest.raises(DxrayError, match=r"annotations .*b\.csv lacks column Answer\.main"):
        ag.read_annotations(write_annotations(tmp_path / "b.csv", pairs, drop="Answer.main"))
    with pytest.raises(DxrayError, match="annotations file not found"):
        ag.read_annotations(str(tmp_path / "nope.csv"))
    bad = tmp_path / "c.csv"
    bad.write_text("Input.class_index,Input.feature_index,Input.feature_rank,Answer.main\nx,1,1,background\n")
    with pytest.raises(DxrayError, match="column Input.class_index must hold integers"):
        ag.read_annotations(str(bad))
    twice = write_annotations(tmp_path / "d.csv", {(1, 10, 1): [M] * 3, (1, 10, 2): [M] * 2})
    with pytest.raises(DxrayError, match="class 1 feature 10 has two feature ranks"):
        ag.read_annotations(twice)


def _labels(tmp_path, spurious_per_class: dict[int, int], ranks=5):
    pairs = {(c, 100 * c + r, r): [B] * 5 if r <= k else [M] * 5 for c, k in spurious_per_class.items()
             for r in range(1, ranks + 1)}
    return ag.read_annotations(write_annotations(tmp_path / "g.csv", pairs))


def test_groups_by_bias_and_animacy(tmp_path):
    labels = _labels(tmp_path, {5: 0, 397: 2, 398: 5, 900: 4})
    groups = ag.class_groups(labels)  # default rule: 0..397 animate
    assert {c: (g["animacy"], g["bias"], g["n_spurious"]) for c, g in groups.items()} == {
        5: ("animate", "unbiased", 0), 397: ("animate", "medium", 2), 398: ("inanimate", "biased", 5),
        900: ("inanimate", "medium", 4)}
    meta = tmp_path / "class_metadata.csv"  # Salient ImageNet's layout (quoted supercategories, its spelling)
    meta.write_text('class_index,synset,wordnet_id,gloss,wikilinks,supercategory,image_paths\n'
                    '5,"electric ray, crampfish",n01496331,a ray,[],"Reptiles, fish, amphibians",[]\n'
                    "397,puffer,n02655020,a fish,[],Devices,[]\n"
                    "398,abacus,n02666196,a calculator,[],inverterbrates,[]\n"
                    '900,"water tower",n04562935,a tower,[],"Implements, containers, misc. objects",[]\n')
    by_meta = ag.class_groups(labels, ag.read_class_metadata(str(meta)), str(meta))
    assert {c: g["animacy"] for c, g in by_meta.items()} == {5: "animate", 397: "inanimate", 398: "animate",
                                                            900: "inanimate"}
    flags = tmp_path / "flags.csv"
    flags.write_text("class_index,animate\n5,0\n397,1\n398,true\n")
    with pytest.raises(DxrayError, match="has no row for class 900"):
        ag.class_groups(labels, ag.read_class_metadata(str(flags)), str(flags))
    flags.write_text("class_index,animate\n5,maybe\n")
    with pytest.raises(DxrayError, match="column animate must be true/false"):
        ag.read_class_metadata(str(flags))


def test_salient90_is_deterministic_balanced_and_reports_shortfalls(tmp_path):
    counts = {c: c % 6 for c in range(102)}  # 17 classes for every count 0..5
    labels = _labels(tmp_path, counts)
    groups = ag.class_groups(labels)
    chosen, short = ag.salient90(groups)
    assert len(chosen) == 90 and short == {} and chosen == sorted(chosen)
    assert sorted(sum(counts[c] == k for c in chosen) for k in range(6)) == [15] * 6
    shuffled = ag.read_annotations(write_annotations(tmp_path / "s.csv", {
        (c, 100 * c + r, r): [B] * 5 if r <= k else [M] * 5 for c, k in counts.items() for r in range(1, 6)}, shuffle=3))
    assert ag.salient90(ag.class_groups(shuffled)) == (chosen, {})  # the row order does not matter
    assert ag.salient90(groups, seed=1)[0] != chosen  # the seed does
    few = _labels(tmp_path, {c: k for c, k in counts.items() if k < 5 or c < 40} | {500: 0}, ranks=5)
    chosen_few, short_few = ag.salient90(ag.class_groups(few))
    assert short_few == {5: 6} and len(chosen_few) == 75 + 6
    part = ag.class_groups(_labels(tmp_path, {1: 0, 2: 0}, ranks=4))  # only 4 ranks annotated: not eligible
    assert ag.salient90(part) == ([], {k: 0 for k in range(6)})


# The hand-made run: r per image for (class, feature); human labels give class 1 medium (1 spurious),
# class 400 unbiased (0) and class 401 biased (5). At delta 0.3 the verdicts agree on 4, 4 and 3 of 5.
R = {1: {10: [0.1, 0.1], 11: [0.5, 0.5], 12: [0.2, 0.2], 13: [0.9, 0.7], 14: [0.4, 0.2], 99: [0.0, 0.0]},
     400: {20: [0.6, 0.6], 21: [0.6, 0.6], 22: [0.6, 0.6], 23: [0.6, 0.6], 24: [0.0, 0.0]},
     401: {30: [0.1, 0.1], 31: [0.1, 0.1], 32: [0.1, 0.1], 33: [0.8, 0.8], 34: [0.8, 0.8]}}
HUMAN_SPURIOUS = {(1, 10)} | {(401, f) for f in range(30, 35)}


def _run(tmp_path, delta=0.3):
    run_id = "run-agree"
    sink = RunSink(str(tmp_path / "out"), run_id)
    tasks, samples = [], []
    for c, feats in R.items():
        for rank, (f, rs) in enumerate(feats.items(), start=1):
            tid = f"t{c}-{f}"
            tasks.append({"run_id": run_id, "task_id": tid, "kind": "feature", "class_index": c, "class_name": f"c{c}",
                          "feature_index": f, "feature_rank": rank, "template": "{}", "status": "ok"})
            samples += [{"run_id": run_id, "task_id": tid, "class_index": c, "feature_index": f, "seed": i,
                         "object_fraction": r} for i, r in enumerate(rs)]
    sink.write_table("tasks", tasks, part="all")
    sink.write_table("samples", samples, part="all")
    verdicts, classes = decide(sink.read_table("tasks"), sink.read_table("samples"), delta, run_id)
    sink.write_table("verdicts", verdicts, part="all")
    pairs = {(c, f, rank): [B, B, S, M, M] if (c, f) in HUMAN_SPURIOUS else [M, M, M, S, B]
             for c, feats in R.items() for rank, f in enumerate(feats, start=1) if f != 99}
    pairs[(7, 70, 1)] = [M] * 5  # annotated, never audited
    return sink, write_annotations(tmp_path / "discover_spurious_features.csv", pairs)


def _cells(rows, stored=True, delta=0.3):
    return {(r["animacy"], r["bias"]): r for r in rows if r["stored"] is stored and abs(r["delta"] - delta) < 1e-6}


def test_agreement_by_hand_with_groups_table_and_chart(tmp_path):
    sink, annotations = _run(tmp_path)
    result = ag.run_agreement(sink.uri(""), annotations)
    cells = _cells(result.rows)
    expected = {("all", "all"): (15, 11), ("animate", "all"): (5, 4), ("inanimate", "all"): (10, 7),
                ("all", "unbiased"): (5, 4), ("all", "medium"): (5, 4), ("all", "biased"): (5, 3),
                ("animate", "unbiased"): (0, 0), ("animate", "medium"): (5, 4), ("animate", "biased"): (0, 0),
                ("inanimate", "unbiased"): (5, 4), ("inanimate", "medium"): (0, 0), ("inanimate", "biased"): (5, 3)}
    assert {k: (r["n_pairs"], r["n_agree"]) for k, r in cells.items()} == expected
    top = cells[("all", "all")]
    assert top["agreement"] == pytest.approx(11 / 15) and cells[("animate", "unbiased")]["agreement"] is None
    assert (top["n_human_spurious"], top["n_dxray_spurious"], top["n_both_spurious"], top["n_classes"]) == (6, 6, 4, 3)
    assert result.unlabelled == 1 and result.classes == [1, 400, 401] and result.subset == "all"
    assert result.other_answers == 0
    # the table on disk is the same rows, with the published schema
    table = pq.read_table(tmp_path / "out" / "run-agree" / "agreement" / "part-all.parquet")
    assert table.schema.equals(to_table("agreement", []).schema) and table.num_rows == len(result.rows)
    assert sink.read_table("agreement").num_rows == len(result.rows)
    # the chart decodes, has the expected size and is not blank
    img = Image.open(result.chart)
    img.load()
    assert img.format == "PNG" and img.size == (760, 420) and len(img.convert("RGB").getcolors(1 << 20)) > 3


def test_delta_sweep_is_decide_at_each_delta(tmp_path):
    sink, annotations = _run(tmp_path)
    result = ag.run_agreement(sink.uri(""), annotations, deltas=[0.05, 0.3, 0.65])
    labels = ag.read_annotations(annotations)
    groups = ag.class_groups(labels)
    tasks, samples = sink.read_table("tasks"), sink.read_table("samples")
    for delta in (0.05, 0.3, 0.65):
        verdicts, _ = decide(tasks, samples, delta, sink.run_id)
        direct = ag.agreement_rows(to_table("verdicts", verdicts), labels, groups, stored=False,
                                   annotations="discover_spurious_features.csv")
        assert list(_cells(direct, stored=False, delta=delta).values()) == list(_cells(result.rows, False, delta).values())
    stored, swept = _cells(result.rows, True), _cells(result.rows, False, 0.3)
    assert all({**stored[k], "stored": False} == swept[k] for k in stored)  # the run was decided at 0.3
    low = _cells(result.rows, False, 0.05)[("all", "all")]  # all core but feature 24 (r = 0), a human-core pair:
    assert (low["n_agree"], low["n_dxray_spurious"], low["n_both_spurious"]) == (8, 1, 0)  # 9 human-core pairs - 1
    assert {r["delta"] for r in result.rows if not r["stored"]} == {0.05, 0.3, 0.65}


def test_subset_restricts_the_comparison(tmp_path):
    sink, _ = _run(tmp_path)
    counts = {c: c % 6 for c in range(1, 103)} | {400: 0, 401: 5}
    labels_path = write_annotations(tmp_path / "big.csv", {
        (c, f, rank): [B] * 5 if rank <= counts[c] else [M] * 5
        for c in counts for rank, f in enumerate(R.get(c, {100 * c + r: 0 for r in range(1, 6)}), start=1) if f != 99})
    chosen, _ = ag.salient90(ag.class_groups(ag.read_annotations(labels_path)))
    result = ag.run_agreement(sink.uri(""), labels_path, subset="salient90", deltas=[0.3])
    assert result.classes == sorted({1, 400, 401} & set(chosen)) and result.classes
    assert set(result.missing) == set(chosen) - {1, 400, 401} and result.subset == "salient90"
    assert {r["subset"] for r in result.rows} == {"salient90"}
    assert (tmp_path / "out" / "run-agree" / "agreement" / "part-salient90.parquet").exists()
    assert result.chart.endswith("agreement-salient90.png")
    with pytest.raises(DxrayError, match="--subset must be one of salient90"):
        ag.run_agreement(sink.uri(""), labels_path, subset="salient100")


def test_roc_auc_of_perfect_inverted_and_tied_scores():
    assert ag.roc_auc([0.9, 0.8, 0.1, 0.0], [True, True, False, False]) == 1.0  # core features have the high r
    assert ag.roc_auc([0.9, 0.8, 0.1, 0.0], [False, False, True, True]) == 0.0  # inverted
    assert ag.roc_auc([0.3, 0.3, 0.3], [True, False, True]) == 0.5  # all tied: chance
    # 2 positives (0.5, 0.2) x 2 negatives (0.2, 0.1): 0.5>0.2, 0.5>0.1, 0.2=0.2 (half), 0.2>0.1 -> 3.5 / 4
    assert ag.roc_auc([0.5, 0.2, 0.2, 0.1], [True, True, False, False]) == 0.875
    assert ag.roc_auc([0.5, 0.2], [True, True]) is None  # one label only: undefined
    assert ag.roc_auc([], []) is None
    assert ag.roc_auc([0.5, None], [True, False]) is None  # a pair without a mean r


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), st.booleans()), min_size=2, max_size=30))
def test_roc_auc_is_the_share_of_correctly_ordered_pairs(items):
    scores, core = [s for s, _ in items], [c for _, c in items]
    pos, neg = [s for s, c in items if c], [s for s, c in items if not c]
    if not pos or not neg:
        assert ag.roc_auc(scores, core) is None
        return
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]  # every (core, spurious) pair, ties half
    assert ag.roc_auc(scores, core) == pytest.approx(sum(pairs) / len(pairs))


def test_roc_auc_per_group_beside_the_delta_sweep(tmp_path):
    sink, annotations = _run(tmp_path)
    result = ag.run_agreement(sink.uri(""), annotations, deltas=[0.05, 0.65])
    # human-core means: class 1 .5 .2 .8 .3, class 400 .6 .6 .6 .6 .0; human-spurious: class 1 .1, class 401
    # .1 .1 .1 .8 .8. Of the 9 x 6 pairs, 8 cores beat the four 0.1s (32); the core "0.8" (the mean of 0.9 and
    # 0.7 stored as float32) lies just below the float32 0.8s, so it beats no 0.8: 32 / 54.
    stored = _cells(result.rows)
    assert stored[("all", "all")]["roc_auc"] == pytest.approx(32 / 54)
    assert stored[("animate", "all")]["roc_auc"] == 1.0  # class 1 alone: 4 cores all above its one 0.1
    assert stored[("inanimate", "all")]["roc_auc"] == pytest.approx(12 / 25)  # four 0.6s beat three 0.1s; 0.0 none
    assert stored[("all", "unbiased")]["roc_auc"] is None and stored[("all", "biased")]["roc_auc"] is None
    for delta in (0.05, 0.65):  # threshold-free: every delta of the sweep carries the same figure
        swept = _cells(result.rows, stored=False, delta=delta)
        assert {k: r["roc_auc"] for k, r in swept.items()} == {k: r["roc_auc"] for k, r in stored.items()}


def test_bare_verdicts_file_writes_beside_it(tmp_path):
    sink, annotations = _run(tmp_path)
    bare = tmp_path / "elsewhere"
    bare.mkdir()
    pq.write_table(sink.read_table("verdicts"), bare / "verdicts.parquet")
    result = ag.run_agreement(str(bare / "verdicts.parquet"), annotations)
    assert (bare / "agreement" / "part-all.parquet").exists() and (bare / "agreement.png").exists()
    assert all(r["stored"] for r in result.rows) and _cells(result.rows)[("all", "all")]["n_agree"] == 11
    folder = tmp_path / "exported"  # a folder holding a verdicts dataset, no run
    (folder / "verdicts").mkdir(parents=True)
    pq.write_table(sink.read_table("verdicts"), folder / "verdicts" / "part-0.parquet")
    again = ag.run_agreement(str(folder), annotations)
    assert again.rows == result.rows and (folder / "agreement" / "part-all.parquet").exists()
    with pytest.raises(DxrayError, match="--deltas needs a run folder"):
        ag.run_agreement(str(bare / "verdicts.parquet"), annotations, deltas=[0.2])
    with pytest.raises(DxrayError, match="no run folder or verdicts file"):
        ag.run_agreement(str(tmp_path / "missing"), annotations)
    other = write_annotations(tmp_path / "other.csv", {(7, 70, 1): [M] * 5})
    with pytest.raises(DxrayError, match="has a human label"):
        ag.run_agreement(str(bare / "verdicts.parquet"), other)


def test_ranking_from_annotations_reads_back_as_a_feature_table(tmp_path):
    from dxray.features import read_ranking_table

    _, annotations = _run(tmp_path)
    cfg = load_config(None, [f"output={tmp_path / 'rank'}", "run_id=top5", "targets.classes=[401, 1]", "targets.top_k=3"])
    table, n = ag.write_annotation_ranking(cfg, annotations)
    assert n == 2 and table == str(tmp_path / "rank" / "top5" / "feature_ranking")
    back = read_ranking_table(table, [401, 1], 3)
    assert [(r.class_index, r.feature_index, r.rank) for r in back] == [
        (401, 30, 1), (401, 31, 2), (401, 32, 3), (1, 10, 1), (1, 11, 2), (1, 12, 3)]
    written = pq.read_table(os.path.join(table, "part-all.parquet")).to_pylist()
    assert {r["source"] for r in written} == {"annotations:discover_spurious_features.csv"}
    cfg = load_config(None, [f"output={tmp_path / 'rank'}", "targets.classes=[3]"])
    with pytest.raises(DxrayError, match="no rows for class 3"):
        ag.write_annotation_ranking(cfg, annotations)


@pytest.mark.parametrize("name", ["salient_imagenet_90.yaml", "imagenet_full.yaml"])
def test_presets_validate(name):
    cfg = load_config(os.path.join(ROOT, "jobs", "configs", name))
    assert cfg.generator.resolution == 512 and cfg.generator.steps == 4 and cfg.targets.top_k == 5
    assert cfg.classifier.spec == "robust-resnet50:/data/imagenet_l2_3_0.pt"
    if name == "imagenet_full.yaml":
        assert cfg.targets.classes == list(range(1000))
    else:
        assert cfg.targets.feature_source == "table" and cfg.targets.feature_table


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "dxray", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)


def test_cli_agreement_prints_writes_and_fails_in_one_line(tmp_path):
    sink, annotations = _run(tmp_path)
    ok = _cli("agreement", sink.uri(""), "--annotations", annotations, "--deltas", "0.1,0.3")
    assert ok.returncode == 0, ok.stderr
    assert "73.3%" in ok.stdout and "delta sweep" in ok.stdout  # 11 of 15
    auc_line = next(line for line in ok.stdout.splitlines() if line.startswith("ROC AUC of mean r"))
    assert auc_line.endswith(": 0.593 (animate 1.000, inanimate 0.480)")  # 32/54; 4/4; 12/25 (by hand below)
    assert (tmp_path / "out" / "run-agree" / "agreement.png").exists()
    broken = write_annotations(tmp_path / "broken.csv", {(1, 10, 1): [M] * 5}, drop="Input.feature_rank")
    bad = _cli("agreement", sink.uri(""), "--annotations", broken)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "lacks column Input.feature_rank" in bad.stderr and "broken.csv" in bad.stderr
    classes = _cli("agreement", "--annotations", annotations, "--subset", "salient90", "--print-classes")
    assert classes.returncode == 0 and classes.stdout.strip().startswith("[")
    assert load_config(None, [f"targets.classes={classes.stdout.strip()}"]).targets.classes  # usable as an override
    help_text = " ".join(_cli("agreement", "--help").stdout.split())
    assert "Example: dxray agreement" in help_text


def test_cli_rank_features_from_annotations_needs_no_images(tmp_path):
    _, annotations = _run(tmp_path)
    r = _cli("rank-features", os.path.join(ROOT, "jobs", "configs", "salient_imagenet_90.yaml"),
             "--from-annotations", annotations, f"output={tmp_path / 'o'}", "run_id=top5", "targets.classes=[1,400]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "o" / "top5" / "feature_ranking")
    rows = pq.read_table(tmp_path / "o" / "top5" / "feature_ranking" / "part-all.parquet")
    assert rows.num_rows == 10 and set(rows["class_index"].to_pylist()) == {1, 400}


def test_unreliable_classes_are_counted_and_left_out_on_request(tmp_path):
    """Class 1's segmenter control failed: its pairs are shown (and counted as unreliable) by default, and
    left out with exclude_unreliable, which changes the agreement to that of the other classes alone."""
    labels = _labels(tmp_path, {1: 2, 2: 0})
    groups = ag.class_groups(labels)
    verdicts = [{"run_id": "r", "class_index": c, "class_name": f"c{c}", "feature_index": 100 * c + k, "feature_rank": k,
                 "template": "{}", "delta": 0.3, "mean_object_fraction": 0.5, "verdict": "core", "reliable": c != 1}
                for c in (1, 2) for k in range(1, 6)]
    table = to_table("verdicts", verdicts)
    shown = {(r["animacy"], r["bias"]): r for r in ag.agreement_rows(table, labels, groups, stored=True)}
    left = {(r["animacy"], r["bias"]): r for r in ag.agreement_rows(table, labels, groups, stored=True,
                                                                    exclude_unreliable=True)}
    assert (shown["all", "all"]["n_pairs"], shown["all", "all"]["n_unreliable"]) == (10, 5)
    assert shown["all", "all"]["agreement"] == pytest.approx(8 / 10)  # class 1: 2 human-spurious called core
    assert (left["all", "all"]["n_pairs"], left["all", "all"]["n_unreliable"]) == (5, 5)
    assert left["all", "all"]["agreement"] == 1.0 and left["all", "all"]["exclude_unreliable"] is True
    assert left["animate", "medium"]["n_pairs"] == 0 and left["animate", "medium"]["n_unreliable"] == 5
