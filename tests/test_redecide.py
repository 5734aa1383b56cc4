"""`dxray redecide` is all or nothing, records the δ in force, and a resume keeps it."""

import errno
import json

import pyarrow.dataset as ds
import pytest

from dxray.errors import DxrayError

DECIDED = ("verdicts/part-all.parquet", "classes/part-all.parquet", "manifest.json")


@pytest.fixture
def finished(tiny_config):
    from dxray.pipeline.local import run

    summary = run(tiny_config)
    assert summary.failed == 0 and summary.verdicts > 0
    return tiny_config, summary.root


def _files(root):
    return {rel: (root / rel).read_bytes() for rel in DECIDED}


def _other_delta(root) -> float:
    means = sorted(v["mean_object_fraction"] for v in ds.dataset(f"{root}/verdicts").to_table().to_pylist())
    return round(min(1.0, means[-1] + 0.01), 4)  # every feature changes from core to spurious or stays spurious


def test_a_redecide_that_cannot_write_classes_leaves_the_run_as_it_was(finished):
    """A real fault: the classes part cannot be replaced (a folder stands at its name)."""
    from pathlib import Path

    from dxray.runs import redecide

    _, root = finished
    root = Path(root)
    (root / "classes" / "part-all.parquet").unlink()
    (root / "classes" / "part-all.parquet").mkdir()
    (root / "classes" / "part-all.parquet" / "x").write_text("in the way")
    verdicts_before, manifest_before = (root / DECIDED[0]).read_bytes(), (root / DECIDED[2]).read_bytes()
    with pytest.raises(DxrayError, match=r"could not write classes/part-all.parquet .*the run is unchanged"):
        redecide(str(root), _other_delta(root))
    assert (root / DECIDED[0]).read_bytes() == verdicts_before  # verdicts were written, then put back
    assert (root / DECIDED[2]).read_bytes() == manifest_before
    assert not [p for p in (root / "verdicts").iterdir() if p.name != "part-all.parquet"]


def test_a_redecide_failing_at_the_manifest_puts_verdicts_and_classes_back(finished, monkeypatch):
    """Disk full while writing the manifest, the last write (a fault this machine cannot make happen)."""
    from pathlib import Path

    from dxray.runs import redecide
    from dxray.storage.sink import RunSink

    _, root = finished
    root = Path(root)
    before = _files(root)

    def full(self, manifest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunSink, "write_manifest", full)
    with pytest.raises(DxrayError, match="could not write manifest.json"):
        redecide(str(root), _other_delta(root))
    assert _files(root) == before


def test_the_manifest_records_the_delta_and_a_resume_keeps_it(finished, caplog):
    from pathlib import Path

    from dxray.pipeline.local import run
    from dxray.runs import redecide

    cfg, root = finished
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["decision"] == {"delta": cfg.verdict.delta, "source": "config"}
    delta = _other_delta(root)
    redecide(str(root), delta)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["decision"]["delta"] == delta and manifest["decision"]["source"] == "redecide"
    redecided = ds.dataset(root / "verdicts").to_table().to_pylist()

    summary = run(cfg)  # the same command again: resumes (nothing to do) and finalizes once more
    assert summary.skipped == summary.planned
    assert ds.dataset(root / "verdicts").to_table().to_pylist() == redecided
    assert all(r["delta"] == pytest.approx(delta) for r in ds.dataset(root / "classes").to_table().to_pylist())
    assert json.loads((root / "manifest.json").read_text())["decision"]["delta"] == delta
    assert "keeping delta" in caplog.text and "dxray redecide" in caplog.text

    redecide(str(root), cfg.verdict.delta)  # the way back is another redecide
    run(cfg)
    assert all(r["delta"] == pytest.approx(cfg.verdict.delta)
               for r in ds.dataset(root / "verdicts").to_table().to_pylist())


def test_redecide_refuses_an_unfinished_run(finished):
    from pathlib import Path

    from dxray.runs import redecide

    _, root = finished
    (Path(root) / "manifest.json").unlink()
    with pytest.raises(DxrayError, match="has not finished"):
        redecide(root, 0.5)


def test_redecide_recomputes_the_bootstrap_confidence(tmp_path):
    """Issue 19: the interval is a property of the stored r (it stays), the confidence of the verdict at δ (it moves)."""
    from dxray.runs import redecide
    from dxray.storage.sink import RunSink

    sink = RunSink(str(tmp_path), "run-boot")
    r = {10: [0.2, 0.4] * 4, 11: [0.8, 0.9, 0.85, 0.7]}  # feature 10: mean 0.3; feature 11: mean 0.8125
    sink.write_table("tasks", [{"run_id": "run-boot", "task_id": f"t{f}", "kind": "feature", "class_index": 1,
                                "class_name": "c1", "feature_index": f, "feature_rank": i + 1, "template": "{}",
                                "status": "ok"} for i, f in enumerate(r)], part="all")
    sink.write_table("samples", [{"run_id": "run-boot", "task_id": f"t{f}", "seed": s, "object_fraction": v}
                                 for f, vs in r.items() for s, v in enumerate(vs)], part="all")
    sink.write_manifest({"run_id": "run-boot"})
    on_disk = {}
    for delta in (0.3, 0.6):
        redecide(str(tmp_path / "run-boot"), delta)
        rows = ds.dataset(f"{tmp_path}/run-boot/verdicts").to_table().to_pylist()
        on_disk[delta] = {v["feature_index"]: v for v in rows}
        [c] = ds.dataset(f"{tmp_path}/run-boot/classes").to_table().to_pylist()
        assert c["n_low_confidence"] == sum(v["low_confidence"] for v in rows)
    at3, at6 = on_disk[0.3], on_disk[0.6]
    assert at3[10]["verdict"] == "core" and at3[10]["low_confidence"] and at3[10]["confidence"] < 0.8
    assert at6[10]["verdict"] == "spurious" and at6[10]["confidence"] == 1.0 and not at6[10]["low_confidence"]
    for f in r:  # same resamples at every delta
        assert (at3[f]["mean_object_fraction_low"], at3[f]["mean_object_fraction_high"], at3[f]["bootstrap_seed"]) == \
               (at6[f]["mean_object_fraction_low"], at6[f]["mean_object_fraction_high"], at6[f]["bootstrap_seed"])
    assert at3[11]["confidence"] == at6[11]["confidence"] == 1.0  # 0.7 is the lowest r: every resample >= 0.6
