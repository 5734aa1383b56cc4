"""Validate before loading: a bad input is one `error:` line naming the config field, exit 2, raised before
any model weights load or any run folder is created; the dry run rejects the same configs with the same
messages and describes what it can of a preset whose files live on another machine."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT, TINY_YAML
from typer.testing import CliRunner

from dxray.cli import app
from dxray.config import load_config
from dxray.errors import DxrayError
from dxray.pipeline.preflight import preflight
from dxray.plan_estimate import dry_run

IMAGENET_FULL = ROOT / "jobs" / "configs" / "imagenet_full.yaml"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    """The only line of output: 'error: ...' (exit 2)."""
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0].removeprefix("error: ")


def refused(tmp_path, *overrides, config=TINY_YAML) -> str:
    """The message of `dxray explain`, `dxray audit` and `dxray audit --dry-run` (the same), none of which
    creates the output folder."""
    out = tmp_path / "out"
    messages = {one_error_line(invoke(*cmd, config, f"output={out}", *overrides, *extra))
                for cmd, extra in ((["explain"], ["-q"]), (["audit"], ["-q"]), (["audit"], ["--dry-run"]))}
    assert not out.exists()
    assert len(messages) == 1, messages
    return messages.pop()


# -- item 1: feature indices, neuron units and top_k against the classifier's shape --------------------
@pytest.mark.parametrize("override, expected", [
    ("targets.features={0: [3, 99999]}", "targets.features[0]: feature 99999 out of range; the penultimate layer has features 0..15"),
    ("targets.neurons=[{layer: penultimate, unit: 99999}]", "targets.neurons[0]: unit 99999 out of range; layer 'penultimate' has units 0..15"),
    ("targets.neurons=[{layer: logits, unit: 2}]", "targets.neurons[0]: unit 2 out of range; layer 'logits' has units 0..1"),
    ("targets.neurons=[{layer: penultimate, unit: 1}, {layer: resnet.embedder, unit: 8}]",
     "targets.neurons[1]: unit 8 out of range; layer 'resnet.embedder' has units 0..7"),
    ("targets.top_k=17", "targets.top_k 17 is more than the 16 penultimate features of the classifier"),
], ids=["feature", "neuron-penultimate", "neuron-logits", "neuron-conv", "top_k"])
def test_out_of_range_targets_are_refused_before_any_run_folder(tmp_path, cache_dir, override, expected):
    assert refused(tmp_path, override) == expected


def test_layer_widths_come_from_the_architecture(cache_dir):
    from dxray.classifiers import describe
    from dxray.models.tiny import ensure_tiny_classifier

    info = describe(f"hf:{ensure_tiny_classifier(cache_dir)}")
    assert info.layer_widths["logits"] == 2 and info.layer_widths["penultimate"] == 16
    assert info.layer_widths["resnet.embedder"] == 8 and info.layer_widths["resnet.encoder.stages.1"] == 16
    info = describe("torchvision:resnet50", weights="DEFAULT")  # meta device: nothing downloaded
    assert info.layer_widths["layer4"] == 2048 and info.layer_widths["layer1.0.conv1"] == 64


def test_units_in_range_pass(tmp_path, cache_dir):
    cfg = load_config(TINY_YAML, [f"output={tmp_path / 'out'}", "targets.top_k=16", "targets.features={0: [15]}",
                                  "targets.neurons=[{layer: resnet.embedder, unit: 7}, {layer: penultimate, unit: 15}]"])
    assert preflight(cfg).feature_dim == 16


# -- item 2: templates longer than the CLIP text encoder's 77 tokens --------------------------------
@pytest.mark.parametrize("built", [False, True], ids=["tiny-not-built", "tiny-built"])
def test_overlong_template_is_refused_with_its_token_count(tmp_path, cache_dir, built):
    from dxray.models.tiny import ensure_tiny_lcm

    cache = cache_dir if built else tmp_path / "empty-cache"
    if built:
        ensure_tiny_lcm(cache_dir)
    template = "{} " + "x" * 80  # the tiny tokenizer is character-level: 80 tokens, + 1 learnable, BOS, EOS
    msg = refused(tmp_path, f"prompt.templates=['a photo of {{}}', '{template}']", f"cache_dir={cache}")
    assert msg.startswith("prompt.templates[1]: ") and "is 83 tokens long with prompt.n_tokens=1" in msg
    assert "limit is 77" in msg
    assert built or not (cache / "tiny-lcm").exists()  # the check built no generator
    cfg = load_config(TINY_YAML, [f"output={tmp_path / 'out'}", "prompt.templates=['a {} background']",
                                  "prompt.n_tokens=16"])
    preflight(cfg)


def test_local_generator_folder_tokenizer(tmp_path, cache_dir):
    from dxray.models.tiny import ensure_tiny_lcm

    folder = ensure_tiny_lcm(cache_dir)  # a local folder: its tokenizer/ is read, nothing else
    msg = refused(tmp_path, f"generator.model={folder}", "prompt.templates=['{} " + "y" * 90 + "']")
    assert msg.startswith("prompt.templates[0]: ") and "is 93 tokens long" in msg


def test_template_check_is_skipped_without_an_offline_tokenizer(tmp_path, cache_dir):
    cfg = load_config(TINY_YAML, [f"output={tmp_path / 'out'}", "generator.model=nobody/no-such-lcm",
                                  "prompt.templates=['{} " + "x" * 80 + "']"])
    preflight(cfg)  # a hub id that is not cached: no download, no check (config caps the length)


# -- item 3: cache_dir ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_unusable_cache_dir_is_one_line(tmp_path, where):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cache = {"file": a_file, "under-file": a_file / "cache", "proc": "/proc/dxray-cache"}[where]
    msg = refused(tmp_path, f"cache_dir={cache}")
    assert msg.startswith(f"cache_dir {cache}")
    assert a_file.read_text() == "not a folder"


# -- item 4: the shipped presets' advice ---------------------------------------------------------------
def test_imagenet_full_dry_run_lists_what_is_missing(tmp_path):
    r = invoke("audit", IMAGENET_FULL, f"output={tmp_path / 'out'}", "--dry-run")
    assert r.exit_code == 0, r.output
    warning = [x for x in r.stderr.splitlines() if x.strip()]
    assert warning == ["warning: missing: classifier.spec checkpoint /data/imagenet_l2_3_0.pt; "
                       "targets.feature_images.path /data/imagenet/train (not found here; the plan is the config's, "
                       "and a real run stops at the first of them)"], r.stderr
    text = " ".join(r.stdout.split())
    assert "tasks │ 7,000" in text and "tasks: feature │ 5,000" in text and "optimisation steps │ 600,000" in text
    assert "tasks: control │ 1,000" in text  # the segmenter controls: rendered and scored, not optimised
    assert "missing" in text
    assert not (tmp_path / "out").exists()

    plan = dry_run(load_config(IMAGENET_FULL, [f"output={tmp_path / 'out'}"]), figures=[], warn=lambda m: None)
    assert plan.missing == ["classifier.spec checkpoint /data/imagenet_l2_3_0.pt",
                            "targets.feature_images.path /data/imagenet/train"]
    assert plan.total_tasks == 1000 * (1 + 5) * 1 + 1000 and plan.held_out_images == 7000 * 10  # 1,000 controls


def test_imagenet_full_real_run_still_fails_fast(tmp_path):
    msg = one_error_line(invoke("explain", IMAGENET_FULL, f"output={tmp_path / 'out'}", "-q"))
    assert msg == "robust-resnet50 checkpoint not found: /data/imagenet_l2_3_0.pt"
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_missing_folders_and_tables(tmp_path, cache_dir):
    cfg = load_config(TINY_YAML, [f"output={tmp_path / 'out'}", "generator.model=/nowhere/lcm",
                                  "segment.detector=/nowhere/dino", "targets.feature_source=table",
                                  f"targets.feature_table={tmp_path / 'ranking.parquet'}"])
    plan = dry_run(cfg, figures=[], warn=lambda m: None)
    assert plan.missing == ["generator.model /nowhere/lcm", f"targets.feature_table {tmp_path / 'ranking.parquet'}",
                            "segment.detector /nowhere/dino"]
    assert plan.tasks == {"class": 2, "feature": 2, "neuron": 0, "control": 0}
    with pytest.raises(DxrayError, match="generator model folder not found: /nowhere/lcm"):
        preflight(cfg)  # a real run still refuses it


def test_dry_run_exits_2_when_nothing_can_be_described(tmp_path):
    msg = one_error_line(invoke("audit", TINY_YAML, f"output={tmp_path / 'out'}", "classifier.spec=hf:/nowhere/model",
                                "--dry-run"))
    assert msg == "classifier folder not found: /nowhere/model"


def test_presets_readme_exists_with_a_paragraph_per_preset():
    folder = ROOT / "jobs" / "configs"
    readme = (folder / "README.md").read_text()
    for preset in folder.glob("*.yaml"):
        assert f"`{preset.name}`" in readme, preset.name
        assert f"jobs/configs/{preset.name}" in readme, preset.name
    assert "jobs/configs/README.md" in (folder / "tiny.yaml").read_text()


# -- item 5: dxray agreement ----------------------------------------------------------------------------
def test_agreement_annotations_is_a_required_option(tmp_path):
    r = invoke("agreement", "--help")
    text = " ".join(r.output.replace("│", " ").split())  # rich's help panels, their borders dropped
    assert r.exit_code == 0 and "--annotations" in text and "[required]" in text
    assert "required except with --print-classes" in text
    missing = invoke("agreement", tmp_path / "run")
    assert missing.exit_code == 2 and "--annotations" in missing.output


# -- item 7: messages ----------------------------------------------------------------------------------
def test_segment_prompt_and_class_name_messages_say_which(tmp_path, cache_dir):
    msg = refused(tmp_path, "segment.prompts={1: ' , dog'}")
    assert msg.startswith("segment.prompts[1]: detection prompt ' , dog' is empty")
    msg = refused(tmp_path, "segment.prompts={1: [dog, 'Dog, domestic dog']}", "segment.control=true")
    assert msg.startswith("segment.prompts[1]: detection prompts 'dog' and 'Dog, domestic dog' are the same query 'dog.'")
    msg = refused(tmp_path, "classifier.class_names=[goldfish, ',']")
    assert msg.startswith("class 1's name ','") and msg.endswith("(set segment.prompts[1])")
    assert "empty class name" in msg


def test_hub_failures_do_not_point_at_a_stacktrace():
    from dxray.weights import hub_reason

    cause = ConnectionError("[Errno -2] Name or service not known")
    err = OSError("Cannot load model nobody/x: the model is not fully cached locally (no snapshot) and an error "
                  "occurred while trying to fetch metadata from the Hub. Please check out the root cause in the "
                  "stacktrace above.")
    err.__cause__ = cause
    text = hub_reason(err)
    assert "stacktrace" not in text and "above" not in text
    assert text.endswith("fetch metadata from the Hub (ConnectionError: [Errno -2] Name or service not known)")
    assert hub_reason(OSError("line one\nsee the stack trace above for details")) == "line one"


def test_generator_hub_failure_message(monkeypatch):
    from diffusers import DiffusionPipeline

    from dxray.generator import LCMGenerator

    def fail(*args, **kwargs):
        try:
            raise ConnectionError("unreachable")
        except ConnectionError as cause:
            raise OSError("Cannot load model nobody/x: not cached. Please check out the root cause in the "
                          "stacktrace above.") from cause

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fail)
    with pytest.raises(DxrayError) as info:
        LCMGenerator.from_pretrained("nobody/x", device="cpu")
    assert str(info.value) == "cannot load generator 'nobody/x': Cannot load model nobody/x: not cached (ConnectionError: unreachable)"


# -- issue 23: segment.sam=segment-anything:TYPE:PATH (the original SAM checkpoints) ------------------------
def test_segment_anything_unknown_model_type_is_refused_before_any_run_folder(tmp_path, cache_dir):
    msg = refused(tmp_path, "segment.sam=segment-anything:vit_x:/data/sam_vit_b_01ec64.pth")
    assert msg == ("segment.sam: unknown segment-anything model type 'vit_x' in "
                   "'segment-anything:vit_x:/data/sam_vit_b_01ec64.pth'; give segment-anything:TYPE:PATH.pth with "
                   "TYPE one of vit_b, vit_l, vit_h")


@pytest.mark.parametrize("absent", ["checkpoint", "package"])
def test_segment_anything_checkpoint_or_package_not_here(tmp_path, cache_dir, monkeypatch, absent):
    """A real run refuses it in one line; the dry run (a job meant for another machine) lists it."""
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    if absent == "package":
        ckpt.write_bytes(b"")
        monkeypatch.setitem(sys.modules, "segment_anything", None)  # import fails, no spec
    override = f"segment.sam=segment-anything:vit_b:{ckpt}"
    msg = one_error_line(invoke("explain", TINY_YAML, f"output={tmp_path / 'out'}", override, "-q"))
    assert msg == {"checkpoint": f"segment.sam: SAM checkpoint not found: {ckpt}",
                   "package": f"segment.sam: 'segment-anything:vit_b:{ckpt}' needs the segment-anything package, "
                              f"which is not installed: pip install 'dxray[sam]'"}[absent]
    plan = dry_run(load_config(TINY_YAML, [f"output={tmp_path / 'out'}", override]), figures=[], warn=lambda m: None)
    assert plan.missing == [f"segment.sam {ckpt}" if absent == "checkpoint" else "segment.sam package segment-anything"]
    assert not (tmp_path / "out").exists()
