"""YAML rules of config files and overrides (issue 30): numbers as YAML 1.2 reads them, aliases bounded by the
text they expand to."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from dxray.config import load_config
from dxray.errors import DxrayError

ROOT = Path(__file__).resolve().parents[1]


def _nest(key: str, text: str) -> str:
    """``a.b`` and a YAML value as block-style file text."""
    parts = key.split(".")
    return "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parts[:-1])) + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}\n"


def _load(tmp_path: Path, where: str, key: str, text: str):
    """The config with ``key`` set to the YAML ``text`` in a file or in an override."""
    if where == "file":
        f = tmp_path / "c.yaml"
        f.write_text(_nest(key, text))
        return load_config(f, [])
    return load_config(None, [f"{key}={text}"])


def _refused(tmp_path, where, key, text) -> str:
    with pytest.raises(DxrayError) as e:
        _load(tmp_path, where, key, text)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and key in msg, msg
    return msg


WHERE = pytest.mark.parametrize("where", ["file", "override"])


@WHERE
def test_a_leading_zero_is_decimal_not_octal(tmp_path, where):
    # YAML 1.1 (PyYAML) reads 010 as 8: the run would seed with 8 and audit class 8 without a word.
    assert _load(tmp_path, where, "seed", "010").seed == 10
    assert _load(tmp_path, where, "targets.classes", "[010, 0017, 09]").targets.classes == [10, 17, 9]
    assert _load(tmp_path, where, "targets.features", "{010: [010]}").targets.features == {10: [10]}


@WHERE
@pytest.mark.parametrize("key, text", [("seed", "1:00"), ("seed", "-1:00"), ("targets.classes", "[1:00]"),
                                       ("optimize.lr", "1:30.5"), ("optimize.steps", "1:40"), ("seed", "1_000"),
                                       ("seed", "0b1010"), ("seed", "+0x1F"), ("optimize.lr", "1_0.5")])
def test_yaml_1_1_only_numbers_are_refused_naming_the_key(tmp_path, where, key, text):
    # 1:00 is 60 in YAML 1.1 (sexagesimal) and a string in 1.2; a number field takes no string.
    assert "expected a number, got the string" in _refused(tmp_path, where, key, text)


@WHERE
def test_numbers_yaml_1_2_reads(tmp_path, where):
    assert _load(tmp_path, where, "seed", "0o17").seed == 15
    assert _load(tmp_path, where, "seed", "0x1F").seed == 31
    assert _load(tmp_path, where, "optimize.lr", "1e-3").optimize.lr == 0.001  # a string to YAML 1.1
    assert _load(tmp_path, where, "optimize.lr", ".5").optimize.lr == 0.5
    assert _load(tmp_path, where, "seed", "+12").seed == 12


@WHERE
def test_only_true_and_false_are_booleans(tmp_path, where):
    # YAML 1.1 also reads yes/no/on/off: a run_id or a class name 'no' became False.
    kwargs = _load(tmp_path, where, "classifier.kwargs",
                   "{a: yes, b: no, c: on, d: Off, e: 010, f: 1:00, g: 2020-01-01, h: true, i: FALSE, j: ~}")
    assert kwargs.classifier.kwargs == {"a": "yes", "b": "no", "c": "on", "d": "Off", "e": 10, "f": "1:00",
                                        "g": "2020-01-01", "h": True, "i": False, "j": None}
    assert _load(tmp_path, where, "run_id", "no").run_id == "no"
    assert _load(tmp_path, where, "classifier.class_names", "[yes, no, on, off]").classifier.class_names == \
        ["yes", "no", "on", "off"]


def test_explicit_tags_follow_yaml_1_2_too(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: !!int 010\n")
    assert load_config(f).seed == 10
    for text in ("!!int 1:00", "!!int 0b11", "!!float 1_0.5", "!!bool yes"):
        f.write_text(f"seed: 1\nrun_id: {text}\n")
        with pytest.raises(DxrayError, match="not valid YAML.*line 2, column 9"):
            load_config(f)


def _amplified(scalar_chars: int, width: int, copies: int) -> str:
    """A config whose one long scalar is aliased ``width * copies`` times (a billion-laughs of text)."""
    return ("classifier:\n  kwargs:\n"
            f"    s: &s {'x' * scalar_chars}\n"
            f"    row: &row [{', '.join(['*s'] * width)}]\n"
            f"    rows: [{', '.join(['*row'] * copies)}]\n")


def test_an_alias_of_a_long_scalar_is_refused_without_expanding_it(tmp_path):
    # ~200 KB of file naming a 200,000-character string 4,500 times: 900 MB once written out (manifest,
    # fingerprint, dry run), yet only 4,551 values, under the value bound.
    f = tmp_path / "c.yaml"
    f.write_text(_amplified(200_000, 50, 90))
    assert f.stat().st_size < 220_000
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(DxrayError) as e:
            load_config(f)
        took = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "\n" not in msg and "characters once YAML aliases are expanded" in msg and "classifier.kwargs" in msg, msg
    assert took < 10 and peak < 50 * 2**20, (took, peak)  # the file is 0.2 MB; its expansion 900 MB


def test_the_alias_bound_is_on_the_total_text(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(_amplified(10_000, 11, 100))  # 11 million characters once expanded, in 1,212 values
    with pytest.raises(DxrayError, match="characters once YAML aliases are expanded"):
        load_config(f)
    # 1 MB once expanded (a 10,000-character string reached 100 times): a config file may hold that much, and the
    # secret scan of every expanded string must not make it slow (it took 198 s while _PAIR was quadratic).
    f.write_text(_amplified(10_000, 10, 10))
    assert len(load_config(f).classifier.kwargs["rows"]) == 10
    with pytest.raises(DxrayError, match="override 'classifier.kwargs=.*characters once YAML aliases"):
        load_config(None, ["classifier.kwargs=" + "{s: &s " + "x" * 100_000 + ", r: [" + "*s, " * 200 + "]}"])


@pytest.mark.parametrize("config", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(config):
    assert load_config(config).resolved_run_id()
