import os
import re
from pathlib import Path

import pytest

from dxray.config import Config, build_config, load_config, parse_overrides
from dxray.errors import DxrayError


def test_defaults_are_the_papers_settings():
    cfg = Config()
    assert (cfg.generator.steps, cfg.generator.guidance_scale, cfg.generator.resolution) == (4, 1.0, 512)
    assert (cfg.optimize.optimizer, cfg.optimize.lr, cfg.prompt.n_tokens, cfg.sample.k) == ("adamw", 0.1, 1, 10)
    assert cfg.targets.top_k == 5


def test_overrides_are_parsed_as_yaml_values():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=null", "e=x"]) == {"a": {"b": 3, "c": [1, 2]}, "d": None, "e": "x"}
    cfg = build_config({"optimize": {"lr": 0.5}}, ["optimize.steps=7", "targets.classes=[3, 4]"])
    assert (cfg.optimize.lr, cfg.optimize.steps, cfg.targets.classes) == (0.5, 7, [3, 4])


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(DxrayError) as e:
        build_config({}, ["optimize.lrr=0.1"])
    msg = str(e.value)
    assert "unknown config key 'optimize.lrr'" in msg and "lr, optimizer," in msg and "\n" not in msg
    with pytest.raises(DxrayError, match="unknown config key 'colour'; valid keys: cache_dir, classifier"):
        build_config({"colour": 1})


@pytest.mark.parametrize("override, field", [
    ("optimize.steps=0", "optimize.steps"), ("optimize.lr=-1", "optimize.lr"), ("optimize.lr=0", "optimize.lr"),
    ("generator.steps=0", "generator.steps"), ("prompt.n_tokens=0", "prompt.n_tokens"),
    ("targets.classes=[-1]", "targets.classes"), ("sample.k=0", "sample.k"),
])
def test_non_positive_values_name_the_field(override, field):
    with pytest.raises(DxrayError, match=f"config field '{field}'"):
        build_config({}, [override])


def test_template_without_placeholder():
    with pytest.raises(DxrayError, match=r"prompt.templates.*must contain '\{\}' exactly once"):
        build_config({"prompt": {"templates": ["a texture of"]}})


def test_held_out_seeds_are_checked():
    with pytest.raises(DxrayError, match="sample.seeds has 2 seeds but sample.k is 3"):
        build_config({"sample": {"k": 3, "seeds": [1, 2]}})
    with pytest.raises(DxrayError, match=r"\[0, 2\*\*31\)"):
        build_config({"sample": {"k": 1, "seeds": [2**31]}})


