"""`dxray report`: the HTML report of a real tiny run (an index page plus a page per class and for the
neurons), parsed, checked for escaping and its Content-Security-Policy on every page, written atomically,
and rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.util
import io
import re
import shutil
import struct
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, TINY_YAML
from PIL import Image

EVIL = "<script>alert(1)</script> & co"
TEMPLATES = ["{}", "a photo of {}"]
FAILED_ERROR = "RuntimeError: CUDA out of memory <b>& more</b>"
PROMPT = "a <i>sled</i> & snow"
CHOSEN_LOSS = 7.25
RLO = "\u202e"
NEURON_ERROR = f"RuntimeError: unit <b>out</b> of {RLO}reach"
LAYER = "resnet.embedder"
PAGES = ["index", "class-0", "class-1", "neurons"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    """A real tiny run (2 classes, 2 templates, top-2 features, one neuron), then: one failed feature task,
    one learned prompt and one failed neuron task added to its tasks table, and re-decided with a delta
    between the observed r values so both verdicts (and the biased? hint) can appear."""
    from dxray.config import load_config
    from dxray.pipeline.local import run
    from dxray.runs import open_run, redecide

    out = tmp_path_factory.mktemp("report") / "out"
    cfg = load_config(TINY_YAML, [
        f"output={out}", f"cache_dir={cache_dir}", "optimize.steps=2", "sample.k=2", "device=cpu",
        "targets.top_k=2", f"classifier.class_names={[EVIL, 'tabby cat']!r}".replace("'", '"'),
        f"prompt.templates={TEMPLATES!r}".replace("'", '"'), f"targets.neurons=[{{layer: {LAYER}, unit: 3}}]",
    ])
    assert cfg.classifier.class_names[0] == EVIL
    summary = run(cfg)
    assert summary.failed == 0
    root = Path(summary.root)

    sink = open_run(str(root))
    tasks = sink.read_table("tasks").to_pylist()
    feature = next(t for t in tasks if t["kind"] == "feature" and t["class_index"] == 1 and t["template"] == "{}")
    feature["hard_prompt_text"] = PROMPT
    feature["chosen_loss"] = CHOSEN_LOSS  # the words' own loss: what the report shows for a hard prompt
    failed = {"status": "error", "final_loss": None, "loss_curve": None, "prompt_embedding": None,
              "hard_prompt_text": None, "target_prob": None, "chosen_loss": None}
    tasks.append({**feature, **failed, "task_id": "f" * 16, "feature_index": 999, "feature_rank": 3,
                  "error": FAILED_ERROR})
    neuron = next(t for t in tasks if t["kind"] == "neuron" and t["template"] == "{}")
    tasks.append({**neuron, **failed, "task_id": "e" * 16, "feature_index": 5, "error": NEURON_ERROR})
    shutil.rmtree(root / "tasks")
    sink.write_table("tasks", tasks, part="all")

    means = sorted(v["mean_object_fraction"] for v in sink.read_table("verdicts").to_pylist())
    redecide(str(root), float(min(1.0, (means[0] + means[-1]) / 2 + 1e-6)))
    return root


@pytest.fixture(scope="module")
def report(run_dir):
    from dxray.report import build_report

    path = build_report(str(run_dir), run_dir.parent / "report.html")
    assert path == run_dir.parent / "report.html" and path.is_file()
    assert (run_dir.parent / "report_files").is_dir()
    return path


def _page_path(report: Path, page: str) -> Path:
    return report if page == "index" else report.parent / "report_files" / f"{page}.html"


class _Page(HTMLParser):
    """What the tests look at: summary rows, class sections, task blocks, images, verdict badges, and every
    tag with its attributes (for the policy checks)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self.sections, self.tasks, self.images, self.badges = [], [], [], [], []
        self.unsure, self.cells = [], []  # low-confidence badges of tasks; (row class, cell class, text) on the index
        self.neuron_rows, self.ids, self.tags = [], set(), []
        self.scripts, self.styles, self.text, self.csp = [], [], [], []
        self.links = []
        self._section = self._group = self._task = None
        self._in_error = self._raw = None
        self.errors = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (a.get("class") or "").split()
        if "id" in a:
            self.ids.add(a["id"])
        if tag in ("script", "style"):
            self._raw = (tag, [])
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp.append(a["content"])
        if tag == "tr" and "data-class" in a:
            self.rows.append(int(a["data-class"]))
        if tag == "tr" and a.get("data-kind") == "neuron":
            self.neuron_rows.append(a)
        if tag == "section" and "class" in classes:
            self._section = int(a["data-class"])
            self.sections.append((self._section, a["id"]))
        if tag == "div" and "template-group" in classes:
            self._group = a["data-template"]
        if tag == "div" and "task" in classes:
            self._task = {**a, "class_index": self._section, "template": self._group, "images": 0}
            self.tasks.append(self._task)
        if tag == "div" and "error-box" in classes:
            self._in_error = True
        if tag == "span" and "unsure" in classes and "count" not in classes:
            self.unsure.append((self._section, int(self._task["data-feature"]), self._group, a["data-confidence"]))
        if tag == "td" and "unsure" in classes:
            self.cells.append((self.rows[-1], a["data-sort"]))
        if tag == "span" and "verdict" in classes:
            self.badges.append((self._section, int(self._task["data-feature"]), self._group, a["data-verdict"]))
        if tag == "img":
            self.images.append(a)
            self._task["images"] += 1
        if tag == "a":
            self.links.append(a.get("href"))

    def handle_endtag(self, tag):
        if tag == "div":
            self._in_error = False
        if self._raw and tag == self._raw[0]:
            (self.scripts if tag == "script" else self.styles).append("".join(self._raw[1]))
            self._raw = None

    def handle_data(self, data):
        if self._raw:
            self._raw[1].append(data)
            return
        self.text.append(data)
        if self._in_error:
            self.errors.append((self._task.get("data-feature"), data))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _all_pages(report: Path) -> list[Path]:
    return [report, *sorted((report.parent / "report_files").glob("*.html"))]


