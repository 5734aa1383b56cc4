"""Issue 30, the CLI and report side: `report -o` never replaces a device, a FIFO, a folder or a path inside a run;
SIGTERM is an interrupt like Ctrl-C; control characters in class names reach no terminal and no page raw; usage
errors, repeated options and refusals are one line on stderr (no blank line, no library chatter); messages say
what stands at a path; an unfinished run, a decided table of another schema and annotation rows out of range are
said in one line."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, TINY_YAML
from typer.testing import CliRunner

EVIL = "gold\x1b]0;pwned\x07\x1b[2Jfish"  # sets the terminal title, then clears the screen
RAW = ("\x1b", "\x07")


def _make_run(folder: Path, run: str, class_name: str, r1: list[float]) -> Path:
    """A small decided run written through the real sink (no model): classes 1 and 2, three features."""
    from dxray.runs import redecide
    from dxray.storage.sink import RunSink

    sink = RunSink(str(folder), run)
    r = {(1, 10): r1, (1, 11): [0.8, 0.9], (2, 20): [0.0, 0.05]}
    sink.write_table("tasks", [{"run_id": run, "task_id": f"t{c}-{f}", "kind": "feature", "class_index": c,
                                "class_name": class_name if c == 1 else f"c{c}", "feature_index": f,
                                "feature_rank": f % 10 + 1, "template": "{}", "status": "ok"} for c, f in r],
                     part="all")
    sink.write_table("samples", [{"run_id": run, "task_id": f"t{c}-{f}", "seed": i, "object_fraction": v}
                                 for (c, f), vs in r.items() for i, v in enumerate(vs)], part="all")
    sink.write_manifest({"run_id": run, "config": {"classifier": {"spec": "tiny"}},
                         "tasks": {"planned": len(r), "skipped": 0, "ok": len(r), "failed": 0}})
    redecide(str(folder / run), 0.3)
    return folder / run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """RUN_A, and RUN_B whose class 1 holds terminal escapes in its name and a feature turned spurious."""
    folder = tmp_path_factory.mktemp("hardening")
    return _make_run(folder, "run-a", "goldfish", [0.8, 0.9]), _make_run(folder, "run-b", EVIL, [0.1, 0.2])


def _copy(run: Path, tmp_path: Path) -> Path:
    root = tmp_path / "out" / run.name
    shutil.copytree(run, root)
    return root


def _cli(*args):
    from dxray.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(result, code: int = 2) -> str:
    stdout, stderr = (result.stdout, result.stderr)
    code_got = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert code_got == code, (code_got, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr  # one line: no blank line, no box, no chatter
    return lines[0]


def _state(path: Path) -> tuple:
    """What stands at ``path``: its lstat kind, a symlink's target, a regular file's bytes."""
    st = os.lstat(path)
    return (stat.S_IFMT(st.st_mode), os.readlink(path) if path.is_symlink() else None,
            path.read_bytes() if stat.S_ISREG(st.st_mode) else None)


# Item 1: report -o


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _null_link(p: Path) -> None:
    p.symlink_to("/dev/null")  # the real /dev/null is never written: the refusal comes first, and is checked


def _folder_link(p: Path) -> None:
    (p.parent / "elsewhere").mkdir()
    p.symlink_to(p.parent / "elsewhere")


def _socket(p: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    return s


@pytest.mark.parametrize("what, make, where, says", [
    ("a FIFO", _fifo, "out", "is a FIFO"),
    ("a symlink to /dev/null", _null_link, "out", "is a symlink to a character device"),
    ("a socket", _socket, "out", "is a socket"),
    ("a folder", Path.mkdir, "out", "is a folder"),
    ("a symlink to a folder", _folder_link, "out", "is a symlink to a folder"),
    ("a FIFO as the pages folder", _fifo, "pages", "is a FIFO"),
    ("a symlink to /dev/null as the pages folder", _null_link, "pages", "is a symlink to a character device"),
    ("a symlink to a folder as the pages folder", _folder_link, "pages", "is a symlink to a folder"),
])
def test_report_out_refuses_what_is_not_a_regular_file_and_leaves_it_as_it_was(runs, tmp_path, what, make, where,
                                                                                 says):
    d = tmp_path / "d"
    d.mkdir()
    out, pages = d / "r.html", d / "r_files"
    target = out if where == "out" else pages
    keep = make(target)
    before = {p.name: _state(p) for p in d.iterdir()}
    line = _one_error_line(_cli("report", runs[1], "-o", out))
    assert says in line and str(target) in line, line
    assert {p.name: _state(p) for p in d.iterdir()} == before  # still what it was; nothing added beside it
    if keep is not None:
        keep.close()


@pytest.mark.parametrize("inside", ["x.html", "tasks/x.html", "verdicts/x.html", "sub/deeper/x.html"])
def test_report_out_inside_a_run_is_refused_and_the_run_still_reads(runs, tmp_path, inside):
    root = _copy(runs[1], tmp_path)
    (root / "sub" / "deeper").mkdir(parents=True)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    line = _one_error_line(_cli("report", root, "-o", root / inside))
    assert f"inside the run folder {root}" in line, line
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert _cli("redecide", root, "--delta", "0.4").exit_code == 0
    beside = _cli("report", root, "-o", root.parent / "report.html")  # beside the run: written
    assert beside.exit_code == 0 and (root.parent / "report.html").is_file()


# Item 6: SIGTERM


def test_sigterm_is_an_interrupt_with_its_line_and_the_same_command_resumes(tmp_path, cache_dir):
    from test_crash import Audit, _exactly_once, _plan

    from dxray.storage.sink import RunSink

    out = tmp_path / "out"
    extra = ["targets.top_k=3"]  # 8 tasks
    n_tasks, n_samples, run_id = _plan(out, cache_dir, *extra)
    root = out / run_id
    first = Audit(out, cache_dir, tmp_path / "first", *extra)
    try:
        first.wait_for_a_commit(root)
        os.kill(first.pid, signal.SIGTERM)  # the driver alone, as Kubernetes and `ray job stop` signal it
        code = first.wait(timeout=120)
    finally:
        first.stop()
    log = first.log()
    assert code == 143, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM: ") and "re-running the same command resumes" in last, log[-3000:]
    committed = len(RunSink(str(out), run_id).committed_task_ids())
    said = int(last.split(": ")[1].split(" task")[0])
    assert 0 < committed < n_tasks and said <= committed  # a commit may land between the count and the signal

    second = Audit(out, cache_dir, tmp_path / "second", *extra)
    try:
        assert second.wait(timeout=400) == 0, second.log()[-3000:]
    finally:
        second.stop()
    assert f"{committed} skipped" in second.log()
    _exactly_once(root, n_tasks, n_samples)


# Item 7: control characters


def test_class_names_with_terminal_escapes_are_shown_not_obeyed(runs, tmp_path):
    run_a, run_b = (_copy(r, tmp_path) for r in runs)
    shown = "gold[U+001B]]0;pwned[U+0007][U+001B][2Jfish"
    redecide = _cli("redecide", run_b, "--delta", "0.3")
    compare = _cli("compare", run_a, run_b, "--fail-on", "new-spurious")
    assert redecide.exit_code == 0 and compare.exit_code == 1, (redecide.stderr, compare.stderr)
    for result in (redecide, compare):
        text = result.stdout + result.stderr
        assert not any(c in text for c in RAW), text
    assert "[U+001B]" in redecide.stdout and shown in compare.stderr  # the fail line names the class
    report = _cli("report", run_b, "-o", tmp_path / "r.html")
    assert report.exit_code == 0, report.stderr
    pages = [tmp_path / "r.html", *(tmp_path / "r_files").glob("*.html"), *run_b.glob("comparison-vs-*.html")]
    assert len(pages) >= 4
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert not any(c in html for c in RAW), page
    assert shown in (tmp_path / "r_files" / "class-1.html").read_text(encoding="utf-8")


def test_visible_shows_every_control_character_and_keeps_text():
    from dxray.errors import visible

    assert visible("tab\tand\nnewline é 猫") == "tab\tand\nnewline é 猫"
    assert visible("a\x00b\rc\x7fd\x9be\u202ef") == "a[U+0000]b[U+000D]c[U+007F]d[U+009B]e[U+202E]f"


# Item 9: usage errors, refusals in one line, what stands at a path


USAGE = [
    (["redecide", "x", "--delta", "0x1"], "--delta"),
    (["redecide", "x", "--delta", ""], "--delta"),
    (["redecide", "x"], "Missing option '--delta'"),
    (["redecide", "x", "--delta", "0.1", "--delta", "0.2"], "--delta given 2 times"),
    (["report", "x", "-o", "a.html", "-o", "b.html"], "--out/-o given 2 times"),
    (["audit", str(TINY_YAML), "-q", "--quiet"], "--quiet/-q given 2 times"),
    (["audit", str(TINY_YAML), "--bogus"], "No such option: --bogus"),
    (["toyworld", "check"], "Missing argument"),
    (["no-such-command"], "No such command"),
]


@pytest.mark.parametrize("args, says", USAGE)
def test_usage_errors_are_one_line_exit_2_through_the_console_entry_point(tmp_path, args, says):
    dxray = Path(sys.executable).with_name("dxray")
    res = subprocess.run([str(dxray), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    line = _one_error_line(res)
    assert says in line, line
    assert _one_error_line(_cli(*args)) == line  # the app itself, as CliRunner and embedders call it


def test_repeatable_options_may_still_repeat(runs, tmp_path):
    run_a, run_b = (_copy(r, tmp_path) for r in runs)
    res = _cli("compare", run_a, run_b, "--fail-on", "new-spurious", "--fail-on", "class-bias")
    assert res.exit_code == 1 and "fail: new-spurious" in res.stderr, res.stderr


@pytest.mark.parametrize("broken", ["unet weights missing", "vae weights not safetensors"])
def test_a_refusal_while_models_load_is_exactly_one_line(tmp_path, cache_dir, broken):
    """No blank line from the stopped progress bar above it, no diffusers log line beside it."""
    from test_cli import run_cli

    from dxray.models.tiny import ensure_tiny_lcm

    gen = tmp_path / "gen"
    shutil.copytree(ensure_tiny_lcm(cache_dir), gen)
    if broken == "unet weights missing":
        (gen / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    else:
        (gen / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    res = run_cli("explain", str(TINY_YAML), f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}", "device=cpu",
                  f"generator.model={gen}", cache=cache_dir)
    assert "cannot load generator" in _one_error_line(res)


def _truncate_weights(folder: Path) -> None:
    for f in folder.rglob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])


@pytest.mark.parametrize("broken, says", [
    ("generator: model_index.json without _class_name", "cannot load generator .*: a config file lacks the key '_class_name'"),
    ("hf: classifier with truncated safetensors", "cannot load classifier 'hf:.*': a weights file is damaged or not safetensors"),
    ("SAM with truncated safetensors", "cannot load SAM .*: a weights file is damaged or not safetensors"),
    ("device=mps without MPS", "device 'mps' requested but this PyTorch has no MPS"),
    ("device=xpu", "device 'xpu' is not supported"),
    ("output=/dev/null", "output /dev/null: /dev/null is a character device, not a folder"),
])
def test_broken_models_and_devices_are_one_line_not_a_bug(tmp_path, cache_dir, broken, says):
    """Found beside issue 30's list: each was exit 3 ('a bug in dxray'), or called /dev/null a file."""
    import re

    from dxray.models.tiny import ensure_tiny_classifier, ensure_tiny_lcm
    from dxray.models.tiny_segment import ensure_tiny_sam

    args = [f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}", "device=cpu"]
    if broken.startswith("generator"):
        shutil.copytree(ensure_tiny_lcm(cache_dir), tmp_path / "g")
        (tmp_path / "g" / "model_index.json").write_text("{}")
        args.append(f"generator.model={tmp_path / 'g'}")
    elif broken.startswith("hf:"):
        shutil.copytree(ensure_tiny_classifier(cache_dir), tmp_path / "c")
        _truncate_weights(tmp_path / "c")
        args.append(f"classifier.spec=hf:{tmp_path / 'c'}")
    elif broken.startswith("SAM"):
        shutil.copytree(ensure_tiny_sam(cache_dir), tmp_path / "s")
        _truncate_weights(tmp_path / "s")
        args.append(f"segment.sam={tmp_path / 's'}")
    elif broken.startswith("device"):
        args[2] = broken.split()[0]
    else:
        args[0] = broken
    line = _one_error_line(_cli("explain", TINY_YAML, *args))
    assert re.search(says, line), line