def test_config_files(tmp_path):
    with pytest.raises(DxrayError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimize: [unclosed\n")
    with pytest.raises(DxrayError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("optimize:\n  steps: 3\n")
    assert load_config(good, ["optimize.lr=0.2"]).optimize.model_dump()["steps"] == 3


def test_run_id_follows_what_defines_results():
    a = build_config({}, ["output=/tmp/a", "optimize.batch_tasks=2"])
    b = build_config({}, ["output=/tmp/b", "optimize.batch_tasks=8"])
    c = build_config({}, ["optimize.lr=0.01"])
    assert a.resolved_run_id() == b.resolved_run_id() != c.resolved_run_id()
    assert build_config({}, ["run_id=mine"]).resolved_run_id() == "mine"
    with pytest.raises(DxrayError, match="run_id"):
        build_config({}, ["run_id=a/b"])


# Issue 22: no input gives a traceback; each bad input is one line naming the field.

def _one_line_error(fn, *args) -> str:
    with pytest.raises(DxrayError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg and "\r" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", b"seed: 1\n\x80\x81\n", bytes(range(256))])
def test_config_file_that_is_not_utf8_text(tmp_path, content):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    assert f"config file {f} is not UTF-8 text" in _one_line_error(load_config, f)


def test_config_file_with_control_characters_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"seed: 1\x00\n")
    assert "not valid YAML" in _one_line_error(load_config, f)


def test_config_path_that_is_a_folder_or_unreadable(tmp_path, monkeypatch):
    assert f"config file {tmp_path} is a folder" in _one_line_error(load_config, tmp_path)
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\n")
    f.chmod(0)
    try:
        if os.access(f, os.R_OK):  # root reads it anyway: make the read fail as it would for anyone else
            def refuse(self):
                raise PermissionError(13, "Permission denied", str(self))
            monkeypatch.setattr(Path, "read_bytes", refuse)
        assert f"config file {f} cannot be read: Permission denied" in _one_line_error(load_config, f)
    finally:
        f.chmod(0o600)


@pytest.mark.parametrize("override", ["optimize.lr=[1,", "a=: b", "x={", "seed='1", "seed=[[[[[[[[[[[["])
def test_override_values_yaml_cannot_parse(override):
    msg = _one_line_error(parse_overrides, [override])
    assert f"override {override!r}" in msg and "not valid YAML" in msg


@pytest.mark.parametrize("override", ["seed=!!python/object:os.system", "seed=!foo 1", "seed=!!str 5",
                                      "x=!!binary aGVsbG8=", "x=[1, !!int 2]", "x={a: !t 1}", "x=!<tag:x> 1"])
def test_override_values_with_yaml_tags_are_refused(override):
    msg = _one_line_error(parse_overrides, [override])
    assert f"override {override!r}" in msg and "YAML tags are not allowed in overrides" in msg


@pytest.mark.parametrize("override", ["a..b=1", ".a=1", "a.=1", "a. .b=1"])
def test_override_keys_with_empty_parts(override):
    msg = _one_line_error(parse_overrides, [override])
    assert f"override {override!r}" in msg and "empty" in msg


def test_override_value_with_a_duplicate_key():
    msg = _one_line_error(parse_overrides, ["classifier.kwargs={a: 1, a: 2}"])
    assert "key 'a' appears twice" in msg


def test_yaml_errors_in_a_config_file_keep_line_and_column(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\noptimize:\n  steps: [1, 2\n  lr: 3\n")
    msg = _one_line_error(load_config, f)
    assert "not valid YAML" in msg and re.search(r"line \d+, column \d+", msg), msg
    f.write_text("seed: 1\nseed2: 'x\n")
    assert re.search(r"line \d+, column \d+", _one_line_error(load_config, f))


def test_a_key_given_twice_in_a_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\noptimize:\n  steps: 3\nprompt:\n  n_tokens: 1\ndevice: cpu\n"
                 "classifier:\n  spec: tiny\noptimize:\n  lr: 0.1\n")
    assert f"config file {f}: key 'optimize' appears twice (lines 2 and 9)" in _one_line_error(load_config, f)
    f.write_text("optimize:\n  steps: 3\n  lr: 0.1\n  steps: 4\n")
    assert "key 'steps' appears twice (lines 2 and 4)" in _one_line_error(load_config, f)
    f.write_text("targets:\n  features: {0: [1], 0: [2]}\n")
    assert "key 0 appears twice" in _one_line_error(load_config, f)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimize:\n  <<: {steps: 3, lr: 0.5}\n  steps: 4\n")
    assert load_config(f).optimize.steps == 4


@pytest.mark.parametrize("override, field, words", [
    ("targets.classes=[1, 2, 1]", "targets.classes", "twice"),
    ("sample.seeds=[3, 4, 3]", "sample.seeds", "twice"),
    ("optimize.steps=true", "optimize.steps", "boolean"),
    ("optimize.lr=true", "optimize.lr", "boolean"),
    ("targets.classes=[true]", "targets.classes", "boolean"),
    ("generator.grad_steps=false", "generator.grad_steps", "boolean"),
    ("optimize.lr=.inf", "optimize.lr", "finite"),
    ("optimize.lr=.nan", "optimize.lr", "finite"),
    ("verdict.delta=.nan", "verdict.delta", "finite"),
    ("cluster.gpus_per_explainer=.inf", "cluster.gpus_per_explainer", "finite"),
    ("output=''", "output", "empty"),
    ("output='   '", "output", "empty"),
    ("seed=1e400", "seed", ""),
    ("seed=99999999999999999999999", "seed", ""),
    ("seed=9223372036854775808", "seed", ""),
    ("optimize.steps=1000000000000", "optimize.steps", ""),
    ("optimize.samples_per_step=100000000", "optimize.samples_per_step", ""),
    ("optimize.restarts=101", "optimize.restarts", ""),
    ("optimize.batch_tasks=100000000", "optimize.batch_tasks", ""),
    ("sample.k=100000000", "sample.k", ""),
    ("sample.batch_size=100000000", "sample.batch_size", ""),
    ("segment.batch_size=100000000", "segment.batch_size", ""),
    ("targets.top_k=100000000", "targets.top_k", ""),
    ("generator.resolution=1000000", "generator.resolution", ""),
    ("targets.classes=[99999999999999999999]", "targets.classes", ""),
    ("targets.features={0: [1, 2, 1]}", "targets.features", "twice"),
    ("targets.features={0: [-1]}", "targets.features", ""),
    ("targets.features={cat: [1]}", "targets.features", "integer"),
    ("targets.features={'0': [1]}", "targets.features", "integer"),
    ("targets.features={true: [1]}", "targets.features", ""),
    ("segment.prompts={cat: a cat}", "segment.prompts", "integer"),
    ("segment.prompts={3: ''}", "segment.prompts[3]", "the detection prompt is empty"),
    ("segment.prompts={3: '  '}", "segment.prompts[3]", "the detection prompt is empty"),
    ("segment.prompts={3: []}", "segment.prompts[3]", "lists 0 detection prompts"),
    ("segment.concepts=[]", "segment.concepts", "lists 0 concepts"),
    ("segment.concepts=[snow, Snow]", "segment.concepts", "concept 'snow' is listed twice"),
    ("segment.concepts=[snow., water]", "segment.concepts", "holds a '.'"),
    ("segment.concepts=/no/such/concepts.txt", "segment.concepts", "file not found"),
    ("segment.concepts=[a, '']", "segment.concepts", "a concept is empty"),
    ("segment.prompts={3: [a, b, c, d, e, f, g, h, i]}", "segment.prompts[3]", "lists 9 detection prompts (1 to 8)"),
    ("segment.prompts={3: [fish, ' Fish.']}", "segment.prompts[3]", "'fish' is listed twice"),
    ("segment.prompts={3: [fish, '']}", "segment.prompts[3]", "the detection prompt is empty"),
    ("segment.prompts={3: [fish, [x]]}", "segment.prompts", ""),
])
def test_values_that_used_to_be_accepted_silently(override, field, words):
    msg = _one_line_error(build_config, {}, [override])
    assert f"config field '{field}" in msg and words in msg, msg


def test_several_detection_prompts_need_the_control_that_chooses_among_them():
    msg = _one_line_error(build_config, {}, ["segment.prompts={3: [tench, fish]}", "segment.control=false"])
    assert "prompts[3] lists several detection prompts, but control is false" in msg, msg
    assert build_config({}, ["segment.prompts={3: [tench, fish]}", "segment.control=true"]).segment.prompts == \
        {3: ["tench", "fish"]}
    assert build_config({}, ["segment.prompts={3: [tench]}", "segment.control=false"]).segment.prompts == {3: ["tench"]}


@pytest.mark.parametrize("run_id", ["x" * 101, "a\x00b", "a\nb", "a\tb", "a\\b", "a/b", "", ".hidden", " a"])
def test_run_id_must_be_a_plain_short_name(run_id):
    msg = _one_line_error(build_config, {"run_id": run_id})
    assert "config field 'run_id'" in msg


def test_long_template_names_the_clip_limit():
    msg = _one_line_error(build_config, {"prompt": {"templates": ["a photo of {} " + "very " * 80]}})
    assert "config field 'prompt.templates'" in msg and "77 tokens" in msg


def test_numbers_that_stay_valid():
    cfg = build_config({}, ["optimize.lr=1", "sample.k=2", "sample.seeds=[0, 5]", "seed=9223372036854775807",
                            "targets.features={0: [1, 2], 3: [4]}", "segment.prompts={3: a cat}",
                            "verdict.delta=0", "cluster.gpus_per_explainer=0.5"])
    assert cfg.optimize.lr == 1.0 and isinstance(cfg.optimize.lr, float)
    assert cfg.targets.features == {0: [1, 2], 3: [4]} and cfg.segment.prompts == {3: "a cat"}


@pytest.mark.parametrize("data", [
    {"run_id": "\n" * 50 + "x" * 5000},
    {"prompt": {"templates": ["no placeholder\n" * 500]}},
    {"prompt": {"init": "bad\n" * 500}},
    {"optimize": {"optimizer": "x\n" * 500}},
    {"bad\nkey" * 100: 1},
    {"optimize": {"bad\u202ekey": 1}},
    {"output": "out\x00put"},
    {"classifier": {"spec": "a\x00b"}},
])
def test_every_config_error_is_one_short_line(data):
    msg = _one_line_error(build_config, data)
    assert msg.isprintable(), msg


def test_recursive_or_huge_yaml_aliases(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("classifier:\n  kwargs: &a {x: *a}\n")
    assert "config file" in _one_line_error(load_config, f)
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    f.write_text("classifier:\n  kwargs:\n" + "".join(f"    {line}\n" for line in laughs))
    assert "config file" in _one_line_error(load_config, f)
    f.write_text("classifier:\n  kwargs: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "config file" in _one_line_error(load_config, f)


@pytest.mark.parametrize("text", ["!!timestamp x", "!!timestamp 2020-02-30", "!!int abc", "!!float x", "!!bool x",
                                  "9" * 5000, "!!timestamp 9999-12-31 23:59:60", "!!int 010_0", "!!bool yes"])
def test_values_pyyaml_cannot_construct(tmp_path, text):
    # PyYAML raises AttributeError/ValueError/KeyError here, not YAMLError
    f = tmp_path / "c.yaml"
    f.write_text(f"seed: 1\nrun_id: {text}\n")
    msg = _one_line_error(load_config, f)
    assert "not valid YAML" in msg and "line 2, column 9" in msg, msg
    if not text.startswith("!"):
        assert "not valid YAML" in _one_line_error(parse_overrides, [f"run_id={text}"])


# Issue 30: a key given twice in overrides is refused, as a key given twice in a file is.

@pytest.mark.parametrize("overrides, words", [
    (["seed=1", "seed=2"], "override key 'seed' is given twice (overrides 1 and 2)"),
    (["optimize.lr=0.1", "seed=3", "optimize.lr=0.2"], "override key 'optimize.lr' is given twice (overrides 1 and 3)"),
    ([" seed =1", "seed=1"], "override key 'seed' is given twice"),
    (["optimize={lr: 1}", "optimize.lr=2"], "override keys 'optimize' and 'optimize.lr' overlap"),
    (["optimize.steps=2", "optimize={lr: 1}"], "override keys 'optimize' and 'optimize.steps' overlap"),
    (["targets.features={0: [1]}", "targets.features={1: [2]}"], "'targets.features' is given twice"),
    (["output=s3://AKIA:abc/def@b/x", "output=/tmp/x"], "override key 'output' is given twice"),
])
def test_a_key_given_twice_in_overrides(overrides, words):
    msg = _one_line_error(load_config, None, overrides)
    assert words in msg and ("give each key once" in msg or "not both" in msg) and "abc/def" not in msg, msg


def test_distinct_override_keys_in_one_section_still_combine():
    cfg = load_config(None, ["optimize.lr=0.5", "optimize.steps=3", "targets.features={0: [1]}", "targets.top_k=2"])
    assert (cfg.optimize.lr, cfg.optimize.steps, cfg.targets.features, cfg.targets.top_k) == (0.5, 3, {0: [1]}, 2)


def test_dry_run_refuses_a_key_given_twice(tmp_path):
    from typer.testing import CliRunner

    from dxray.cli import app

    tiny = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"
    res = CliRunner().invoke(app, ["audit", str(tiny), "--dry-run", "--", f"output={tmp_path / 'out'}",
                                   f"cache_dir={tmp_path / 'cache'}", "seed=1", "seed=2"])
    assert res.exit_code == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: override key 'seed' is given twice") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "out").exists()


# Issue 30: a config path that is no file says what it is.

def test_config_path_that_is_a_device_a_pipe_or_a_link(tmp_path):
    assert "config file /dev/zero is a character device" in _one_line_error(load_config, "/dev/zero", [])
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "to-folder").symlink_to(folder)
    msg = _one_line_error(load_config, tmp_path / "to-folder", [])
    assert f"config file {tmp_path / 'to-folder'} is a symbolic link to a folder ('{folder}')" in msg, msg
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.yaml")
    msg = _one_line_error(load_config, tmp_path / "dangling", [])
    assert f"is a symbolic link to '{tmp_path / 'nowhere.yaml'}', which does not exist" in msg, msg
    os.mkfifo(tmp_path / "fifo")
    assert "is a named pipe (FIFO)" in _one_line_error(load_config, tmp_path / "fifo", [])
    (tmp_path / "c.yaml").write_text("seed: 3\n")
    (tmp_path / "to-file").symlink_to(tmp_path / "c.yaml")
    assert load_config(tmp_path / "to-file").seed == 3
