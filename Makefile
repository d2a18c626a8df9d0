# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
# Each creates .venv when it is missing and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test demo bench bench-quick lint clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[test,examples,bench]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check optaxclip tests examples benchmarks notebooks
	$(PY) -m pytest -n 2 --dist loadfile -q

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

lint: $(STAMP)
	$(PY) -m ruff check optaxclip tests examples benchmarks notebooks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
