"""`dxray report`: the HTML report of a real tiny run, parsed and rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import TINY_YAML
from PIL import Image

EVIL = "<script>alert(1)</script> & co"
TEMPLATES = ["{}", "a photo of {}"]
FAILED_ERROR = "RuntimeError: CUDA out of memory <b>& more</b>"
PROMPT = "a <i>sled</i> & snow"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    """A real tiny run (2 classes, 2 templates, top-2 features), then: one failed feature task and one
    learned prompt added to its tasks table, and re-decided with a delta between the observed r values
    so both verdicts (and the biased? hint) can appear."""
    from dxray.config import load_config
    from dxray.pipeline.local import run
    from dxray.runs import open_run, redecide

    out = tmp_path_factory.mktemp("report") / "out"
    cfg = load_config(TINY_YAML, [
        f"output={out}", f"cache_dir={cache_dir}", "optimize.steps=2", "sample.k=2", "device=cpu",
        "targets.top_k=2", f"classifier.class_names={[EVIL, 'tabby cat']!r}".replace("'", '"'),
        f"prompt.templates={TEMPLATES!r}".replace("'", '"'),
    ])
    assert cfg.classifier.class_names[0] == EVIL
    summary = run(cfg)
    assert summary.failed == 0
    root = Path(summary.root)

    sink = open_run(str(root))
    tasks = sink.read_table("tasks").to_pylist()
    feature = next(t for t in tasks if t["kind"] == "feature" and t["class_index"] == 1 and t["template"] == "{}")
    feature["hard_prompt_text"] = PROMPT
    tasks.append({**feature, "task_id": "f" * 16, "feature_index": 999, "feature_rank": 3, "status": "error",
                  "error": FAILED_ERROR, "final_loss": None, "loss_curve": None, "prompt_embedding": None,
                  "hard_prompt_text": None, "target_prob": None})
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
    return path


class _Page(HTMLParser):
    """What the tests look at: summary rows, class sections, task blocks, images, verdict badges."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self.sections, self.tasks, self.images, self.badges = [], [], [], [], []
        self.scripts, self.text = 0, []
        self.links, self.external = [], []
        self._section = self._group = self._task = None
        self._in_error = False
        self.errors = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "script":
            self.scripts += 1
            if "src" in a:
                self.external.append(a["src"])
        if tag == "link":
            self.external.append(a.get("href"))
        if tag == "tr" and "data-class" in a:
            self.rows.append(int(a["data-class"]))
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

    def handle_data(self, data):
        self.text.append(data)
        if self._in_error:
            self.errors.append((self._task.get("data-feature"), data))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_report_html_structure(run_dir, report):
    from dxray.runs import open_run

    sink = open_run(str(run_dir))
    classes = sink.read_table("classes").to_pylist()
    samples = sink.read_table("samples").to_pylist()
    verdicts = sink.read_table("verdicts").to_pylist()
    page = _parse(report)

    # A summary row per (class, template) row of the classes table, a section per class, anchors that resolve.
    assert sorted(page.rows) == sorted(c["class_index"] for c in classes)
    assert len(classes) == 2 * len(TEMPLATES)
    assert [s[0] for s in page.sections] == [0, 1]
    ids = {s[1] for s in page.sections} | {f"class-{c}-t{j}" for c in (0, 1) for j in range(len(TEMPLATES))}
    assert {href[1:] for href in page.links if href.startswith("#class-")} <= ids

    # One <img> per sample, each a decodable inline PNG thumbnail linked (relatively) to its full-size image.
    assert len(page.images) == len(samples) > 0
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert img["loading"] == "lazy"
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    full = [h for h in page.links if h and h.endswith(".png")]
    assert len(full) == len(samples)
    assert all(not h.startswith(("/", "file:")) and (report.parent / h).is_file() for h in full)
    assert not page.external  # self-contained: no external scripts or stylesheets

    # Per task: its images; failed tasks with their (escaped) error; the learned prompt when present.
    ok_tasks = [t for t in page.tasks if t["data-status"] == "ok"]
    assert len(ok_tasks) == 2 * 3 * len(TEMPLATES)  # (class task + top-2 features) x templates x 2 classes
    assert sum(t["images"] for t in ok_tasks) == len(samples)
    assert all(t["images"] == 2 for t in ok_tasks)  # sample.k = 2
    failed = [t for t in page.tasks if t["data-status"] == "error"]
    assert [(t["class_index"], t["data-feature"], t["template"]) for t in failed] == [(1, "999", "{}")]
    assert ("999", FAILED_ERROR) in page.errors
    source = report.read_text(encoding="utf-8")
    assert html.escape(FAILED_ERROR, quote=False) in source and FAILED_ERROR not in source
    assert html.escape(PROMPT, quote=False) in source and PROMPT in "".join(page.text)

    # Verdict badges match the verdicts table, for every (class, feature, template).
    expected = {(v["class_index"], v["feature_index"], v["template"], v["verdict"]) for v in verdicts}
    assert set(page.badges) == expected and len(page.badges) == len(verdicts)
    assert {v["verdict"] for v in verdicts} == {"core", "spurious"}

    # The hostile class name appears, but only escaped: the one <script> is the report's own.
    assert page.scripts == 1
    assert "<script>alert(1)" not in source
    assert html.escape(EVIL, quote=False) in source
    text = "".join(page.text)
    assert text.count(EVIL) >= 1 + len(TEMPLATES)  # summary rows + section heading


