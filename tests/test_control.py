"""The segmenter control (issue 19): per class, the generator's plain pictures of the class (no optimisation),
scored by the same segmenter. A class whose control the segmenter cannot segment has its verdicts flagged."""

import json

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
from conftest import ROOT, TINY_YAML

from dxray.config import load_config
from dxray.storage.schemas import to_table

TOY_YAML = ROOT / "jobs" / "configs" / "toyworld.yaml"


def test_the_control_prompt_is_exactly_the_plain_text_prompt(tiny_generator):
    """The class name's word rows in the template's '{}' encode the same as the prompt with the words typed in."""
    from dxray import prompts

    g = tiny_generator
    rows = prompts.word_rows(g.tokenizer, g.text_encoder, "tabby cat")
    assert rows.shape[0] == len(g.tokenizer("tabby cat", add_special_tokens=False).input_ids) >= 2
    soft = g.encode([g.soft_prompt("a photo of a {}", rows.shape[0])], [rows])
    ids = g.tokenizer("a photo of a tabby cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = g.text_encoder(input_ids=ids.to(g.device)).last_hidden_state
    torch.testing.assert_close(soft, plain)


def test_one_control_per_class_and_no_other_task_id_moves(tmp_path):
    from dxray.features import RankedFeature
    from dxray.pipeline.preflight import preflight
    from dxray.pipeline.tasks import plan

    def specs(*extra):
        cfg = load_config(TINY_YAML, [f"output={tmp_path}", f"cache_dir={tmp_path / 'cache'}", *extra])
        ranking = [RankedFeature(c, 3, 1, 0.0, "weights") for c in cfg.targets.classes]
        return cfg, plan(cfg, preflight(cfg, build=False), ranking)

    off_cfg, off = specs("segment.control=false")
    on_cfg, on = specs("segment.control=true", "segment.control_template=a picture of a {}")
    controls = [s for s in on if s.kind == "control"]
    assert [s.class_index for s in controls] == list(on_cfg.targets.classes)
    assert all(s.template == "a picture of a {}" and s.objective is None for s in controls)
    assert [s.task_id for s in on if s.kind != "control"] == [s.task_id for s in off]
    assert on_cfg.resolved_run_id() == off_cfg.resolved_run_id()  # a resume of an older run adds its controls
    _, other = specs("segment.control=true")
    assert {s.task_id for s in other if s.kind == "control"}.isdisjoint(s.task_id for s in controls)


def _tables(control_r: dict[int, list[float]], feature_r: dict[int, list[float]]):
    tasks, samples = [], []
    for c in (0, 1, 2):
        for kind, rs in (("control", control_r.get(c)), ("feature", feature_r[c])):
            if rs is None:
                continue
            tid = f"{kind}-{c}"
            tasks.append({"run_id": "r", "task_id": tid, "kind": kind, "status": "ok", "class_index": c,
                          "class_name": f"class {c}", "feature_index": 7 if kind == "feature" else None,
                          "feature_rank": 1 if kind == "feature" else None,
                          "template": "{}" if kind == "feature" else "a photo of a {}"})
            samples += [{"run_id": "r", "task_id": tid, "seed": i, "object_fraction": r} for i, r in enumerate(rs)]
    return to_table("tasks", tasks), to_table("samples", samples)


def test_a_class_whose_control_the_segmenter_cannot_segment_is_flagged():
    from dxray.verdict import decide

    tasks, samples = _tables({0: [0.0, 0.02, 0.0], 1: [0.4, 0.6, 0.5]}, {0: [0.9, 0.8], 1: [0.0, 0.1], 2: [0.5, 0.5]})
    verdicts, classes = decide(tasks, samples, 0.3, "r")
    by = {v["class_index"]: v for v in verdicts}
    assert by[0]["reliable"] is False and by[0]["control_object_fraction"] == pytest.approx(0.02 / 3)
    assert by[1]["reliable"] is True and by[1]["verdict"] == "spurious"  # a trusted spurious call
    assert by[2]["reliable"] is None and by[2]["control_object_fraction"] is None  # no control: not judged
    assert {c["class_index"]: c["reliable"] for c in classes} == {0: False, 1: True, 2: None}
    assert pa.Table.from_pylist(verdicts).num_rows == 3
    later, _ = decide(tasks, samples, 0.005, "r")  # another delta (redecide): the control is judged again
    assert all(v["reliable"] for v in later if v["class_index"] in (0, 1))


def test_the_candidate_that_finds_the_object_in_the_control_images_decides_the_verdicts():
    """Class 0 has two detection prompts: the first finds nothing in the control images, the second does;
    every figure of class 0 uses the second's r, and the choice is recorded. Class 1 has one prompt."""
    from dxray.verdict import decide

    tasks, samples = [], []
    for c, kind, firsts, seconds in ((0, "control", [0.0, 0.0, 0.1], [0.5, 0.4, 0.6]),
                                     (0, "feature", [0.0, 0.1], [0.6, 0.5]),
                                     (0, "class", [0.2], [0.9]),
                                     (1, "control", [0.5, 0.5], None), (1, "feature", [0.1, 0.0], None)):
        tid = f"{kind}-{c}"
        tasks.append({"run_id": "r", "task_id": tid, "kind": kind, "status": "ok", "class_index": c,
                      "class_name": f"class {c}", "feature_index": 7 if kind == "feature" else None,
                      "feature_rank": 1 if kind == "feature" else None, "template": "{}"})
        names = ["wrong thing.", "right thing."] if seconds else None
        samples += [{"run_id": "r", "task_id": tid, "seed": i, "object_fraction": r,
                     "detection_prompt": names[0] if names else "only.", "candidate_prompts": names,
                     "candidate_object_fractions": [r, seconds[i]] if seconds else None}
                    for i, r in enumerate(firsts)]
    tasks, samples = to_table("tasks", tasks), to_table("samples", samples)
    verdicts, classes = decide(tasks, samples, 0.3, "r")
    by = {v["class_index"]: v for v in verdicts}
    assert by[0]["detection_prompt"] == "right thing." and by[0]["verdict"] == "core"
    assert by[0]["mean_object_fraction"] == pytest.approx(0.55) and by[0]["reliable"] is True
    assert by[1]["detection_prompt"] == "only." and by[1]["verdict"] == "spurious"
    c0 = next(c for c in classes if c["class_index"] == 0)
    assert c0["detection_candidates"] == ["wrong thing.", "right thing."]
    assert c0["candidate_control_object_fractions"] == pytest.approx([0.1 / 3, 0.5])
    assert c0["control_object_fraction"] == pytest.approx(0.5) and c0["class_object_fraction"] == pytest.approx(0.9)
    c1 = next(c for c in classes if c["class_index"] == 1)
    assert c1["detection_prompt"] == "only." and c1["detection_candidates"] is None
    to_table("classes", classes), to_table("verdicts", verdicts)  # the rows fit the contract
    # the second candidate first: it still wins, now as the first of the list
    swapped = samples.set_column(samples.schema.get_field_index("candidate_object_fractions"),
                                 "candidate_object_fractions",
                                 pa.array([None if v is None else v[::-1]
                                           for v in samples["candidate_object_fractions"].to_pylist()],
                                          pa.list_(pa.float32())))
    again, _ = decide(tasks, swapped, 0.3, "r")
    assert {v["class_index"]: v["verdict"] for v in again} == {0: "core", 1: "spurious"}
    assert next(v for v in again if v["class_index"] == 0)["detection_prompt"] == "wrong thing."  # names as given


def test_toy_world_control_flags_the_class_the_segmenter_is_told_to_look_for_elsewhere(tmp_path, cache_dir):
    """On the toy world (exact colour segmenter), class 0's detection prompt names class 1's object: the
    generator's plain pictures of a red circle hold no blue square, so class 0 is flagged with r exactly 0;
    the other classes' segmenter finds their objects in theirs."""
    from test_cli import run_cli

    from dxray.toyworld import render

    out = tmp_path / "out"
    wrong = render.CLASS_NAMES[1]
    res = run_cli("explain", str(TOY_YAML), f"output={out}", "device=cpu", "targets.top_k=0", "optimize.steps=2",
                  "optimize.restarts=1", "sample.k=4", f"segment.prompts={{0: '{wrong}', 3: ['{wrong}', '{render.CLASS_NAMES[3]}']}}", f"cache_dir={cache_dir}",
                  cache=cache_dir, timeout=900)
    assert res.returncode == 0, res.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    tasks = ds.dataset(root / "tasks").to_table().to_pylist()
    samples = ds.dataset(root / "samples").to_table(
        columns=["task_id", "object_fraction", "candidate_object_fractions"]).to_pylist()
    control = {t["class_index"]: t["task_id"] for t in tasks if t["kind"] == "control"}
    assert sorted(control) == list(range(len(render.CLASSES)))
    classes = {c["class_index"]: c for c in ds.dataset(root / "classes").to_table().to_pylist()}
    for c, tid in control.items():  # the column is the mean r of the control task's own images
        rs = [s["object_fraction"] for s in samples if s["task_id"] == tid]
        if c == 3:  # two candidates (below): the second's r
            rs = [s["candidate_object_fractions"][1] for s in samples if s["task_id"] == tid]
        assert len(rs) == 4 and classes[c]["control_object_fraction"] == pytest.approx(sum(rs) / 4, abs=1e-6)
    assert classes[0]["reliable"] is False and classes[0]["control_object_fraction"] == 0.0
    # The right prompts find their objects in the plain pictures (the world's generator draws them small and
    # faint from a plain prompt: r 0.003-0.1 on seeds 0-7, so a few land below the preset's delta of 0.01).
    assert all(classes[c]["control_object_fraction"] > 0 for c in range(1, len(render.CLASSES))), classes
    delta = classes[0]["delta"]
    assert all(c["reliable"] == (c["control_object_fraction"] >= delta - 1e-6) for c in classes.values())
    flagged = sum(c["reliable"] is False for c in classes.values())
    assert f"{flagged} class(es) unreliable" in " ".join(res.stderr.split())  # the run's summary says so
    # class 3's two candidates: the wrong colour finds nothing in its control images, its own name wins
    assert classes[3]["detection_candidates"] == [f"{wrong}.", f"{render.CLASS_NAMES[3]}."]
    assert classes[3]["detection_prompt"] == f"{render.CLASS_NAMES[3]}."
    assert classes[3]["candidate_control_object_fractions"][0] == 0.0
    assert classes[3]["candidate_control_object_fractions"][1] == pytest.approx(classes[3]["control_object_fraction"])
    scored = ds.dataset(root / "samples").to_table(filter=ds.field("class_index") == 3).to_pylist()
    assert scored and all(len(s["candidate_object_fractions"]) == 2 and s["object_fraction"] ==
                          s["candidate_object_fractions"][0] for s in scored)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["config"]["segment"]["control_template"] == "a {} on a teal background"

    # Each control records its images' mean penultimate features (what a feature reaches unoptimised): the stored
    # PNGs read back through the world's classifier give the same means, up to the PNGs' 8-bit rounding.
    import numpy as np
    import torch
    from PIL import Image

    from dxray.classifiers import load_classifier
    from dxray.toyworld.train import folder

    clf = load_classifier(f"hf:{folder(cache_dir) / 'classifier'}", device="cpu")
    uris = ds.dataset(root / "samples").to_table(columns=["task_id", "image_uri"]).to_pylist()
    for tid in control.values():
        stored = next(t["control_activations"] for t in tasks if t["task_id"] == tid)
        pixels = np.stack([np.asarray(Image.open(u["image_uri"]).convert("RGB")) for u in uris if u["task_id"] == tid])
        with torch.no_grad():
            again = clf(torch.from_numpy(pixels / 255.0).float().permute(0, 3, 1, 2), layers=["penultimate"])
        assert len(stored) == again["penultimate"].shape[1]
        np.testing.assert_allclose(stored, again["penultimate"].mean(0).numpy(), atol=0.05)
    assert all(t["control_activations"] is None for t in tasks if t["kind"] != "control")


def test_controls_run_on_ray_actors_too(ray_local, tmp_path, cache_dir):
    from dxray.distributed.audit import run_distributed

    cfg = load_config(TINY_YAML, [f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}", "optimize.steps=2",
                                  "sample.k=2", "device=cpu", "targets.top_k=0", "segment.control=true",
                                  "segment.prompts={0: [first thing, second thing]}"])
    summary = run_distributed(cfg)
    assert (summary.ok, summary.failed) == (2 * len(cfg.targets.classes), 0)
    tasks = ds.dataset(f"{summary.root}/tasks").to_table().to_pylist()
    assert sorted(t["kind"] for t in tasks) == ["class", "class", "control", "control"]
    classes = ds.dataset(f"{summary.root}/classes").to_table().to_pylist()
    assert all(c["control_object_fraction"] is not None and c["reliable"] is not None for c in classes)
    # a class's candidate prompts travel to the segmenter actors: every image of class 0 is scored with both
    c0 = ds.dataset(f"{summary.root}/samples").to_table(filter=ds.field("class_index") == 0).to_pylist()
    assert c0 and all(s["candidate_prompts"] == ["first thing.", "second thing."] and
                      len(s["candidate_object_fractions"]) == 2 for s in c0)
    [row] = [c for c in classes if c["class_index"] == 0]
    assert row["detection_prompt"] in row["detection_candidates"] == ["first thing.", "second thing."]