def test_report_layout_and_index(run_dir, report):
    from dxray.runs import open_run

    sink = open_run(str(run_dir))
    classes = sink.read_table("classes").to_pylist()
    files = report.parent / "report_files"
    assert sorted(p.name for p in files.iterdir()) == [".dxray-report", "class-0.html", "class-1.html",
                                                        "neurons.html"]
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    page = _parse(report)

    # A summary row per (class, template) row of the classes table; every link resolves to a page and an id on it.
    assert sorted(page.rows) == sorted(c["class_index"] for c in classes)
    assert len(classes) == 2 * len(TEMPLATES)
    assert not page.images and not page.sections  # the index holds no images: it opens at once
    targets = [h for h in page.links if h and h.startswith("report_files/")]
    assert len(targets) == len(classes) + 3  # class rows + 3 neuron tasks (2 ok templates, 1 failed)
    for href in targets:
        name, _, fragment = href.partition("#")
        linked = report.parent / name
        assert linked.is_file(), href
        assert not fragment or fragment in _parse(linked).ids, href

    # The neuron tasks are summarised on the index (the failed one with its error), their images on their page.
    assert len(page.neuron_rows) == 3 and "neurons" in page.ids
    assert sorted(r["data-status"] for r in page.neuron_rows) == ["error", "ok", "ok"]
    text = "".join(page.text)
    assert f"neuron {LAYER}:3" in text and f"neuron {LAYER}:5" in text
    assert NEURON_ERROR.replace(RLO, "[U+202E]") in text


