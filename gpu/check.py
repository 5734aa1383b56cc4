"""make gpu-check: dxray's GPU tests and benchmark on a CUDA machine with no network.

Uses the machine's own python and PyTorch; installs nothing from an index. The packages the machine's
python lacks (of gpu/requirements.txt) come from a wheel folder that `make gpu-wheels` fills on a
networked machine; they are unpacked into a folder of their own (--site, put first on PYTHONPATH with
the repository: dxray itself is not installed). Then:

  1. pytest -m gpu tests/test_gpu.py             -> <results>/gpu-check-pytest.txt
  2. benchmarks/optimize_step.py, every lever    -> <results>/optimize_step-gpu.json (+ -bench.log)
  3. one summary line, also in                   -> <results>/gpu-check.txt

Every problem found before the work (no CUDA, a wheel missing, no pip, an import failing) stops it
with one line. --device cpu runs the same path on a CPU machine (the install, the imports, pytest
collecting the GPU tests, optimize_step.py --preset tiny): the offline path's own test uses it.
Standard library only: it runs under the machine's python before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY_MIN = (3, 11)
# The check imports, before the expensive work, every module these files import (at the top or
# inside a function), and these: none may need ray or boto3 (the machine has neither).
IMPORTED_BY = ["tests/test_gpu.py", "benchmarks/optimize_step.py", "benchmarks/_models.py"]
IMPORTS = ["diffusers", "pydantic", "pytest", "pytest_timeout"]
BENCH_ARGS = {
    "cuda": ["--preset", "sd15", "--device", "cuda"],  # as `make bench-gpu`, all levers
    "cpu": ["--preset", "tiny", "--device", "cpu", "--tasks", "2", "--samples", "1", "--rounds", "1", "--warmup", "0",
            "--objective-steps", "2", "--no-h100-projection"],  # the plumbing, not a measurement
}


class CheckError(Exception):
    """One line for the user; the check stops."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> list[tuple[str, str]]:
    """(name, version) of each `name==version` line."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
            if not m:
                raise CheckError(f"{path}: expected name==version, got {line!r}")
            out.append((m[1], m[2]))
    return out


def machine_has(name: str, site: Path) -> str | None:
    """The machine's own version of distribution ``name`` (outside ``site``), or None."""
    from importlib.metadata import distributions

    paths = [p for p in sys.path if p and Path(p).resolve() != site.resolve()]
    return next((d.version for d in distributions(name=name, path=paths)), None)


