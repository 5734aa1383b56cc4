# make install | test | demo | bench | lint  — each installs first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= dxray-out

.PHONY: install browser test demo demo-tiny bench bench-gpu lint schema

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

# The planted-bias toy world, end to end: trains the world on first use (one thread; 3-6 min on a 2-core box),
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

# On a CUDA machine: dxray's optimisation step vs the naive loop, levers, FLOPs/MFU and the
# full-ImageNet projection on the SD1.5-size architecture (random weights) at 512 px, 4 steps.
bench-gpu: install
	$(BIN)/python benchmarks/optimize_step.py --preset sd15 --device cuda --out optimize_step-gpu.json

lint: install
	$(BIN)/ruff check dxray tests benchmarks jobs

schema: install
	$(BIN)/dxray schema --out schemas
