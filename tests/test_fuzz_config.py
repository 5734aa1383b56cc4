"""Property tests (issue 22): no config file or override gives a traceback.

Generated config files (YAML built from the Config model's keys mixed with garbage, YAML syntax
fragments, unicode control and bidi characters, huge numbers, raw bytes) and ``key=value`` overrides
go to :func:`dxray.config.load_config` and to ``dxray audit --dry-run``. Each either loads or gives
one line, ``error: ...``, with exit status 2, and nothing is written to the output folder or the
current directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import get_args

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from dxray.cli import app
from dxray.config import Config, _model_in, load_config
from dxray.errors import DxrayError

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = (ROOT / "jobs" / "configs" / "tiny.yaml").read_text()


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every field of the Config model by dotted key, sections included, with its annotation."""
    out = {}
    for name, field in model.model_fields.items():
        out[prefix + name] = field.annotation
        sub = _model_in(field.annotation)
        if sub is not None and sub is not model:
            out |= _fields(sub, f"{prefix}{name}.")
    return out


FIELDS = _fields(Config)
VALID_KEYS = sorted(FIELDS)

# Characters that break naive handling: line breaks, NUL and other controls, bidi overrides, zero-width
# and non-characters, quotes, YAML indicators and rich markup brackets.
ODD = "\x00\x01\x07\x08\t\n\r\x0b\x0c\x1b\x7f\x85\u2028\u2029\u202e\u2066\u200b\ufeff\ufffe\uffff'\"[]{}:,#&*!|>%@`/\\="
odd_text = st.text(st.one_of(st.characters(), st.sampled_from(ODD)), max_size=20)
MARKUP = ["[/]", "[bold]x", "[/x]", "x[red]y", "[link=x]", "[[/]]", "[b]a[/b]"]
WORDS = ["tiny", "{}", "a texture of {}", "object", "texture", "shape", "random", "class", "word:cat", "word:",
         "soft", "hard", "weights", "images", "table", "predicted", "labelled", "auto", "cpu", "cuda", "cuda:0",
         "none", "DEFAULT", "penultimate", "logits", "adam", "adamw", "float32", "bfloat16", "", " ", "x" * 120,
         "\u202eevil", "a\nb", "a\x00b", "😀", "-", "./rel", "~/x", "/nonexistent/file.csv", "[/]{}", "{} [/x]",
         *MARKUP]

FRAGMENTS = [
    "[1,", "{", "}", "]", "x: [", "a=: b", ": b", "- a", "? a", "&a [*a]", "*a", "&a", "!!str 5", "!foo 1",
    "!!python/object:os.system", "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2020-01-01", "2020-01-01",
    "~", "null", "true", "no", "on", ".inf", "-.inf", ".nan", "1e400", "1.0e400", "-0", "0x1F", "0o17", "1_000",
    "99999999999999999999999", "10**12", "-99999999999999999999999", "9223372036854775808", "2147483648",
    "'", '"', "'unclosed", '"\\x00"', '"\\u202e"', "|", ">", "%YAML 1.1", "---", "...", "#comment", "[[[[[[[[",
    "{a: 1, a: 2}", "{0: [1, 1]}", "{0: ''}", "{true: [1]}", "['{}', '{}']", "[]", "{}", "''", "' '",
    "a\nb", "a\tb", "\u202eevil", "x" * 400, "{} " * 120, "[" * 200 + "]" * 200, *MARKUP,
    # Numbers and booleans YAML 1.1 reads and 1.2 does not, or reads otherwise (issue 30)
    "010", "0777", "-010", "09", "1:00", "-1:30:00", "190:20:30.15", "1_0.5", "0b101", "+0x1F", "-0o17",
    "yes", "Off", "Y", "2001-12-14t21:59:43.10-05:00",
]

huge_ints = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**12, 10**30, -1, -(2**63)])
small_ints = st.integers(min_value=0, max_value=12)
scalars = st.one_of(
    st.none(), st.booleans(), small_ints, st.integers(), huge_ints,
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(WORDS), odd_text,
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(small_ints, st.sampled_from(WORDS), odd_text), inner,
                                                 max_size=3)), max_leaves=10)