def wheel_fits(wheel: Path) -> bool | None:
    """Whether the wheel's tags fit this python (None: `packaging` absent, not checked)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return None
    tags = set(parse_wheel_filename(wheel.name)[3])
    return any(t in tags for t in sys_tags())


def pick_wheels(reqs, wheels: Path, site: Path, install_all: bool) -> tuple[list[Path], list[str]]:
    """The wheels to install and a line per requirement saying where it comes from."""
    if not wheels.is_dir():
        raise CheckError(f"no wheel folder {wheels}; run `make gpu-wheels` on a networked machine")
    by_name: dict[str, list[Path]] = {}
    for w in wheels.glob("*.whl"):
        by_name.setdefault(norm(w.name.split("-")[0]), []).append(w)
    chosen, notes = [], []
    for name, version in reqs:
        have = None if install_all else machine_has(name, site)
        if have is not None:
            notes.append(f"{name}: the machine's {have}")
            continue
        match = [w for w in by_name.get(norm(name), []) if w.name.split("-")[1] == version]
        if not match:
            raise CheckError(f"wheel folder {wheels} lacks {name} (=={version}); run `make gpu-wheels` "
                             "on a networked machine")
        fits = [w for w in match if wheel_fits(w) is not False]
        if not fits:
            py = f"{sys.version_info[0]}.{sys.version_info[1]}"
            raise CheckError(f"{match[0]} does not fit this python ({py}, {sys.platform}); run "
                             f"`make gpu-wheels GPU_PY={py}` on a networked machine")
        chosen.append(fits[0])
        notes.append(f"{name}: wheel {fits[0].name}")
    return chosen, notes


def probe_torch(python: str, device: str) -> str:
    """torch's version (and the GPU's name); one-line errors for no torch / torchvision / CUDA."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': c, 'gpu': torch.cuda.get_device_name(0) if c else None, 'built_cuda': torch.version.cuda}));"
            "import torchvision; print(json.dumps({'torchvision': torchvision.__version__}))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env=clean_env())
    if not r.stdout.strip():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckError(f"{python} cannot import torch ({last}); the check uses the machine's own PyTorch")
    info, *tv = (json.loads(x) for x in r.stdout.splitlines() if x.startswith("{"))
    if device == "cuda" and not info["cuda"]:
        why = "a CPU-only build" if not info["built_cuda"] else "torch.cuda.is_available() is False"
        raise CheckError(f"no CUDA device visible (torch {info['torch']}: {why}; CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if not tv:  # the benchmark's ResNet-50; a wheel of it would have to match the machine's torch build
        raise CheckError(f"{python} has torch {info['torch']} but no torchvision (the benchmark's classifier); "
                         "install the torchvision built for that torch")
    return (f"torch {info['torch']}, torchvision {tv[0]['torchvision']}"
            + (f" on {info['gpu']}" if info["gpu"] else ""))


def clean_env(*first: Path) -> dict:
    """The environment for the steps: no pip configuration or index; ``first`` put before the
    machine's own PYTHONPATH (kept: a cluster's module system may put its packages there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    own = [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x and Path(x).resolve() not in first]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, first), *own])
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    return env


def rel(p: Path) -> str:
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def install(python: str, chosen: list[Path], site: Path) -> None:
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    if not chosen:
        return
    r = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site),
                        *map(str, chosen)], capture_output=True, text=True, env=clean_env())
    if r.returncode != 0:
        errors = [x for x in (r.stderr + r.stdout).splitlines() if x.startswith("ERROR")] or ["(no message)"]
        raise CheckError(f"pip install from {chosen[0].parent} failed: {errors[0][:300]}")


def imports_of(files: list[str]) -> list[str]:
    """The absolute imports in ``files`` (all of them, also inside functions), then IMPORTS."""
    names: list[str] = []
    for f in files:
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(node, ast.Import):
                names += [x.name for x in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                names.append(node.module)
    return list(dict.fromkeys(IMPORTS + names))


def import_check(python: str, env: dict) -> str:
    """Import what the tests and the benchmark need, in the check's environment: one line on failure."""
    mods = imports_of(IMPORTED_BY)
    code = f"""
import importlib, json, sys
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "benchmarks")!r}]  # as pytest and the script see them
for m in {mods!r}:
    try:
        importlib.import_module(m)
    except BaseException as err:
        print(json.dumps({{"failed": m, "error": f"{{type(err).__name__}}: {{err}}".splitlines()[0][:300]}}))
        sys.exit(1)
import diffusers, pydantic
print(json.dumps({{"diffusers": diffusers.__version__, "pydantic": pydantic.VERSION,
                  "heavy": sorted(k for k in ("ray", "boto3") if k in sys.modules), "n": len({mods!r})}}))
"""
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = r.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckError(f"the import check crashed ({last[:300]})") from None
    if r.returncode != 0 or "failed" in res:
        raise CheckError(f"cannot import {res.get('failed')} with {python}: {res.get('error')}")
    note = f" (note: imported {', '.join(res['heavy'])})" if res["heavy"] else ""
    return f"imports ok ({res['n']} modules): diffusers {res['diffusers']}, pydantic {res['pydantic']}{note}"


def run_logged(argv: list[str], env: dict, log: Path, echo: bool, timeout: float | None) -> tuple[int, list[str]]:
    """Run ``argv`` with stdout and stderr into ``log``; stdout echoed when ``echo`` (progress lines),
    stderr (warnings, a traceback) only logged. Returns (exit code or None on timeout, stdout lines)."""
    out_lines: list[str] = []
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        lock = threading.Lock()

        def pump(stream, is_out):
            for line in stream:
                with lock:
                    f.write(line)
                    f.flush()
                if is_out:
                    out_lines.append(line.rstrip("\n"))
                    if echo:
                        print("  " + line, end="", flush=True)

        threads = [threading.Thread(target=pump, args=(s, o), daemon=True)
                   for s, o in ((proc.stdout, True), (proc.stderr, False))]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        for t in threads:
            t.join(timeout=10)
    return rc, out_lines


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def bench_summary(doc: dict) -> tuple[str, list[str]]:
    """One line of the benchmark's figures, and what is wrong with them (non-finite figures)."""
    t = doc.get("throughput", {})
    problems = [k for k in ("value", "baseline", "ratio") if not finite(t.get(k))]
    levers = doc.get("levers", {})
    not_ok = [f"{k} {v['status']}" + (f" ({v['seconds']} s)" if "seconds" in v else "")
              for k, v in levers.items() if "value" not in v and v.get("status") in ("error", "over budget")]
    problems += [f"levers.{k}" for k, v in levers.items() if "value" in v and not finite(v["value"])]
    mfu = doc.get("flops", {}).get("mfu", {}).get("value")
    line = (f"dxray {t.get('value')} vs naive {t.get('baseline')} image-steps/s ({t.get('ratio')}x)"
            + (f", MFU {mfu}" if mfu is not None else "") + f", {len(levers)} levers"
            + (f" ({'; '.join(not_ok)})" if not_ok else ""))
    return line, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--wheels", type=Path, default=ROOT / "gpu" / "wheels")
    ap.add_argument("--site", type=Path, default=ROOT / ".gpu-site")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--requirements", type=Path, default=ROOT / "gpu" / "requirements.txt")
    ap.add_argument("--install", choices=["missing", "all"], default="missing",
                    help="install the wheels of what the machine lacks (default) or of every requirement")
    ap.add_argument("--compile-budget-s", type=float, default=150.0,
                    help="optimize_step.py's budget for the torch_compile lever (its own models, compile, timing)")
    ap.add_argument("--pytest-timeout-s", type=float, default=300.0, help="kill pytest past this (a hang guard)")
    ap.add_argument("--bench-timeout-s", type=float, default=600.0, help="kill the benchmark past this (a hang guard)")
    ap.add_argument("--bench-args", default="", help="more optimize_step.py arguments, appended (--bench-args='...')")
    ap.add_argument("--sizes", action="store_true", help="print the wheel folder's and the working tree's size; exit")
    a = ap.parse_args(argv)
    a.wheels, a.site, a.results = (p if p.is_absolute() else Path.cwd() / p for p in (a.wheels, a.site, a.results))
    if a.sizes:
        return sizes(a.wheels)
    python = sys.executable
    t_start = time.perf_counter()
    a.results.mkdir(parents=True, exist_ok=True)
    summary_file = a.results / "gpu-check.txt"
    report: list[str] = []

    def say(line: str) -> None:
        report.append(line)
        print(f"gpu-check: {line}", flush=True)

    try:
        if sys.version_info < PY_MIN:
            raise CheckError(f"{python} is Python {sys.version.split()[0]}; dxray needs {PY_MIN[0]}.{PY_MIN[1]}+")
        reqs = requirements(a.requirements)
        chosen, notes = pick_wheels(reqs, a.wheels, a.site, a.install == "all")
        if chosen and subprocess.run([python, "-m", "pip", "--version"], capture_output=True,
                                     env=clean_env()).returncode != 0:
            raise CheckError(f"{python} has no pip (python -m pip) to unpack the wheels with")
        say(f"python {sys.version.split()[0]} ({python}), {probe_torch(python, a.device)}")
        install(python, chosen, a.site)
        say(f"installed {len(chosen)} wheels into {a.site}; the machine's own: "
            + (", ".join(n.split(":")[0] for n in notes if "the machine's" in n) or "none"))
        env = clean_env(a.site, ROOT)
        say(import_check(python, env))
    except CheckError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        summary_file.write_text(f"gpu-check: {err}\n")
        return 2
    t_setup = time.perf_counter()

    # 1. the GPU tests (on CPU: collected only, to show pytest and the conftest import offline).
    pytest_log = a.results / "gpu-check-pytest.txt"
    pytest_argv = [python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-p", "pytest_timeout", "-p",
                   "no:cacheprovider", "-q", "-rA", "--tb=short"] + (["--collect-only"] if a.device == "cpu" else [])
    print(f"gpu-check: running pytest -m gpu tests/test_gpu.py (output: {rel(pytest_log)})", flush=True)
    rc, lines = run_logged(pytest_argv, {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, pytest_log, echo=False,
                           timeout=a.pytest_timeout_s)
    last = next((x.strip("= ") for x in reversed(lines) if x.strip()), "no output")
    pytest_ok = rc == 0
    if rc is None:
        last = f"killed after {a.pytest_timeout_s:.0f} s"
    say(f"pytest -m gpu: {last}" + ("" if pytest_ok else f" (exit {rc})") + f" -> {rel(pytest_log)}")
    t_pytest = time.perf_counter()

    # 2. the benchmark.
    out_json = a.results / ("optimize_step-gpu.json" if a.device == "cuda" else "optimize_step-gpu-check-cpu.json")
    bench_log = out_json.with_suffix(".log")
    bench_argv = [python, "benchmarks/optimize_step.py", *BENCH_ARGS[a.device], "--compile-budget-s",
                  str(a.compile_budget_s), "--out", str(out_json), *a.bench_args.split()]
    say(f"optimize_step.py {' '.join(bench_argv[2:])}")
    out_json.unlink(missing_ok=True)
    rc, lines = run_logged(bench_argv, env, bench_log, echo=True, timeout=a.bench_timeout_s)
    bench_ok = False
    if rc is None:
        bench_line = f"did not finish in {a.bench_timeout_s:.0f} s; killed (log: {rel(bench_log)})"
    elif rc != 0 or not out_json.exists():
        err = (bench_log.read_text().strip().splitlines() or ["no output"])[-1]
        bench_line = f"failed (exit {rc}): {err[:300]} (log: {rel(bench_log)})"
    else:
        bench_line, problems = bench_summary(json.loads(out_json.read_text()))
        bench_ok = not problems
        bench_line += (f"; not finite: {', '.join(problems)}" if problems else "") + f" -> {rel(out_json)}"
    say(f"benchmark: {bench_line}")

    ok = pytest_ok and bench_ok
    now = time.perf_counter()
    final = (f"gpu-check: {'OK' if ok else 'FAILED'} in {now - t_start:.0f} s (setup {t_setup - t_start:.0f}, "
             f"pytest {t_pytest - t_setup:.0f}, benchmark {now - t_pytest:.0f}): pytest {last}; "
             f"benchmark {bench_line.split(' -> ')[0]}")
    summary_file.write_text("\n".join(f"gpu-check: {x}" for x in report) + "\n" + final + "\n")
    print(final, flush=True)
    return 0 if ok else 1


def sizes(wheels: Path) -> int:
    """The wheel folder's size and the working tree's (what travels to a device machine), in MB."""
    whl = sum(w.stat().st_size for w in wheels.glob("*.whl"))
    try:
        r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True)
    except FileNotFoundError:
        print(f"gpu-wheels: {whl / 1e6:.1f} MB in {wheels} (no git: working tree not measured)")
        return 0
    tree = sum((ROOT / p).stat().st_size for p in r.stdout.split("\0") if p and (ROOT / p).is_file())
    inside = wheels.resolve().is_relative_to(ROOT)
    total = tree + (whl if inside else 0)
    print(f"gpu-wheels: {len(list(wheels.glob('*.whl')))} wheels, {whl / 1e6:.1f} MB in {wheels}; working tree "
          f"{tree / 1e6:.1f} MB; together {total / 1e6:.1f} MB (device machines take 64 MiB)")
    return 0 if total < 64 * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
