"""Every ```python block of docs/analytics.md runs against a real run, and its answers agree with the tables.

The run is the tiny preset, audited in this process; its verdicts are re-decided at the median r so
that some features are core and some spurious. The blocks of the "Reading from S3" section read the
same run copied to a real S3 server (the session's SeaweedFS); the Ray Data blocks use the session's
local Ray. A block is checked through the names it defines: ``spurious_per_class``, ``most_biased``,
``r_per_image``.
"""

from __future__ import annotations

import math
import re
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from conftest import ROOT, TINY_YAML

DOC = ROOT / "docs" / "analytics.md"
S3_SECTION = "Reading from S3"
CHECKED = ("spurious_per_class", "most_biased", "r_per_image", "unsure_verdicts", "new_spurious", "spurious_concepts")


def blocks() -> list[tuple[str, str, str]]:
    """(id, section, code) of every ```python block, in order."""
    out, section, counts = [], "", {}
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", DOC.read_text(), re.M | re.S):
        if m.group(1):
            section = m.group(1).strip()
            continue
        key = section.lower().replace(" ", "-") if section != S3_SECTION else "s3"
        counts[key] = counts.get(key, 0) + 1
        out.append((f"{key}-{counts[key]}", section, m.group(2)))
    return out


BLOCKS = blocks()


def _plain(v):
    if hasattr(v, "item") and not isinstance(v, bytes | str):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def rows(x) -> list[dict]:
    """Rows of whatever a snippet produced: Arrow, Polars or pandas frame, or a Ray Dataset."""
    if isinstance(x, pa.Table):
        return x.to_pylist()
    if hasattr(x, "take_all"):
        return [{k: _plain(v) for k, v in r.items()} for r in x.take_all()]
    if hasattr(x, "to_dicts"):
        return x.to_dicts()
    if hasattr(x, "to_dict"):
        return [{k: _plain(v) for k, v in r.items()} for r in x.to_dict("records")]
    raise TypeError(f"unexpected result type {type(x).__name__}")