def test_report_class_and_neuron_pages(run_dir, report):
    from dxray.report.thumbs import WIDTH
    from dxray.runs import open_run

    sink = open_run(str(run_dir))
    samples = sink.read_table("samples").to_pylist()
    verdicts = sink.read_table("verdicts").to_pylist()
    tasks_table = sink.read_table("tasks").to_pylist()
    pages = {p: _parse(_page_path(report, p)) for p in PAGES[1:]}

    # One class per class page; anchors of every template group.
    assert [pages["class-0"].sections, pages["class-1"].sections] == [[(0, "class-0")], [(1, "class-1")]]
    assert {f"class-{c}-t{j}" for c in (0, 1) for j in range(len(TEMPLATES))} <= \
        pages["class-0"].ids | pages["class-1"].ids

    # One <img> per sample, each an inline WebP no wider than it is shown, linked (relatively) to its full image.
    images = [(p, im) for p, pg in pages.items() for im in pg.images]
    assert len(images) == len(samples) > 0
    for _, img in images:
        assert img["src"].startswith("data:image/webp;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert thumb.format == "WEBP" and 0 < thumb.width <= WIDTH
        thumb.verify()
    full = [h for pg in pages.values() for h in pg.links if h and h.endswith(".png")]
    assert len(full) == len(samples)
    folder = report.parent / "report_files"
    assert all(not h.startswith(("/", "file:")) and (folder / h).is_file() for h in full)

    # Per task: its images; failed tasks with their (escaped) error; the learned prompt when present.
    tasks = [t for pg in pages.values() for t in pg.tasks]
    ok_tasks = [t for t in tasks if t["data-status"] == "ok"]
    assert len(ok_tasks) == 2 * 3 * len(TEMPLATES) + len(TEMPLATES)  # (class + top-2) x templates x 2 + neurons
    assert sum(t["images"] for t in ok_tasks) == len(samples)
    assert all(t["images"] == 2 for t in ok_tasks)  # sample.k = 2
    failed = [t for t in pages["class-1"].tasks if t["data-status"] == "error"]
    assert [(t["class_index"], t["data-feature"], t["template"]) for t in failed] == [(1, "999", "{}")]
    assert ("999", FAILED_ERROR) in pages["class-1"].errors
    assert ("5", NEURON_ERROR.replace(RLO, "[U+202E]")) in pages["neurons"].errors
    source = _page_path(report, "class-1").read_text(encoding="utf-8")
    assert html.escape(FAILED_ERROR, quote=False) in source and FAILED_ERROR not in source
    assert html.escape(PROMPT, quote=False) in source and PROMPT in "".join(pages["class-1"].text)
    # A hard prompt's loss is its words' own (chosen_loss), a soft prompt's the last step's (final_loss).
    assert source.count(f"loss {CHOSEN_LOSS:.3g}") == 1
    soft = next(t for t in tasks_table if t["class_index"] == 1 and t["kind"] == "class" and t["template"] == "{}")
    assert f"loss {soft['final_loss']:.3g}" in source

    # Verdict badges match the verdicts table, for every (class, feature, template).
    badges = pages["class-0"].badges + pages["class-1"].badges
    expected = {(v["class_index"], v["feature_index"], v["template"], v["verdict"]) for v in verdicts}
    assert set(badges) == expected and len(badges) == len(verdicts)
    assert {v["verdict"] for v in verdicts} == {"core", "spurious"}

    # Pages link back to the index row of their class, and to each other.
    assert "../report.html#row-1" in pages["class-1"].links and "class-0.html" in pages["class-1"].links
    assert "class-1.html" in pages["class-0"].links and "../report.html#neurons" in pages["neurons"].links


@pytest.mark.parametrize("page", PAGES)
def test_every_page_is_escaped_and_locked_down(page, report):
    """The escaping and Content-Security-Policy rules, page by page."""
    path = _page_path(report, page)
    source = path.read_text(encoding="utf-8")
    parsed = _parse(path)

    # One policy, first thing in <head>: nothing loads but data: images; the one style (and, on the index,
    # the one script) are allowed by their hash; no 'unsafe-inline' anywhere.
    [policy] = parsed.csp
    assert source.index("Content-Security-Policy") < source.index("<style>")
    rules = dict(r.strip().split(" ", 1) for r in policy.split(";"))
    assert rules["default-src"] == "'none'" and rules["img-src"] == "data:" and "unsafe" not in policy
    assert rules["base-uri"] == "'none'" and rules["form-action"] == "'none'"
    [style] = parsed.styles
    assert rules["style-src"] == _sha(style)
    assert len(parsed.scripts) == (1 if page == "index" else 0)
    assert rules["script-src"] == (_sha(parsed.scripts[0]) if parsed.scripts else "'none'")

    # Self-contained and inert: no external resource, no inline handler or style, no frames or forms.
    for tag, attrs in parsed.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base", "form", "frame"), tag
        for name, value in attrs:
            assert not name.startswith("on") and name != "style", (tag, name)
            if name == "src":
                assert value.startswith("data:image/"), value
            if name == "href":
                assert not re.match(r"^[a-z][a-z0-9+.-]*:", value) or value.startswith("file:///"), value
                assert not value.startswith("//")

    # The hostile class name is text, never markup; text-direction controls are shown, never applied.
    assert "<script>alert(1)" not in source and "<b>" not in source and "<i>" not in source
    assert RLO not in source
    if page in ("index", "class-0"):
        assert html.escape(EVIL, quote=False) in source and EVIL in "".join(parsed.text)


def test_report_links_outside_run_are_uris(run_dir, tmp_path):
    from dxray.report import build_report

    index = build_report(str(run_dir), tmp_path / "elsewhere" / "r.html")
    page = _parse(tmp_path / "elsewhere" / "r_files" / "class-1.html")
    full = [h for h in page.links if h and h.endswith(".png")]
    assert full and all(h.startswith("file:///") for h in full)
    assert "r_files/class-1.html" in _parse(index).links


def test_report_not_a_run(tmp_path):
    from dxray.errors import DxrayError
    from dxray.report import build_report

    for bad in (tmp_path, tmp_path / "missing"):
        with pytest.raises(DxrayError, match="no run found") as e:
            build_report(str(bad), tmp_path / "r.html")
        assert "\n" not in str(e.value)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_replaces_the_whole_report(run_dir, tmp_path):
    from dxray.report import build_report

    out = tmp_path / "site" / "report.html"
    build_report(str(run_dir), out)
    stale = out.parent / "report_files" / "class-77.html"
    stale.write_text("a page of an older report")
    out.write_text("an older index")
    build_report(str(run_dir), out)
    assert not stale.exists() and "dxray report" in out.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html", "report_files"]


@pytest.mark.parametrize("where", ["a page", "the index", "the swap"])
def test_a_crash_leaves_the_previous_report_whole(where, run_dir, tmp_path, monkeypatch):
    """A build that dies (here: an error raised part-way) leaves every final name as it was: no half page,
    no mix of old and new pages, no temporary files."""
    from dxray.report import build_report
    from dxray.report import html as report_html

    site = tmp_path / "site"
    out = site / "report.html"
    build_report(str(run_dir), out)
    before = _snapshot(site)

    class Crash(Exception):
        pass

    if where == "a page":
        real = report_html._write

        def write(folder, name, text):
            if name == "class-1.html":
                (folder / name).write_text(text[: len(text) // 2])  # half a page on disk, then the crash
                raise Crash
            real(folder, name, text)

        monkeypatch.setattr(report_html, "_write", write)
    elif where == "the index":
        real_render = report_html.render

        def render(page, **context):
            if page == "index":
                raise Crash
            return real_render(page, **context)

        monkeypatch.setattr(report_html, "render", render)
    else:
        real_rename, calls = Path.rename, []

        def rename(self, target):  # the new pages' move into place fails (once: the old ones can go back)
            if Path(target).name == "report_files" and not calls:
                calls.append(target)
                raise Crash
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Crash):
        build_report(str(run_dir), out)
    assert _snapshot(site) == before
    assert sorted(p.name for p in site.iterdir()) == ["report.html", "report_files"]


def test_report_cli(run_dir, tmp_path):
    from typer.testing import CliRunner

    from dxray.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["report", str(run_dir), "-o", str(tmp_path / "cli.html")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "cli.html") and (tmp_path / "cli.html").is_file()
    assert (tmp_path / "cli_files" / "class-0.html").is_file()
    result = runner.invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "no run found" in result.output
    help_text = runner.invoke(app, ["report", "--help"]).output
    assert "Example" in help_text and "dxray report" in help_text


@pytest.mark.parametrize("case", ["out is a folder", "pages folder is a file", "pages folder is someone else's"])
def test_report_paths_that_cannot_take_a_report_are_one_line(case, run_dir, tmp_path):
    from typer.testing import CliRunner

    from dxray.cli import app

    out = tmp_path / "r.html"
    if case == "out is a folder":
        out.mkdir()
        want = "is a folder"
    elif case == "pages folder is a file":
        (tmp_path / "r_files").write_text("mine")
        want = "which is a file"
    else:
        (tmp_path / "r_files").mkdir()
        (tmp_path / "r_files" / "notes.txt").write_text("mine")
        want = "other than a dxray report"
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run_dir), "-o", str(out)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and want in line, line
    assert _snapshot(tmp_path) == before  # nothing of the user's is touched


def test_thumbnails_jpeg_and_unreadable(run_dir, tmp_path):
    """JPEG where asked (Pillow without WebP), and a corrupt or hostile stored thumbnail shows as unreadable."""
    from dxray.errors import DxrayError
    from dxray.report import build_report
    from dxray.report.thumbs import small

    build_report(str(run_dir), tmp_path / "r.html", image_format="jpeg")
    srcs = [im["src"] for im in _parse(tmp_path / "r_files" / "class-0.html").images]
    assert srcs and all(s.startswith("data:image/jpeg;base64,/9j/") for s in srcs)
    with pytest.raises(DxrayError, match="image format 'gif'"):
        build_report(str(run_dir), tmp_path / "r.html", image_format="gif")

    def png(width: int, height: int) -> bytes:  # a PNG header that declares the size, with no pixels
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))

    for bad in (b"", b"not an image", png(100_000, 100_000), png(64, 64)):
        assert small(bad, "webp") is None
    buf = io.BytesIO()
    Image.new("RGBA", (300, 150), (255, 0, 0, 128)).save(buf, format="PNG")
    uri, w, h = small(buf.getvalue(), "webp")
    assert (w, h) == (96, 48) and uri.startswith("data:image/webp;base64,")