def test_messages_say_what_stands_at_a_path(runs, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    os.mkfifo(tmp_path / "fifo")
    assert "is a folder, not a file" in _one_error_line(
        _cli("agreement", runs[1], "--annotations", tmp_path / "link"))
    assert "is a FIFO, not a file" in _one_error_line(_cli("agreement", runs[1], "--annotations", tmp_path / "fifo"))
    assert "a character device there" in _one_error_line(_cli("report", "/dev/zero", "-o", tmp_path / "r.html"))
    assert "a FIFO there" in _one_error_line(_cli("redecide", tmp_path / "fifo", "--delta", "0.3"))
    assert "nothing there" in _one_error_line(_cli("compare", tmp_path / "none", runs[1]))
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("field", ["classifier.class_names", "segment.concepts"])
def test_config_files_that_are_not_files_say_what_they_are(tmp_path, cache_dir, field):
    from dxray.config import load_config
    from dxray.errors import DxrayError
    from dxray.pipeline.job import AuditJob

    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    os.mkfifo(tmp_path / "fifo")
    for path, says in ((tmp_path / "link", "is a symlink to a folder, not a file"), (tmp_path / "fifo", "is a FIFO")):
        with pytest.raises(DxrayError) as e:
            cfg = load_config(TINY_YAML, [f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}", f"{field}={path}"])
            AuditJob(cfg, "explain").preflight()
        assert says in str(e.value) and "not found" not in str(e.value), e.value


# Item 10: an unfinished run, annotation rows out of range


@pytest.mark.parametrize("manifest, says", [
    (None, "its manifest.json is missing"),
    (b"{not json", "its manifest.json is not a JSON object"),
    (b'{"run_id": "run-b", "tasks": {"planned": 9}}', "it holds 3 of its 9 planned tasks"),
])
def test_report_of_an_unfinished_run_says_so_in_one_line_and_shows_what_is_there(runs, tmp_path, manifest, says):
    root = _copy(runs[1], tmp_path)
    if manifest is None:
        (root / "manifest.json").unlink()
    else:
        (root / "manifest.json").write_bytes(manifest)
    res = _cli("report", root, "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith("warning: run run-b has not finished (") and says in line, line
    assert "3 task(s) and 6 sample(s)" in line
    assert (tmp_path / "r_files" / "class-2.html").is_file()


def test_report_of_a_finished_run_says_nothing(runs, tmp_path):
    res = _cli("report", runs[1], "-o", tmp_path / "r.html")
    assert res.exit_code == 0 and res.stderr == "", res.stderr


def test_agreement_counts_the_annotation_rows_it_leaves_out(runs, tmp_path):
    from test_agreement import B, M, write_annotations

    good = {(1, 10, 1): [B] * 5, (1, 11, 2): [M] * 5, (2, 20, 1): [M] * 5}
    bad = {(-1, 10, 1): [B] * 3, (1, 12, 7): [M] * 2, (1, -3, 2): [M] * 4, (2, 21, 0): [B] * 1}
    annotations = write_annotations(tmp_path / "a.csv", good | bad)
    res = _cli("agreement", _copy(runs[1], tmp_path), "--annotations", annotations)
    assert res.exit_code == 0, res.stderr
    n = sum(len(v) for v in bad.values())
    notes = [line for line in res.stderr.splitlines() if "left out" in line]
    assert notes == [f"warning: {n} annotation row(s) left out: a negative class or feature index, or a feature "
                     f"rank outside 1..5"], res.stderr
    only_bad = write_annotations(tmp_path / "b.csv", bad)
    assert "none of its 10 rows" in _one_error_line(_cli("agreement", runs[1], "--annotations", only_bad))


# Item 8: a decided table of another schema


def _foreign(root: Path, table: str, how: str) -> None:
    part = root / table / "part-all.parquet"
    if how == "another tool's table":
        pq.write_table(pa.table({"class_index": pa.array(["x"]), "odd": pa.array([b"y"])}), part)
    else:  # a column dropped
        pq.write_table(pq.read_table(part).drop_columns(["template"]), part)


@pytest.mark.parametrize("table", ["classes", "verdicts"])
@pytest.mark.parametrize("how", ["another tool's table", "a column missing"])
@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_decided_table_of_another_schema_is_one_line_naming_it(runs, tmp_path, table, how, command):
    run_a, run_b = (_copy(r, tmp_path) for r in runs)
    _foreign(run_b, table, how)
    args = ["report", run_b, "-o", tmp_path / "r.html"] if command == "report" else ["compare", run_a, run_b]
    line = _one_error_line(_cli(*args))
    assert f"{table}/part-all.parquet" in line, line
    assert f"table {table} is not of dxray's schema" in line and "lacks column '" in line, line
    if how == "a column missing":
        assert "lacks column 'template';" in line, line
    if how == "a column missing":  # the advice works
        assert _cli("redecide", run_b, "--delta", "0.3").exit_code == 0
        assert _cli(*args).exit_code in (0, 1)


def test_exit_codes_are_documented_as_they_are():
    from dxray.cli import EXIT_CODES

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for code in ("130", "143"):
        assert code in EXIT_CODES and code in readme
