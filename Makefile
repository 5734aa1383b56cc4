# make install | test | demo | bench | lint  — each installs first if needed.
# make gpu-wheels (networked) then make gpu-check (an offline CUDA node: its own python + torch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= dxray-out

.PHONY: install browser test test-slow demo demo-tiny bench bench-toyworld bench-gpu gpu-wheels gpu-check lint schema

install: $(STAMP)

# constraints.txt pins the versions the tests last passed with; pyproject.toml keeps lower bounds.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# tests/test_report.py checks the HTML report in a real headless Chromium: Debian's chromium + chromium-driver.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

test: install browser
	$(BIN)/pytest

# Every model the paper's job loads at its real size (random weights), run end to end (~15 min, ~10 GB of disk
# under DXRAY_REAL_SIZE, default ~/.cache/dxray/real-size).
test-slow: install
	$(BIN)/pytest -m slow -s tests/test_real_size.py

# The planted-bias toy world, end to end: copies the shipped world into the cache (pinned weights, trains nothing),
# audits it on a local Ray (the embedded default), and scores the audit against the planted truth.
demo: install
	@run=$$($(BIN)/dxray audit jobs/configs/toyworld.yaml output=$(OUT)) && \
	$(BIN)/dxray toyworld check "$$run" && echo "outputs: $$run"

# The plumbing preset: tiny random models (seconds).
demo-tiny: install
	$(BIN)/dxray audit jobs/configs/tiny.yaml output=$(OUT)

bench: install
	$(BIN)/python benchmarks/sampler.py --size tiny
	$(BIN)/python benchmarks/segment.py --model tiny --images 32 --size 128
	$(BIN)/python benchmarks/sampler.py --size sd15 --resolution 256 --checkpointing
	$(BIN)/python benchmarks/scheduler.py
	$(BIN)/python benchmarks/optimize_step.py --preset tiny
	$(BIN)/python benchmarks/compact.py
	$(BIN)/python benchmarks/report.py
	$(BIN)/python benchmarks/scale.py

# World v5's known-answer sweep (issue 31; benchmarks/README.md, "World v5"): trains the held-out worlds' generators
# and classifiers, audits every (world, audit seed, rho, family), scores each against its truth and pools the calls
# with bootstrap intervals beside the baselines. Hours on 2 cores, and resumable: the audits stay in
# TOYWORLD_CACHE, so running it again picks up where it stopped (and re-scores finished audits in seconds).
TOYWORLD_CACHE ?= $(HOME)/.cache/dxray/toyworld-sweep
bench-toyworld: install
	$(BIN)/python benchmarks/toyworld_sweep.py --cache-dir $(TOYWORLD_CACHE) --worlds 3-4 --seeds 3-6 \
		--rho 0,0.5,0.8,0.95,1 --top-k 2 --name rho
	$(BIN)/python benchmarks/toyworld_sweep.py --cache-dir $(TOYWORLD_CACHE) --worlds 3-7 --seeds 3-6 --rho 1 \
		--top-k 2 --name headline

# On a CUDA machine: dxray's optimisation step vs the naive loop, levers, FLOPs/MFU and the
# full-ImageNet projection on the SD1.5-size architecture (random weights) at 512 px, 4 steps.
bench-gpu: install
	$(BIN)/python benchmarks/optimize_step.py --preset sd15 --device cuda --out optimize_step-gpu.json

# The offline GPU check. On a networked machine, `make gpu-wheels` downloads gpu/requirements.txt
# (what an air-gapped CUDA node's python lacks: diffusers, pydantic, pytest, ...; no ray) as wheels
# for the node's Python (GPU_PY) and platform into GPU_WHEELS, and prints their size. On the node,
# `make gpu-check` installs nothing from an index: it unpacks the wheels of what GPU_PYTHON lacks into
# GPU_SITE, then runs `pytest -m gpu` and optimize_step.py (sd15, every lever, torch_compile within
# GPU_COMPILE_BUDGET_S) into benchmarks/results/ (gpu-check.txt: the summary). GPU_CHECK_DEVICE=cpu:
# the same path on a CPU machine (tiny preset; the GPU tests only collected).
GPU_PYTHON ?= python3
GPU_PY ?= 3.12
GPU_PLATFORMS ?= manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64
GPU_WHEELS ?= gpu/wheels
GPU_SITE ?= .gpu-site
GPU_RESULTS ?= benchmarks/results
GPU_CHECK_DEVICE ?= cuda
GPU_CHECK_INSTALL ?= missing
GPU_COMPILE_BUDGET_S ?= 150
GPU_BENCH_ARGS ?=

gpu-wheels:
	mkdir -p $(GPU_WHEELS) && rm -f $(GPU_WHEELS)/*.whl
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
	  --python-version $(GPU_PY) --implementation cp --abi cp$(subst .,,$(GPU_PY)) --abi abi3 \
	  $(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) -r gpu/requirements.txt
	@$(PYTHON) gpu/check.py --sizes --wheels $(GPU_WHEELS)

gpu-check:
	@command -v $(GPU_PYTHON) >/dev/null || { echo "gpu-check: no python '$(GPU_PYTHON)'; set GPU_PYTHON" >&2; exit 2; }
	@$(GPU_PYTHON) gpu/check.py --device $(GPU_CHECK_DEVICE) --wheels $(GPU_WHEELS) --site $(GPU_SITE) \
	  --results $(GPU_RESULTS) --install $(GPU_CHECK_INSTALL) --compile-budget-s $(GPU_COMPILE_BUDGET_S) \
	  --bench-args="$(GPU_BENCH_ARGS)"

lint: install
	$(BIN)/ruff check dxray tests benchmarks jobs

schema: install
	$(BIN)/dxray schema --out schemas
