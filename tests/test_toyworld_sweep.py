"""benchmarks/toyworld_sweep.py's pooling, per-kind figures, concept shares and plot on synthetic calls (issue 31)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("_toyworld_sweep", ROOT / "benchmarks" / "toyworld_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(world, seed, family, rho, features):
    unit = f"world {world} seed {seed}"
    return {"world": world, "seed": seed, "family": family, "rho": rho,
            "calls": {"classes": [{"unit": unit, "truth": True, "called": True, "score": 0.0, "control": False}],
                      "features": [f | {"unit": unit, "score": 0.0, "control": False} for f in features]}}


def _feature(truth, called, kind=None, top=None, concept=None):
    return {"truth": truth, "called": called, "kind": kind, "top_concept": top, "concept": concept}


def test_pooling_groups_by_family_and_rho_and_a_kind_keeps_its_own_positives_and_every_negative(sweep):
    marker_miss = _feature(True, False, "marker", "teal", "cyan")
    runs = [_run(3, 3, "cnn", 1.0, [_feature(True, True, "background", "purple", "purple"), marker_miss,
                                    _feature(False, True)]),
            _run(4, 3, "cnn", 1.0, [_feature(True, True, "marker", "cyan", "cyan"), _feature(False, False)]),
            _run(3, 3, "vit", 0.5, [_feature(False, False)])]
    by = sweep.pooled(runs, lambda r: (r["family"], r["rho"]))
    assert set(by) == {("cnn", 1.0), ("vit", 0.5)}
    cnn = by[("cnn", 1.0)]["features"]["dxray"]
    assert (cnn["tp"], cnn["fn"], cnn["fp"], cnn["tn"], cnn["n_units"]) == (2, 1, 1, 1, 2)
    marker = sweep.pooled(runs[:2], kind="marker")["all"]["features"]["dxray"]
    assert (marker["tp"], marker["fn"], marker["fp"], marker["tn"]) == (1, 1, 1, 1)  # the background's hit left out
    shares = sweep.concept_shares(runs)
    assert shares == {"background": {"n": 1, "named": 1, "share": 1.0}, "marker": {"n": 1, "named": 1, "share": 1.0}}


def test_the_plot_draws_recall_and_false_positive_rate_against_rho(sweep, tmp_path):
    runs = [_run(w, s, "cnn", rho, [_feature(True, rho > 0.4, "background"), _feature(False, rho < 0.1)])
            for w in (3, 4) for s in (3, 4) for rho in (0.0, 0.5, 1.0)]
    result = {"name": "synthetic", "by_family_and_rho": {"cnn": {f"{rho:g}": v for (_, rho), v in sweep.pooled(
        runs, lambda r: (r["family"], r["rho"])).items()}}}
    png = tmp_path / "plot.png"
    sweep.plot(result, png)
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 500


def test_an_audit_keeps_a_run_folder_named_by_everything_that_makes_it(sweep, tmp_path):
    """A stopped sweep resumes its audits: the same audit finds the same folder, any other audit another one."""
    one = sweep.run_folder(str(tmp_path), 3, "cnn", 0.95, 4, 2, ["optimize.restarts=2"])
    assert one == sweep.run_folder(str(tmp_path), 3, "cnn", 0.95, 4, 2, ["optimize.restarts=2"])
    assert one.parent == tmp_path / "sweep-runs"
    others = [sweep.run_folder(str(tmp_path), *args) for args in (
        (4, "cnn", 0.95, 4, 2, ["optimize.restarts=2"]), (3, "vit", 0.95, 4, 2, ["optimize.restarts=2"]),
        (3, "cnn", 0.9, 4, 2, ["optimize.restarts=2"]), (3, "cnn", 0.95, 5, 2, ["optimize.restarts=2"]),
        (3, "cnn", 0.95, 4, 5, ["optimize.restarts=2"]), (3, "cnn", 0.95, 4, 2, []))]
    assert len({one, *others}) == 7


def test_a_record_stands_for_its_audit_and_an_audit_without_one_runs(sweep, tmp_path, monkeypatch):
    """A sweep longer than one sitting accumulates in the repository: an audit with a record is not run again (with
    no world in the cache, running it would fail); one without a record runs and leaves its record; records off
    (``--no-records``) always run. The audit itself is replaced here: what is tested is which audits run."""
    records = tmp_path / "records"
    ran = []

    def fake_audit(cache_dir, world, family, rho, seed, top_k, overrides):
        ran.append((world, seed))
        return {"world": world, "family": family, "rho": rho, "seed": seed, "calls": {}}

    monkeypatch.setattr(sweep, "audit", fake_audit)
    args = ("cnn", 1.0)
    first = sweep.audit_or_record(str(tmp_path), 3, *args, 4, 2, [], records)
    path = sweep.record_path(3, *args, 4, 2, [], records)
    assert path.name == sweep.run_folder(str(tmp_path), 3, *args, 4, 2, []).name + ".json"
    assert json.loads(path.read_text()) == first and ran == [(3, 4)]
    assert sweep.audit_or_record(str(tmp_path), 3, *args, 4, 2, [], records) == first and ran == [(3, 4)]
    sweep.audit_or_record(str(tmp_path), 3, *args, 5, 2, [], records)  # another seed: no record yet
    sweep.audit_or_record(str(tmp_path), 3, *args, 4, 2, [], None)  # records off
    assert ran == [(3, 4), (3, 5), (3, 4)] and sorted(p.name for p in records.iterdir()) == sorted(
        [path.name, sweep.record_path(3, *args, 5, 2, [], records).name])