def _synthetic():
    spec = importlib.util.spec_from_file_location("_synthetic_run", ROOT / "benchmarks" / "_synthetic_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_run_reads_like_a_finished_run(tmp_path):
    """benchmarks/_synthetic_run.py writes, through the real sink, tables the readers take as a finished run."""
    from dxray.report import build_report
    from dxray.runs import open_run
    from dxray.storage.sink import RunSink

    syn = _synthetic()
    counts = syn.write_run(RunSink(str(tmp_path), "run-syn"), classes=3, features=2, samples=2, thumb_px=64)
    assert counts == {"tasks": 9, "samples": 18, "verdicts": 6, "classes": 3, "feature_ranking": 6, "agreement": 0}
    sink = open_run(str(tmp_path / "run-syn"))
    assert len(sink.committed_task_ids()) == 9 and sink.read_manifest()["rows"]["samples"] == 18
    thumb = sink.read_table("samples", columns=["thumbnail"]).column("thumbnail")[0].as_py()
    assert Image.open(io.BytesIO(thumb)).size == (64, 64)
    again = RunSink(str(tmp_path), "run-again")
    syn.write_run(again, classes=3, features=2, samples=2, thumb_px=64)
    same = ["run_id", "image_uri"]
    assert sink.read_table("samples").drop(same).equals(again.read_table("samples").drop(same))
    build_report(str(tmp_path / "run-syn"), tmp_path / "r.html")
    assert len(_parse(tmp_path / "r.html").rows) == 3


def test_low_confidence_verdicts_are_shown_as_such(tmp_path):
    """Issue 19: a hand-made run whose verdicts are sure, unsure (resamples split at delta) and from one image."""
    from dxray.report import build_report
    from dxray.runs import redecide
    from dxray.storage.sink import RunSink

    sink = RunSink(str(tmp_path), "run-unsure")
    r = {(1, 10): [0.2, 0.4] * 4, (1, 11): [0.8, 0.9, 0.85, 0.7], (1, 12): [0.6], (2, 20): [0.0, 0.05, 0.1]}
    sink.write_table("tasks", [{"run_id": "run-unsure", "task_id": f"t{c}-{f}", "kind": "feature", "class_index": c,
                                "class_name": f"c{c}", "feature_index": f, "feature_rank": f % 10 + 1,
                                "template": "{}", "status": "ok"} for c, f in r], part="all")
    sink.write_table("samples", [{"run_id": "run-unsure", "task_id": f"t{c}-{f}", "seed": i, "object_fraction": v}
                                 for (c, f), vs in r.items() for i, v in enumerate(vs)], part="all")
    sink.write_manifest({"run_id": "run-unsure"})
    verdicts, _ = redecide(str(tmp_path / "run-unsure"), 0.3)
    unsure = {(v["class_index"], v["feature_index"]) for v in verdicts if v["low_confidence"]}
    assert unsure == {(1, 10), (1, 12)}  # split at delta; one image
    build_report(str(tmp_path / "run-unsure"), tmp_path / "r.html")
    pages = [_parse(tmp_path / "r_files" / f"class-{c}.html") for c in (1, 2)]
    badges = {(c, f): conf for pg in pages for c, f, _, conf in pg.unsure}
    assert set(badges) == unsure
    assert float(badges[(1, 10)]) == pytest.approx(next(v["confidence"] for v in verdicts if v["feature_index"] == 10),
                                                   abs=1e-3) and badges[(1, 12)] == ""
    text = " ".join(" ".join("".join(pg.text).split()) for pg in pages)
    assert "95% interval" in text and "2 low confidence" in text
    assert _parse(tmp_path / "r.html").cells == [(1, "2"), (2, "0")]  # the index's "unsure" column


def test_report_of_a_run_on_s3(s3, tmp_path):
    """A run on a real S3 server: the report reads it there and links full-size images by s3:// URI."""
    from dxray.report import build_report
    from dxray.storage.sink import RunSink

    base = f"s3://{s3.bucket}/report-{time.time_ns()}"
    _synthetic().write_run(RunSink(base, "run-s3"), classes=2, features=1, samples=2, thumb_px=32)
    build_report(f"{base}/run-s3", tmp_path / "r.html")
    page = _parse(tmp_path / "r_files" / "class-1.html")
    assert len(page.images) == 4 and all(im["src"].startswith("data:image/webp") for im in page.images)
    full = [h for h in page.links if h.endswith(".png")]
    assert len(full) == 4 and all(h.startswith(f"{base}/run-s3/images/") for h in full)


# --- a real headless Chromium ------------------------------------------------------------------------

CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--window-size=1280,1400"]


@pytest.fixture
def browser(tmp_path):
    """Debian's chromium + chromium-driver driven by Selenium. Missing ones FAIL the test: `make test`
    installs them (apt-get install chromium chromium-driver)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_bin = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver_bin) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"headless Chromium not installed ({', '.join(missing)} missing): run `make browser` or "
                    "`apt-get install -y --no-install-recommends chromium chromium-driver`", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `make install` (it is in the dev extra)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in [*CHROME_ARGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_bin))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, script: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _row_order(driver) -> list[tuple[int, str]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#summary-table tbody tr'))"
        ".map(r => [Number(r.dataset.class), r.cells[1].textContent.trim()]);")


def _all_images_render(browser) -> int:
    n = browser.execute_script("return document.images.length")
    for i in range(n):
        browser.execute_script("document.images[arguments[0]].scrollIntoView({block: 'center'})", i)
    assert _wait(browser, "return Array.from(document.images).every(i => i.complete)")
    decoded = browser.execute_script(
        "return Array.from(document.images).map(i => [i.src.slice(0, 15), i.naturalWidth])")
    assert len(decoded) == n and all(src == "data:image/webp" and w > 0 for src, w in decoded), decoded
    return n


def test_report_in_headless_chromium(report, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(report.resolve().as_uri())
    assert _wait(browser, "return document.readyState === 'complete'")
    assert browser.title.startswith("dxray report")
    # The hashed style applied (the policy let it through): the page is laid out by it.
    assert browser.execute_script("return getComputedStyle(document.body).maxWidth") == "1400px"

    # The hostile name is text, not markup: no alert opened, and the DOM shows it verbatim.
    names = browser.execute_script(
        "return Array.from(document.querySelectorAll('#summary-table tbody td:nth-child(2)')).map(c => c.textContent)")
    assert EVIL in names

    # A screenshot of the top of the index: a real, non-blank rendering.
    png = browser.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] >= 800 and image.size[1] >= 600
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 20, "blank screenshot"

    # Sorting (the hashed script runs): clicking a header re-sorts the rows (index ascending → descending; by name).
    before = _row_order(browser)
    assert [c for c, _ in before] == sorted(c for c, _ in before)
    header = browser.find_elements(By.CSS_SELECTOR, "#summary-table thead th")
    header[0].click()
    after = _row_order(browser)
    assert [c for c, _ in after] == sorted((c for c, _ in before), reverse=True) and after != before
    assert header[0].get_attribute("aria-sort") == "descending"
    header[1].click()
    by_name = _row_order(browser)
    assert [name.lower() for _, name in by_name] == sorted(name.lower() for _, name in before)
    header[1].click()
    assert [name for _, name in _row_order(browser)] == [name for _, name in by_name][::-1]

    # A class's link leads to its page; every thumbnail there is a WebP the installed Chromium decodes.
    browser.find_element(By.CSS_SELECTOR, "#summary-table a[href='report_files/class-1.html']").click()
    assert _wait(browser, "return location.pathname.endsWith('/report_files/class-1.html') "
                          "&& document.readyState === 'complete'")
    assert browser.execute_script("return document.querySelector('section.class').dataset.class") == "1"
    assert _all_images_render(browser) == 2 * 3 * len(TEMPLATES)  # its failed task has no images
    png = browser.get_screenshot_as_png()
    colours = Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "blank class page"

    # Back to the index row of the class; then the neurons page, through the index's neuron summary.
    browser.find_element(By.CSS_SELECTOR, "nav.pages a[href='../report.html#row-1']").click()
    assert _wait(browser, "return location.hash === '#row-1' && !!document.getElementById('summary-table')")
    browser.find_element(By.CSS_SELECTOR, "table.neuron-summary a").click()
    assert _wait(browser, "return location.pathname.endsWith('/neurons.html') && document.readyState === 'complete'")
    assert _all_images_render(browser) == 2 * len(TEMPLATES)

    # No console errors (CSP violations, script errors, failed loads) in the whole session.
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_a_class_whose_segmenter_control_failed_is_flagged(tmp_path):
    """Issue 19: class 1's control images hold no object (r 0): its page and index row say "unreliable"; class 2's
    control passes. Each class page shows its control task, and a control adds no template row to the index. Class 2
    looks for two detection prompts: its page lists both with their control r and marks the one that won."""
    from dxray.report import build_report
    from dxray.runs import redecide
    from dxray.storage.sink import RunSink

    run = "run-control"
    sink = RunSink(str(tmp_path), run)
    r = {(1, "feature"): [0.5, 0.6], (1, "control"): [0.0, 0.0], (2, "feature"): [0.1, 0.0], (2, "control"): [0.7, 0.5]}
    sink.write_table("tasks", [{"run_id": run, "task_id": f"t{c}-{k}", "kind": k, "class_index": c, "class_name": f"c{c}",
                                "feature_index": 10 * c if k == "feature" else None,
                                "feature_rank": 1 if k == "feature" else None,
                                "template": "{}" if k == "feature" else "a photo of a {}", "status": "ok"}
                               for c, k in r], part="all")
    sink.write_table("samples", [{"run_id": run, "task_id": f"t{c}-{k}", "seed": i, "object_fraction": v,
                                  **({"candidate_prompts": ["c2", "thing"], "candidate_object_fractions": [v / 2, v]}
                                     if c == 2 else {})}
                                 for (c, k), vs in r.items() for i, v in enumerate(vs)], part="all")
    sink.write_manifest({"run_id": run})
    redecide(str(tmp_path / run), 0.3)
    build_report(str(tmp_path / run), tmp_path / "r.html")
    index = _parse(tmp_path / "r.html")
    assert index.rows == [1, 2]
    assert ">template<" not in (tmp_path / "r.html").read_text(encoding="utf-8")  # one template: the control's is not one
    pages = {c: (tmp_path / "r_files" / f"class-{c}.html").read_text(encoding="utf-8") for c in (1, 2)}
    parsed = {c: _parse(tmp_path / "r_files" / f"class-{c}.html") for c in (1, 2)}
    for c in (1, 2):
        kinds = [t["data-kind"] for t in parsed[c].tasks]
        assert kinds == ["feature", "control"] and f'id="control-{c}"' in pages[c]
    badge = [dict(attrs) for tag, attrs in parsed[1].tags if tag == "span" and "unreliable" in (dict(attrs).get("class") or "")]
    assert len(badge) == 1 and float(badge[0]["data-control"]) == 0.0
    assert not any("unreliable" in (dict(attrs).get("class") or "") for tag, attrs in parsed[2].tags)
    in_index = [dict(attrs) for tag, attrs in index.tags if tag == "span" and "unreliable" in (dict(attrs).get("class") or "")]
    assert len(in_index) == 1 and "0.000" in in_index[0]["title"]
    prompts = {c: [dict(attrs) for tag, attrs in parsed[c].tags if tag == "span"
                   and "detection-prompt" in (dict(attrs).get("class") or "")] for c in (1, 2)}
    assert prompts[1] == []  # one prompt: nothing to choose
    assert [p["class"] for p in prompts[2]] == ["detection-prompt", "detection-prompt chosen"]
    assert [float(p["data-r"]) for p in prompts[2]] == [0.3, 0.6]  # the control's mean r per candidate
    assert "thing (0.600) ✓" in pages[2]


def test_a_class_explanation_the_classifier_does_not_read_as_the_class_is_not_called_biased(tmp_path):
    """Issue 31: both classes' explanations lack the object (r 0), but the classifier reads class 2's as class 2 with
    mean probability 0.3 only: class 1 is "biased?", class 2 "not explained" (no evidence either way), on its page
    and in the index."""
    from dxray.report import build_report
    from dxray.runs import redecide
    from dxray.storage.sink import RunSink

    run = "run-explained"
    sink = RunSink(str(tmp_path), run)
    probs = {1: [0.9, 0.8], 2: [0.2, 0.4]}
    sink.write_table("tasks", [{"run_id": run, "task_id": f"t{c}", "kind": "class", "class_index": c,
                                "class_name": f"c{c}", "template": "{}", "status": "ok"} for c in probs], part="all")
    sink.write_table("samples", [{"run_id": run, "task_id": f"t{c}", "seed": i, "object_fraction": 0.0, "class_prob": p}
                                 for c, ps in probs.items() for i, p in enumerate(ps)], part="all")
    sink.write_manifest({"run_id": run})
    _, classes = redecide(str(tmp_path / run), 0.3)
    assert [(c["class_index"], c["explained"]) for c in classes] == [(1, True), (2, False)]
    build_report(str(tmp_path / run), tmp_path / "r.html")

    def badges(page):
        return [(dict(a)["class"].split()[-1], dict(a).get("title", "")) for t, a in page.tags
                if t == "span" and (dict(a).get("class") or "").startswith("badge")]

    index = badges(_parse(tmp_path / "r.html"))
    assert [b for b, _ in index] == ["biased", "unexplained"]
    assert "0.30 &lt; 0.5" in index[1][1] or "0.30 < 0.5" in index[1][1]
    for c, want in ((1, ["biased"]), (2, ["unexplained"])):
        assert [b for b, _ in badges(_parse(tmp_path / "r_files" / f"class-{c}.html"))] == want


def test_a_feature_whose_images_do_not_reach_the_plain_pictures_shows_not_explained(tmp_path):
    """Issue 31: both features' images lack the object (r 0), but only feature 4's drive it past the class's plain
    pictures (the segmenter control's activations): feature 4 is spurious, feature 7 "not explained", with both
    activations in its title, and the class counts 1 spurious, 1 not explained."""
    from dxray.report import build_report
    from dxray.runs import redecide
    from dxray.storage.sink import RunSink

    run = "run-feature-explained"
    sink = RunSink(str(tmp_path), run)
    base = {"run_id": run, "class_index": 1, "class_name": "c1", "template": "{}", "status": "ok"}
    plain = [0.0] * 8
    plain[4], plain[7] = 1.0, 3.0
    sink.write_table("tasks", [base | {"task_id": "k", "kind": "control", "control_activations": plain},
                               base | {"task_id": "f4", "kind": "feature", "feature_index": 4, "feature_rank": 1},
                               base | {"task_id": "f7", "kind": "feature", "feature_index": 7, "feature_rank": 2}],
                     part="all")
    acts = {"k": [None, None], "f4": [2.0, 2.5], "f7": [1.0, 1.25]}
    sink.write_table("samples", [{"run_id": run, "task_id": t, "seed": i, "object_fraction": 0.0 if t != "k" else 0.8,
                                  "feature_activation": a} for t, values in acts.items() for i, a in enumerate(values)],
                     part="all")
    sink.write_manifest({"run_id": run})
    verdicts, classes = redecide(str(tmp_path / run), 0.3)
    assert [(v["feature_index"], v["verdict"], v["explained"]) for v in verdicts] == [(4, "spurious", True),
                                                                                       (7, "not explained", False)]
    assert (classes[0]["n_spurious"], classes[0]["n_not_explained"]) == (1, 1)
    build_report(str(tmp_path / run), tmp_path / "r.html")
    page = _parse(tmp_path / "r_files" / "class-1.html")
    assert [(f, v) for _, f, _, v in page.badges] == [(4, "spurious"), (7, "not explained")]
    spans = [dict(a) for t, a in page.tags if t == "span" and "verdict" in (dict(a).get("class") or "").split()]
    assert [a["class"].split()[1] for a in spans] == ["spurious", "unexplained"]
    assert "1.12" in spans[1]["title"] and "3" in spans[1]["title"]
    assert "1 of 2 features spurious, 1 not explained" in "".join(page.text)
