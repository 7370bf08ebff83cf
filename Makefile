# Everything a fresh machine needs: `make demo` runs the main job, `make test` the whole test suite (CI),
# `make check` its fast tier (under 90 s on 2 cores; docs/contributing.md says when to run which).
# torch is pinned first (a CPU wheel); the package itself only asks for torch>=2.1.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test check docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/longcat-lora demo

test: setup
	$(PY) -m pytest -q

check: setup
	$(PY) -m pytest -q -m "not slow"

docs: setup
	$(PY) tools/gen_docs.py

bench: setup
	$(PY) benchmarks/convert.py
	$(PY) benchmarks/runtime.py
	$(PY) benchmarks/merge.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
