# Every target creates .venv and installs mechhi (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slow test-readme demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every block of README.md, slow ones included, in order (tests/test_readme.py).
test-readme: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests/test_readme.py -k "not make_demo"

# Safe to repeat: a finished trace is not traced again (it says so), scores are kept.
demo: $(STAMP)
	$(VENV)/bin/mechhi trace
	$(VENV)/bin/mechhi rank --store stores/toy.zarr --top 4
	$(VENV)/bin/mechhi stats --store stores/toy.zarr

bench: $(STAMP)
	$(PY) benchmarks/capture_vs_eager.py

clean:
	rm -rf $(VENV) stores/*.zarr stores/*.zarr.lock