def test_report_links_outside_run_are_uris(run_dir, tmp_path):
    from dxray.report import build_report

    page = _parse(build_report(str(run_dir), tmp_path / "elsewhere" / "r.html"))
    full = [h for h in page.links if h and h.endswith(".png")]
    assert full and all(h.startswith("file:///") for h in full)


def test_report_not_a_run(tmp_path):
    from dxray.errors import DxrayError
    from dxray.report import build_report

    for bad in (tmp_path, tmp_path / "missing"):
        with pytest.raises(DxrayError, match="no run found") as e:
            build_report(str(bad), tmp_path / "r.html")
        assert "\n" not in str(e.value)


def test_report_cli(run_dir, tmp_path):
    from typer.testing import CliRunner

    from dxray.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["report", str(run_dir), "-o", str(tmp_path / "cli.html")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "cli.html") and (tmp_path / "cli.html").is_file()
    result = runner.invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "no run found" in result.output
    help_text = runner.invoke(app, ["report", "--help"]).output
    assert "Example" in help_text and "dxray report" in help_text


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


def test_report_in_headless_chromium(report, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(report.resolve().as_uri())
    assert _wait(browser, "return document.readyState === 'complete'")
    assert browser.title.startswith("dxray report")

    # Every thumbnail renders (lazy images load once scrolled into view).
    n = browser.execute_script("return document.images.length")
    assert n > 0
    for i in range(n):
        browser.execute_script("document.images[arguments[0]].scrollIntoView({block: 'center'})", i)
    assert _wait(browser, "return Array.from(document.images).every(i => i.complete)")
    widths = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(widths) == n and all(w > 0 for w in widths), widths

    # The hostile name is text, not markup: no alert opened, and the DOM shows it verbatim.
    names = browser.execute_script(
        "return Array.from(document.querySelectorAll('#summary-table tbody td:nth-child(2)')).map(c => c.textContent)")
    assert EVIL in names

    # A screenshot of the top of the page: a real, non-blank rendering.
    browser.execute_script("window.scrollTo(0, 0)")
    png = browser.get_screenshot_as_png()
    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] >= 800 and image.size[1] >= 600
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "blank screenshot"

    # Sorting: clicking a header re-sorts the rows (index ascending → descending; then by name).
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

    # An anchor from the summary leads to the class's section.
    browser.find_element(By.CSS_SELECTOR, "#summary-table a[href='#class-1']").click()
    assert browser.execute_script("return location.hash") == "#class-1"

    # No console errors (CSP violations, script errors, failed loads) in the whole session.
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