def _typed(annotation) -> st.SearchStrategy:
    """Mostly well-typed values for a field (so the dry run gets past the config), sometimes at the edges."""
    text = repr(annotation)
    if "Literal" in text:
        return st.sampled_from(list(get_args(annotation)))
    if "dict[" in text:
        return st.dictionaries(st.one_of(small_ints, huge_ints), st.one_of(st.lists(small_ints, max_size=3),
                                                                          st.sampled_from(WORDS)), max_size=3)
    if "list[" in text:
        return st.lists(st.one_of(small_ints, st.sampled_from(WORDS), huge_ints), max_size=4)
    if "bool" in text:
        return st.booleans()
    if "int" in text:
        return st.one_of(small_ints, small_ints, huge_ints, st.none())
    if "float" in text:
        return st.one_of(st.floats(0, 2), st.sampled_from([0, 1, 1e300, 1e-300]), st.none())
    if "str" in text:
        return st.one_of(st.sampled_from(WORDS), st.none())
    return values


def _yaml_value(value) -> str:
    return json.dumps(value, ensure_ascii=False)


garbage_text = st.one_of(
    st.sampled_from(FRAGMENTS), odd_text,
    st.lists(st.sampled_from(FRAGMENTS), min_size=2, max_size=4).map(" ".join),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
)
garbage_keys = st.one_of(
    odd_text, st.sampled_from(MARKUP),
    st.builds(lambda k, g: f"{k}.{g}", st.sampled_from(VALID_KEYS), odd_text),
    st.lists(st.one_of(st.sampled_from(["", "optimize", "lr", "0"]), odd_text), max_size=4).map(".".join),
)
typed_pair = st.sampled_from(VALID_KEYS).flatmap(lambda k: st.tuples(st.just(k), st.one_of(
    _typed(FIELDS[k]).map(_yaml_value), _typed(FIELDS[k]).map(_yaml_value), _typed(FIELDS[k]).map(_yaml_value),
    values.map(_yaml_value), garbage_text)))
garbage_pair = st.tuples(st.one_of(garbage_keys, st.sampled_from(VALID_KEYS)), st.one_of(
    values.map(_yaml_value), garbage_text))
override = st.one_of(*[typed_pair.map("=".join)] * 6, garbage_pair.map("=".join), odd_text)
overrides = st.lists(override, max_size=4)


