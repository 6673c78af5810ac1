# Every target creates .venv and installs mechhi (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slow demo bench clean

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

demo: $(STAMP)
	$(VENV)/bin/mechhi trace
	$(VENV)/bin/mechhi rank --store stores/toy.zarr --top 4
	$(VENV)/bin/mechhi stats --store stores/toy.zarr

bench: $(STAMP)
	$(VENV)/bin/mechhi bench --quick

clean:
	rm -rf $(VENV) stores/*.zarr
