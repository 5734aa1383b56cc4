"""Run ids and task ids are pinned: a re-run must find the same run folder and skip the same tasks, so
an id that moves orphans every existing run. The expected values were computed by the code before
the pipeline redesign (issue 17: dxray/audit.py's _task_id and Config.fingerprint) and must never change.
The plan is made from the architecture alone (``build=False``): nothing is built or trained here."""

import pytest
from conftest import ROOT

from dxray.config import load_config
from dxray.features import RankedFeature
from dxray.pipeline.preflight import preflight
from dxray.pipeline.tasks import plan

CONFIGS = ROOT / "jobs" / "configs"

# The preset configs as shipped.
RUN_IDS = {"tiny": "run-c4cf05784bf8", "toyworld": "run-34dd41ca0f1f", "imagenet": "run-2b1bc5f4196e",
           "imagenet_full": "run-26a78096957a", "salient_imagenet_90": "run-ee8a9009d364"}

NEURON = ["targets.neurons=[{layer: penultimate, unit: 3}]"]
CASES = {
    "tiny": ("tiny", NEURON, "run-fe4ba8f2f8b1", [
        "66e7b42a49d20c5a", "2396ab78b7cecda6", "e464578e95b41deb", "682167aa429eb2d5", "13849f635459a68a",
        "a7f7e76963296054", "cdd9e02f3aca222e"]),
    "tiny-hard": ("tiny", ["prompt.kind=hard", "generator.grad_steps=2", "prompt.templates=['{}', 'a texture of {}']",
                           *NEURON], "run-26607d846825", [
        "6b3f1139856d887c", "b195823fc4101a2b", "e3f292250e07c09a", "8c9e1e2884df7b07", "fea8419c22c53035",
        "94d4f822bae0d0e3", "6260e5ae16d26f50", "54a973a24fd1e266", "ee6f20f3a7477523", "78164b99dce0e74e",
        "bf317d1981455962", "5bbbda0be39f2515", "77fafb90ce770589", "a7e5a66bff920309"]),
    "toyworld": ("toyworld", NEURON, "run-0d61cfc57ea1", [
        "3b8bc42e589c6a1d", "e9a21e7812156126", "4c9439bd3ec15911", "52a01b137e4bbefa", "385aa98e8c78f8a8",
        "bd93433f222dbf23", "baa0dde0f3ca1cdf", "4ee46d377af3ff32", "1c5cca30c2ac2208", "7121ea3393e73cf4",
        "57de1833320326bd", "e7a2bb0f1700e47a", "6eb4d6c51cf3b9fd", "836e46c34fd89579", "e39c5dfb3eace6cc",
        "11f541420183d162", "618fe50d6ccb131b", "0b17096258f21159", "c07584c846b02f7e"]),
}


# The segmenter controls (issue 19, one per class; the tiny preset has them off), pinned from their first version.
CONTROL_IDS = {"toyworld": ["bae58efa4cc8ab75", "eb8387f8dfca6e54", "5b2a36e51a45fcd7", "fd10099f6be54202",
                            "f75a0874d16974a4", "3aa32ec5148357d3"]}


@pytest.mark.parametrize("name", sorted(RUN_IDS))
def test_run_ids_of_the_shipped_configs_are_pinned(name):
    assert load_config(CONFIGS / f"{name}.yaml", []).resolved_run_id() == RUN_IDS[name]


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_and_task_ids_of_the_presets_are_pinned(case, tmp_path):
    config, overrides, run_id, task_ids = CASES[case]
    # Where the run goes and how fast it is made are not part of any id.
    cfg = load_config(CONFIGS / f"{config}.yaml", [*overrides, f"output={tmp_path}", f"cache_dir={tmp_path / 'cache'}",
                                                   "optimize.batch_tasks=3", "sample.batch_size=2", "device=cpu"])
    info = preflight(cfg, build=False)
    ranking = [RankedFeature(c, f, r + 1, 0.0, "weights") for c in cfg.targets.classes for r, f in enumerate((5, 2))]
    specs = plan(cfg, info, ranking)
    assert cfg.resolved_run_id() == run_id
    assert [s.task_id for s in specs if s.kind != "control"] == task_ids  # the segmenter control came later
    assert [s.task_id for s in specs if s.kind == "control"] == CONTROL_IDS.get(case, [])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob(".complete"))  # nothing built
