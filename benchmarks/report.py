"""The report of a full-ImageNet run, measured against today's single page on the same run.

    python benchmarks/report.py                      # 1000 classes x (1 + 5 tasks) x 10 images, 96-px thumbnails
    python benchmarks/report.py --classes 50         # a quick look

1. A synthetic finished run (``benchmarks/_synthetic_run.py``: tasks, samples with distinct PNG
   thumbnails, verdicts, classes, ranking, manifest) is written through the real ``RunSink``.
2. Its report is built with the current code (WebP thumbnails, and again with JPEG ones): the index's
   size, the largest file, the total of every file.
3. The baseline: the single self-contained page of ``dxray/report/`` as it was at ``--baseline`` (the
   commit before issue 18), loaded from ``git show`` into a temporary module, built from the same run
   in the same process. The total-size figure is the ratio of the two.
4. Headless Chromium (Debian's chromium + chromedriver, through Selenium) opens the index and the largest
   class page ``--loads`` times each: DOMContentLoaded and load, from the Navigation Timing entry; the
   first load and the median. ``--baseline-in-browser`` also opens the baseline page once (it is
   ~1 GB at full size: minutes and many GB of memory).

Targets (issue 18): index DOMContentLoaded <= 2 s, no file over 20 MB, total <= 10% of the baseline page.
Writes ``benchmarks/results/report.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BASELINE = "136e753"  # the last commit before issue 18: dxray report wrote one self-contained page
sys.path.insert(0, str(HERE))

from _synthetic_run import write_run  # noqa: E402


def _baseline_module(commit: str, folder: Path):
    """dxray/report/{html,template}.py at ``commit``, as one importable module (its own template)."""
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], check=True,
                              capture_output=True, text=True).stdout

    (folder / "baseline_report_template.py").write_text(show("dxray/report/template.py"))
    source = show("dxray/report/html.py").replace("from dxray.report.template import",
                                                  "from baseline_report_template import")
    (folder / "baseline_report_html.py").write_text(source)
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("baseline_report_html", folder / "baseline_report_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def _files(index: Path, pages: Path) -> list[Path]:
    return [index, *(p for p in sorted(pages.rglob("*")) if p.is_file())]


def _sizes(index: Path, pages: Path) -> dict:
    files = _files(index, pages)
    largest = max(files, key=lambda p: p.stat().st_size)
    return {"files": len(files), "index_bytes": index.stat().st_size, "largest_file": largest.name,
            "largest_bytes": largest.stat().st_size, "total_bytes": sum(p.stat().st_size for p in files)}


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1400", f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    driver.set_page_load_timeout(900)
    return driver


def _timing(driver, path: Path, loads: int) -> dict:
    """Navigation Timing of ``loads`` fresh navigations to ``path`` (ms from navigation start)."""
    dcl, load = [], []
    for _ in range(loads):
        driver.get("about:blank")
        driver.get(path.resolve().as_uri())
        t = driver.execute_script("const n = performance.getEntriesByType('navigation')[0];"
                                  "return [n.domContentLoadedEventEnd, n.loadEventEnd];")
        dcl.append(round(t[0], 1))
        load.append(round(t[1], 1))
    return {"page": path.name, "bytes": path.stat().st_size, "loads": loads, "dcl_ms": dcl, "load_ms": load,
            "dcl_first_ms": dcl[0], "dcl_median_ms": statistics.median(dcl), "dcl_max_ms": max(dcl),
            "load_median_ms": statistics.median(load)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--features", type=int, default=5)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--thumb-px", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks-per-part", type=int, default=6, help="tasks per Parquet part of the synthetic run")
    ap.add_argument("--baseline", default=BASELINE, help="commit whose dxray/report/ is the baseline")
    ap.add_argument("--loads", type=int, default=5, help="browser loads per page")
    ap.add_argument("--baseline-in-browser", action="store_true", help="also open the baseline page in Chromium")
    ap.add_argument("--work", type=Path, help="folder for the run and the reports (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep --work's contents")
    ap.add_argument("--out", type=Path, default=RESULTS / "report.json")
    args = ap.parse_args()

    import pyarrow.compute as pc

    from dxray.report import build_report
    from dxray.report.thumbs import QUALITY, WIDTH
    from dxray.storage.sink import RunSink

    work = args.work or Path(tempfile.mkdtemp(prefix="dxray-report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sink = RunSink(str(work / "out"), "run-synthetic")
        rows, write_s = _timed(lambda: write_run(sink, classes=args.classes, features=args.features,
                                                 samples=args.samples, thumb_px=args.thumb_px, seed=args.seed,
                                                 tasks_per_part=args.tasks_per_part))
        thumbs = sink.read_table("samples", columns=["thumbnail"]).column("thumbnail")
        png_mean = pc.sum(pc.binary_length(thumbs)).as_py() / len(thumbs)
        del thumbs
        print(f"synthetic run: {rows} in {write_s:.0f} s; mean PNG thumbnail {png_mean:.0f} B", flush=True)
        run = sink.uri("")

        reports = {}
        for fmt in ("webp", "jpeg"):
            index = work / fmt / "report.html"
            _, build_s = _timed(lambda: build_report(run, index, image_format=fmt))  # noqa: B023
            reports[fmt] = {"format": fmt, "quality": QUALITY, "width_px": WIDTH, "build_s": round(build_s, 1),
                            **_sizes(index, index.with_name("report_files"))}
            print(f"report ({fmt}): {reports[fmt]}", flush=True)

        baseline = _baseline_module(args.baseline, work)
        single = work / "baseline" / "report.html"
        _, base_s = _timed(lambda: baseline.build_report(run, single))
        base = {"commit": args.baseline, "build_s": round(base_s, 1), "bytes": single.stat().st_size}
        print(f"baseline single page ({args.baseline}): {base}", flush=True)

        webp_index = work / "webp" / "report.html"
        pages = webp_index.with_name("report_files")
        largest_class = max(pages.glob("class-*.html"), key=lambda p: p.stat().st_size)
        driver = _browser(work / "chrome-profile")
        try:
            version = driver.capabilities.get("browserVersion")
            browser = {"chromium": version, "index": _timing(driver, webp_index, args.loads),
                       "largest_class_page": _timing(driver, largest_class, args.loads),
                       "jpeg_index": _timing(driver, work / "jpeg" / "report.html", 1)}
            driver.get(largest_class.resolve().as_uri())  # every thumbnail a WebP this Chromium decodes
            decoded = driver.execute_script("return Array.from(document.images).map(i => "
                                            "i.src.startsWith('data:image/webp;') && i.decode().then ? 1 : 0)")
            widths = driver.execute_async_script(
                "const done = arguments[0]; Promise.all(Array.from(document.images).map(i => i.decode()"
                ".then(() => i.naturalWidth, () => 0))).then(done);")
            browser["largest_class_page"]["webp_decoded"] = f"{sum(w > 0 for w in widths)}/{len(decoded)}"
            assert sum(decoded) == len(widths) and all(w > 0 for w in widths), "Chromium did not decode every WebP"
            if args.baseline_in_browser:
                try:
                    base["browser"] = _timing(driver, single, 1)
                except Exception as e:  # a page this size may time out or crash the renderer: record it
                    base["browser"] = {"error": " ".join(str(e).split())[:300]}
        finally:
            driver.quit()
        print(f"chromium: {browser}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    new = reports["webp"]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "run": {"classes": args.classes, "features": args.features, "samples": args.samples,
                "thumb_px": args.thumb_px, "rows": rows, "write_s": round(write_s, 1),
                "png_thumbnail_mean_bytes": round(png_mean)},
        "report": reports, "baseline": base, "browser": browser,
        "ratios": {"total_vs_baseline": round(new["total_bytes"] / base["bytes"], 4),
                   "jpeg_total_vs_baseline": round(reports["jpeg"]["total_bytes"] / base["bytes"], 4),
                   "webp_vs_jpeg_total": round(new["total_bytes"] / reports["jpeg"]["total_bytes"], 3)},
        "targets": {"index_dcl_le_2000_ms": browser["index"]["dcl_max_ms"] <= 2000,
                    "largest_file_le_20_MB": new["largest_bytes"] <= 20 * 2**20,
                    "total_le_10pct_of_baseline": new["total_bytes"] <= 0.10 * base["bytes"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"]), json.dumps(result["targets"]))


if __name__ == "__main__":
    main()
