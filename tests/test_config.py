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
