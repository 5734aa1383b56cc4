"""The offline GPU check (`make gpu-wheels`, then `make gpu-check`) as far as it goes on a CPU machine:
wheels for this python from PyPI into a folder, then the check with every index unreachable, this
python as the air-gapped node's, in its CPU mode (install, imports, the GPU tests collected,
optimize_step.py --preset tiny)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}
NO_PYPI = re.compile(r"NewConnectionError|Failed to establish|name resolution|Network is unreachable|"
                     r"ConnectTimeout|Max retries exceeded")
REQUIREMENTS = [line.split("==")[0] for line in (ROOT / "gpu" / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]


def make(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def check_args(wheels: Path, tmp: Path, **more: str) -> list[str]:
    args = {"GPU_PYTHON": sys.executable, "GPU_WHEELS": wheels, "GPU_SITE": tmp / "site",
            "GPU_RESULTS": tmp / "results", "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_INSTALL": "all", **more}
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpu-wheels")
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    r = make("gpu-wheels", f"GPU_PY={py}", f"GPU_WHEELS={folder}", f"PYTHON={sys.executable}")
    if r.returncode != 0 and NO_PYPI.search(r.stdout + r.stderr):
        pytest.skip("make gpu-wheels could not reach PyPI")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"gpu-wheels: {len(REQUIREMENTS)} wheels, [\d.]+ MB", r.stdout), r.stdout
    return folder


@pytest.mark.timeout(300)
def test_check_installs_from_the_wheel_folder_offline_and_runs_its_cpu_mode(wheels, tmp_path):
    r = make("gpu-check", *check_args(wheels, tmp_path, GPU_COMPILE_BUDGET_S="5",
                                      GPU_BENCH_ARGS="--levers tasks_per_batch,torch_compile --compile-on-cpu"),
             env=OFFLINE)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Traceback" not in r.stdout
    installed = {re.sub(r"[-_.]+", "-", p.name.split("-")[0]).lower() for p in (tmp_path / "site").glob("*.dist-info")}
    assert installed == {re.sub(r"[-_.]+", "-", n).lower() for n in REQUIREMENTS}
    results = tmp_path / "results"
    doc = json.loads((results / "optimize_step-gpu-check-cpu.json").read_text())
    t = doc["throughput"]
    assert all(math.isfinite(t[k]) and t[k] > 0 for k in ("value", "baseline", "ratio"))
    assert math.isfinite(doc["levers"]["tasks_per_batch"]["value"])
    # the compile budget: the child process compiling the UNet is stopped at 5 s, the run goes on
    compiled = doc["levers"]["torch_compile"]
    assert compiled["status"] == "over budget" and 5 <= compiled["seconds"] < 60, compiled
    assert re.search(r"\d+ tests? collected", (results / "gpu-check-pytest.txt").read_text())
    summary = (results / "gpu-check.txt").read_text().splitlines()
    assert summary[-1] == r.stdout.strip().splitlines()[-1]
    assert summary[-1].startswith("gpu-check: OK in ") and "torch_compile over budget" in summary[-1]


def one_line(r: subprocess.CompletedProcess) -> str:
    """The check's own output on a failure: one line (make adds its `make: ***` line)."""
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip() and not x.startswith("make")]
    assert r.returncode != 0 and len(lines) == 1, r.stdout + r.stderr
    return lines[0]


def test_a_missing_wheel_is_one_line_naming_it(wheels, tmp_path):
    partial = tmp_path / "wheels"
    shutil.copytree(wheels, partial, ignore=shutil.ignore_patterns("diffusers-*"))
    line = one_line(make("gpu-check", *check_args(partial, tmp_path), env=OFFLINE))
    assert line.startswith("gpu-check: wheel folder ") and "lacks diffusers" in line and "make gpu-wheels" in line
    assert not (tmp_path / "site").exists()  # stopped before installing anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_no_cuda_is_one_line(wheels, tmp_path):
    line = one_line(make("gpu-check", *check_args(wheels, tmp_path, GPU_CHECK_DEVICE="cuda"), env=OFFLINE))
    assert line.startswith("gpu-check: no CUDA device visible")