def _table(root: str, name: str) -> list[dict]:
    return ds.dataset(f"{root}/{name}", format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir) -> str:
    from dxray.compare import run_compare
    from dxray.config import load_config
    from dxray.pipeline.local import run
    from dxray.runs import redecide

    out = tmp_path_factory.mktemp("analytics") / "out"
    cfg = load_config(TINY_YAML, [f"output={out}", f"cache_dir={cache_dir}", "optimize.steps=2", "sample.k=2",
                                  "device=cpu", "targets.top_k=3", "segment.concepts=[snow, water, grass]",
                                  "segment.text_threshold=0.0"])  # a random detector's phrases: name every box
    summary = run(cfg)
    assert summary.failed == 0 and summary.verdicts == 6
    baseline = tmp_path_factory.mktemp("baseline") / summary.root.rstrip("/").rsplit("/", 1)[1]
    shutil.copytree(summary.root, baseline)
    redecide(str(baseline), 0.0)  # every feature core
    means = sorted(v["mean_object_fraction"] for v in _table(summary.root, "verdicts"))
    redecide(summary.root, means[len(means) // 2])  # a mix of core and spurious verdicts
    verdicts = {v["verdict"] for v in _table(summary.root, "verdicts")}
    assert verdicts == {"core", "spurious"}, verdicts
    run_compare(str(baseline), summary.root)  # the comparison table: the spurious ones are new
    return summary.root


@pytest.fixture(scope="module")
def s3_run(run_dir, s3) -> str:
    """The same run, copied to the S3 server: s3://{bucket}/docs/{run_id}."""
    import pyarrow.fs as pafs

    from dxray.storage.fs import s3_filesystem

    run_id = run_dir.rstrip("/").rsplit("/", 1)[1]
    pafs.copy_files(run_dir, f"{s3.bucket}/docs/{run_id}", destination_filesystem=s3_filesystem())
    return f"s3://{s3.bucket}/docs/{run_id}"


def check(ns: dict, root: str) -> list[str]:
    """Compare what the block computed with the tables of the (local) run; returns the names checked."""
    classes = _table(root, "classes")
    verdicts = {(v["class_index"], v["feature_index"], v["template"]): v for v in _table(root, "verdicts")}
    checked = []
    if "spurious_per_class" in ns:
        got = {(r["class_index"], r["template"]): (r["n_spurious"], r["n_features"]) for r in rows(ns["spurious_per_class"])}
        assert got == {(c["class_index"], c["template"]): (c["n_spurious"], c["n_features"]) for c in classes}
        checked.append("spurious_per_class")
    if "most_biased" in ns:
        got = rows(ns["most_biased"])
        keys = [(-r["n_spurious"], math.inf if r["class_object_fraction"] is None else r["class_object_fraction"])
                for r in got]
        assert keys == sorted(keys) and len(got) == len(classes)
        assert {r["class_index"] for r in got} == {c["class_index"] for c in classes}
        checked.append("most_biased")
    if "r_per_image" in ns:
        tasks = {t["task_id"]: t for t in _table(root, "tasks")}
        samples = {(s["class_index"], s["feature_index"], tasks[s["task_id"]]["template"], s["seed"]): s
                   for s in _table(root, "samples") if tasks[s["task_id"]]["kind"] == "feature"}
        got = rows(ns["r_per_image"])
        assert len(got) == len(samples) > 0
        per_pair: dict[tuple, list[float]] = {}
        for r in got:
            pair = (r["class_index"], r["feature_index"], r["template"])
            assert r["object_fraction"] == pytest.approx(samples[(*pair, r["seed"])]["object_fraction"])
            assert r["verdict"] == verdicts[pair]["verdict"]
            assert r["mean_object_fraction"] == pytest.approx(verdicts[pair]["mean_object_fraction"])
            per_pair.setdefault(pair, []).append(r["object_fraction"])
        for pair, rs in per_pair.items():
            assert sum(rs) / len(rs) == pytest.approx(verdicts[pair]["mean_object_fraction"], abs=1e-6)
        assert set(per_pair) == set(verdicts)
        checked.append("r_per_image")
    if "unsure_verdicts" in ns:
        got = rows(ns["unsure_verdicts"])
        expected = {k for k, v in verdicts.items() if v["low_confidence"]}
        assert {(r["class_index"], r["feature_index"], r["template"]) for r in got} == expected
        assert all(v["low_confidence"] is not None for v in verdicts.values())  # the run has the columns
        for r in got:
            want = verdicts[(r["class_index"], r["feature_index"], r["template"])]["confidence"]
            assert (r["confidence"] is None) == (want is None) and (want is None or r["confidence"] == pytest.approx(want))
        keys = [-1.0 if r["confidence"] is None else r["confidence"] for r in got]
        assert keys == sorted(keys)
        checked.append("unsure_verdicts")
    if "new_spurious" in ns:
        got = rows(ns["new_spurious"])
        expected = {k for k, v in verdicts.items() if v["verdict"] == "spurious"}  # the baseline had none
        assert expected and {(r["class_index"], r["feature_index"], r["template"]) for r in got} == expected
        for r in got:
            want = verdicts[(r["class_index"], r["feature_index"], r["template"])]
            assert r["r_b"] == pytest.approx(want["mean_object_fraction"]) and r["r_a"] == pytest.approx(r["r_b"])
            assert r["r_low_b"] == pytest.approx(want["mean_object_fraction_low"])
        checked.append("new_spurious")
    if "spurious_concepts" in ns:
        got = {(r["class_index"], r["template"], r["concept"]): r for r in rows(ns["spurious_concepts"])}
        want: dict[tuple, list[float]] = {}
        for (c, _, t), v in verdicts.items():
            if v["verdict"] == "spurious" and v["top_concepts"]:
                want.setdefault((c, t, v["top_concepts"][0]), []).append(v["top_concept_fractions"][0])
        assert want and set(got) == set(want)
        for k, fs in want.items():
            assert got[k]["n_features"] == len(fs) and got[k]["mean_coverage"] == pytest.approx(sum(fs) / len(fs))
        checked.append("spurious_concepts")
    return checked


def execute(code: str, run: str) -> dict:
    ns = {"RUN": run, "__name__": "analytics_snippet"}
    exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - the documentation's own snippets
    return ns


def test_the_page_has_the_expected_blocks():
    assert DOC.read_text().count("```python") == len(BLOCKS) >= 8
    assert {section for _, section, _ in BLOCKS} >= {"pyarrow.dataset", "DuckDB", "Polars", "Ray Data", S3_SECTION}
    for _, _, code in BLOCKS:
        assert "RUN" in code and any(name in code for name in CHECKED)


LOCAL = [b for b in BLOCKS if b[1] != S3_SECTION and "import ray" not in b[2]]
LOCAL_RAY = [b for b in BLOCKS if b[1] != S3_SECTION and "import ray" in b[2]]
ON_S3 = [b for b in BLOCKS if b[1] == S3_SECTION]


@pytest.mark.parametrize("block", LOCAL, ids=[b[0] for b in LOCAL])
def test_local_block(block, run_dir, capsys):
    assert check(execute(block[2], run_dir), run_dir)


@pytest.mark.parametrize("block", LOCAL_RAY, ids=[b[0] for b in LOCAL_RAY])
def test_ray_data_block(block, run_dir, ray_local, capsys):
    assert check(execute(block[2], run_dir), run_dir)


@pytest.mark.parametrize("block", ON_S3, ids=[b[0] for b in ON_S3])
def test_s3_block(block, run_dir, s3_run, request, capsys):
    if "import ray" in block[2]:
        request.getfixturevalue("ray_local")
    assert check(execute(block[2], s3_run), run_dir)
