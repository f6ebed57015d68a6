# Two commands do everything on a fresh machine: `make test` and `make train`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test env

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# pytest exits non-zero (5) when it collects no test, so make fails loudly.
test: $(STAMP)
	$(PY) -m pytest -q