def _nest(key: str, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _dump(mapping) -> str:
    return yaml.safe_dump(mapping, allow_unicode=True, sort_keys=False)


yaml_snippet = st.one_of(
    typed_pair.map(lambda kv: _dump(_nest(kv[0], _pair_value(kv[1])))),
    st.builds(_nest, st.one_of(garbage_keys, st.sampled_from(VALID_KEYS)), values).map(_dump),
    st.lists(st.sampled_from(FRAGMENTS), max_size=4).map("\n".join),
    st.builds(lambda k, v: f"{k}: {v}\n", st.one_of(garbage_keys, st.sampled_from(VALID_KEYS)), garbage_text),
)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pair_value(text: str):
    try:
        return yaml.safe_load(text)
    except Exception:  # PyYAML lets ValueError & co. escape for some scalars (dxray's loader does not)
        return text


@st.composite
def config_files(draw) -> bytes:
    # st.characters() draws lone surrogates too: written as UTF-8 would write them, they are bytes a file can hold
    kind = draw(st.sampled_from(["tiny-merged"] * 6 + ["tiny+", "yaml", "bytes", "tiny-bytes", "text"]))
    if kind == "tiny-merged":  # tiny.yaml with a few keys set (a mapping, so no key is given twice)
        data = yaml.safe_load(TINY_YAML)
        for k, v in draw(st.lists(typed_pair, max_size=3)):
            data = _deep_merge(data, _nest(k, _pair_value(v)))
        return _dump(data).encode("utf-8", "surrogatepass")
    if kind == "tiny+":
        return (TINY_YAML + "\n" + "".join(draw(st.lists(yaml_snippet, max_size=3)))).encode("utf-8", "surrogatepass")
    if kind == "yaml":
        return "".join(draw(st.lists(yaml_snippet, max_size=4))).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "tiny-bytes":
        raw = TINY_YAML.encode()
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    return draw(odd_text).encode("utf-8", "surrogatepass")


# Where the output goes (always under the example's own folder, given last so the fuzz cannot move it).
output_suffixes = st.one_of(st.just(""), st.text(st.characters(blacklist_characters="/\\.\x00"), min_size=1, max_size=10))


class _Example:
    """A fresh folder per example: the config file, an output folder that must stay untouched, a cwd."""

    def __init__(self, content: bytes, path_kind: str):
        self._tmp = tempfile.TemporaryDirectory(prefix="dxray-fuzz-")
        self.root = Path(self._tmp.name)
        self.out = self.root / "out"
        self.cwd = self.root / "cwd"
        self.cwd.mkdir()
        self.config = self.root / "c.yaml"
        self.config.write_bytes(content)
        self.path = {"file": self.config, "folder": self.root, "missing": self.root / "missing.yaml"}[path_kind]

    def __enter__(self):
        self._old_cwd = os.getcwd()
        os.chdir(self.cwd)
        return self

    def __exit__(self, *exc):
        os.chdir(self._old_cwd)
        self._tmp.cleanup()

    def assert_nothing_written(self):
        written = [p for p in self.out.rglob("*") if p.is_file()] if self.out.exists() else []
        assert not written, f"files written under the output folder: {written[:5]}"
        assert not list(self.cwd.iterdir()), f"files created in the cwd: {list(self.cwd.iterdir())[:5]}"


@pytest.fixture(scope="module")
def shared_cache():
    """Tiny models may be built into cache_dir (a cache, allowed); one for all examples keeps it fast."""
    with tempfile.TemporaryDirectory(prefix="dxray-fuzz-cache-") as d:
        yield d


path_kinds = st.sampled_from(["file"] * 8 + ["folder", "missing"])


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(content=config_files(), extra=overrides, path_kind=path_kinds, suffix=output_suffixes)
# Inputs that once gave a traceback, kept so every run tries them.
@example(content=b"seed: !!timestamp x\n", extra=[], path_kind="file", suffix="")
@example(content=b"seed: 2020-02-30\n", extra=["run_id=" + "9" * 5000], path_kind="file", suffix="")
@example(content=b"\xff\xfe\x00", extra=[], path_kind="file", suffix="")
@example(content=b"a: &a [*a]\n", extra=["x=&b {y: *b}"], path_kind="file", suffix="")
def test_load_config_loads_or_gives_one_line(shared_cache, content, extra, path_kind, suffix):
    with _Example(content, path_kind) as ex:
        tail = [f"cache_dir={shared_cache}", f"output={ex.out / suffix}"]
        try:
            load_config(ex.path, [*extra, *tail])
        except DxrayError as e:
            msg = str(e)
            assert msg and "\n" not in msg and "\r" not in msg and msg.isprintable(), repr(msg)
            assert len(msg) <= 400, msg
        ex.assert_nothing_written()


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(content=config_files(), extra=overrides, path_kind=path_kinds, suffix=output_suffixes)
# Inputs that once gave a traceback, kept so every run tries them.
@example(content=TINY_YAML.encode(), extra=["prompt.templates=['[/]{}']"], path_kind="file", suffix="")
@example(content=TINY_YAML.encode(), extra=["segment.detector='[/]'"], path_kind="file", suffix="")
@example(content=TINY_YAML.encode(), extra=["[/]=1", "optimize.steps=true"], path_kind="file", suffix="")
@example(content=b"seed: !!timestamp x\n", extra=[], path_kind="file", suffix="")
def test_dry_run_exits_0_or_2_with_one_line(shared_cache, content, extra, path_kind, suffix):
    with _Example(content, path_kind) as ex:
        tail = [f"cache_dir={shared_cache}", f"output={ex.out / suffix}"]
        # '--' first: an override that looks like an option ('-x=1') is then still an override.
        result = CliRunner().invoke(app, ["audit", str(ex.path), "--dry-run", "--", *extra, *tail])
        out, err = result.stdout, result.stderr
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        assert not crashed, f"{type(result.exception).__name__}: {result.exception!r}"[:2000]
        assert "Traceback" not in out + err
        assert result.exit_code in (0, 2), (result.exit_code, err[-2000:])
        if result.exit_code == 2:
            lines = err.rstrip("\n").split("\n")
            assert len(lines) == 1 and lines[0].startswith("error:") and lines[0] != "error:", err[-2000:]
        ex.assert_nothing_written()


@st.composite
def yaml_1_1_numbers(draw) -> tuple[str, int | str]:
    """A number spelled as only YAML 1.1 reads it (leading-zero octal, sexagesimal, '_', 0b, signed 0x/0o), or
    as only 1.2 does (0o), with the value YAML 1.2 gives it: the int, or the text itself as a string."""
    n = draw(st.integers(0, 10**6))
    sign = draw(st.sampled_from(["", "-", "+"]))
    kind = draw(st.sampled_from(["leading zero", "sexagesimal", "underscore", "binary", "hex", "octal", "float"]))
    if kind == "leading zero":
        return f"{sign}{'0' * draw(st.integers(1, 3))}{n}", int(f"{sign}{n}")
    if kind == "sexagesimal":
        text = sign + ":".join([str(draw(st.integers(1, 999))), *(f"{draw(st.integers(0, 59)):02d}"
                                                                  for _ in range(draw(st.integers(1, 2))))])
    elif kind == "underscore":
        digits = str(n + 10)
        at = draw(st.integers(1, len(digits) - 1))
        text = f"{sign}{digits[:at]}_{digits[at:]}"
    elif kind == "binary":
        text = f"{sign}0b{n:b}"
    elif kind in ("hex", "octal"):
        letter = {"hex": "x", "octal": "o"}[kind]
        text = f"{sign}0{letter}{n:{letter}}"
        if not sign:  # YAML 1.2's 0x and 0o are unsigned
            return text, n
    else:  # a sexagesimal or '_' float
        text = f"{sign}{draw(st.integers(1, 99))}{draw(st.sampled_from([':', '_']))}{draw(st.integers(10, 59))}.5"
    return text, text


NUMBER_KEYS = {"seed": ("seed: {}\n", "seed={}", lambda c: c.seed),
               "targets.classes": ("targets:\n  classes: [{}]\n", "targets.classes=[{}]", lambda c: c.targets.classes[0]),
               "classifier.kwargs": ("classifier:\n  kwargs:\n    v: {}\n", "classifier.kwargs.v={}",
                                     lambda c: c.classifier.kwargs["v"])}


@settings(max_examples=300, deadline=None, database=None)
@given(number=yaml_1_1_numbers(), key=st.sampled_from(sorted(NUMBER_KEYS)), where=st.sampled_from(["file", "override"]))
@example(number=("010", 10), key="seed", where="file")
@example(number=("010", 10), key="targets.classes", where="override")
@example(number=("1:00", "1:00"), key="seed", where="override")
@example(number=("1:00", "1:00"), key="targets.classes", where="file")
def test_yaml_1_1_numbers_load_as_yaml_1_2_reads_them_or_are_refused(number, key, where):
    """Issue 30: 010 is never 8 and 1:00 never 60; a number field refuses what YAML 1.2 reads as a string."""
    text, value = number
    in_file, override, read = NUMBER_KEYS[key]
    with tempfile.TemporaryDirectory(prefix="dxray-fuzz-") as d:
        path = Path(d) / "c.yaml"
        path.write_text(in_file.format(text) if where == "file" else "")
        try:
            got = read(load_config(path, [override.format(text)] if where == "override" else []))
        except DxrayError as e:
            msg = str(e)
            assert "\n" not in msg and key in msg, msg
            # refused only where the field cannot hold the 1.2 value: kwargs take anything, the others ints >= 0
            assert key != "classifier.kwargs" and not (isinstance(value, int) and value >= 0), msg
        else:
            assert got == value and type(got) is type(value), (text, got, value)
