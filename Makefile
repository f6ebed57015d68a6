# Two commands do everything on a fresh machine: `make test` and `make train`.
# PYTHON picks the interpreter; each one gets its own environment
# (python3: .venv, any other: .venv-X.Y), e.g. `make test PYTHON=python3.13`.
PYTHON ?= python3
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(PY_VERSION))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# The newest Python that pyenv has: `make test-newest` runs the suite there,
# with the newest JAX and flax that pip resolves for it.
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
NEWEST_PYTHON ?= $(PYENV_ROOT)/versions/$(shell ls $(PYENV_ROOT)/versions 2>/dev/null | grep -E '^3\.[0-9]+\.[0-9]+$$' | sort -V | tail -n 1)/bin/python
PYTEST_ARGS ?=
# Test processes side by side (pytest-xdist). Most tests wait on XLA's single-threaded
# compiler: two processes keep both cores of this machine busy. TEST_WORKERS=0: one process.
# The whole suite keeps a file's tests in one process (its training-run fixtures are built
# once); the fast subset has only cheap fixtures and balances test by test.
TEST_WORKERS ?= 2
PYTEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist $(DIST))

.PHONY: env test test-fast test-newest lint docs data train reproduce finetune report bench bench-device compare-device

env: $(STAMP)

$(STAMP): pyproject.toml jaxbn/__init__.py
	@test -n "$(PY_VERSION)" || (echo "PYTHON=$(PYTHON): not a Python interpreter" >&2; exit 1)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,report,test,lint,docs]'
	touch $@

# pytest exits non-zero (5) when it collects no test, so make fails loudly.
test: DIST = loadfile
test: $(STAMP)
	$(PY) -m pytest -q --durations=12 $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Everything but the tests marked slow (tests/conftest.py): under 4 minutes here.
test-fast: DIST = worksteal
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The suite on the newest Python and the newest JAX/flax pip resolves for it
# (a fresh environment resolves them; delete .venv-X.Y to re-resolve).
test-newest:
	@test -x "$(NEWEST_PYTHON)" || (echo "test-newest: no pyenv Python found under $(PYENV_ROOT)/versions" >&2; exit 1)
	$(MAKE) test PYTHON=$(NEWEST_PYTHON) VENV=.venv-newest
	.venv-newest/bin/python -c 'import sys, jax, flax; print("tested on Python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__)'

# ruff (lint and format) on everything, mypy on the BN library.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The documentation site (Sphinx, MyST pages, autodoc API reference); any warning fails.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html
	@echo "documentation built: open $(CURDIR)/docs/_build/html/index.html"

# Fashion-MNIST from Debian's package when it is not there yet (no network
# needed beyond the package mirror), then prepared once as TFDS array_record.
data: $(STAMP)
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "could not install dataset-fashion-mnist; train.py will try its download"; fi
	$(PY) -c "from trainer import data; data.load('fashion_mnist', data_dir='data')"

# The default experiments, every one scaled down (13.8 minutes in a fresh clone
# on 2 CPU cores, set-up included) -> reports/default/
train: data
	$(PY) experiments/run.py --size default
	$(PY) experiments/report.py --size default

# Every experiment at full size -> reports/full/ (the committed report): 187 runs,
# about 5 hours on 2 CPU cores plus E4-long (about 4.5 hours). E4 and E4-long are
# compare.py sweeps, each as two streams side by side (compare.py --shard 0/2 and
# 1/2: their one-device runs and evaluations leave a core free). Finished runs are
# skipped, interrupted ones resume.
reproduce: data
	$(PY) experiments/run.py --size full --only e1,e1_sweep,e2,e3,e5
	for comparison in e4 e4_long; do \
	  $(PY) experiments/run.py --size full --only $$comparison --shard 1/2 & stream=$$!; \
	  $(PY) experiments/run.py --size full --only $$comparison --shard 0/2 || exit 1; \
	  wait $$stream || exit 1; done
	$(PY) experiments/report.py --size full

# Fine-tuning from PyTorch-layout weights (issue 28): pretrain ResNet-18 on five
# Fashion-MNIST classes, export it as a torchvision state dict, fine-tune on the
# other five with BN frozen, synced, per device and from scratch (about 2 hours
# on 2 CPU cores) -> reports/full/finetune.md
finetune: data
	$(PY) experiments/finetune.py --runs runs/finetune

# Re-draw the committed full report from its metrics files, no training.
report: $(STAMP)
	$(PY) experiments/report.py --size full
	$(PY) experiments/finetune.py --report-only

# Headline numbers: the environment users have. Then the BN layer again with
# glibc's malloc told to keep freed 32 MB buffers (without it, returning them
# to the OS and page-faulting them back in is a large part of every CPU
# timing of these shapes): the second column of benchmarks/README.md.
BENCH_TUNED_ENV := MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=536870912
bench: data
	$(PY) benchmarks/bn_layer.py
	$(PY) benchmarks/synced.py
	$(PY) benchmarks/train_steps.py
	$(PY) benchmarks/resnet_steps.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/preemption.py
	$(PY) benchmarks/parallel_styles.py
	$(PY) benchmarks/accumulation.py
	$(BENCH_TUNED_ENV) $(PY) benchmarks/bn_layer.py
	$(PY) benchmarks/summary.py

# On a machine with an accelerator: the BN-layer, synced and training-step
# benchmarks there (under ~8 minutes), written to benchmarks/results/*.PLATFORM.json.
# It needs jax, flax and optax only, so an accelerator image's own Python
# serves: `make bench-device DEVICE_PYTHON=python3` (no environment is made).
DEVICE_PYTHON ?= $(PY)
bench-device:
	$(DEVICE_PYTHON) benchmarks/device.py

# On a machine with one accelerator: E4 at 30 epochs (all seven normalization
# batches, 2 seeds, four runs at once on the device, bfloat16) -> reports/device/
# (e4.md, accuracy.png, data/). It needs the training stack in DEVICE_PYTHON's
# environment and Fashion-MNIST prepared under data/ (carry it there).
compare-device:
	$(DEVICE_PYTHON) experiments/run.py --size device --only e4
	cp runs/device/e4/report.md reports/device/e4.md
	cp runs/device/e4/accuracy.png reports/device/accuracy.png
