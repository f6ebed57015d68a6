# Two commands do everything on a fresh machine: `make test` and `make train`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: env test data train reproduce report bench

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,report,test]'
	touch $@

# pytest exits non-zero (5) when it collects no test, so make fails loudly.
test: $(STAMP)
	$(PY) -m pytest -q

# Fashion-MNIST from Debian's package when it is not there yet (no network
# needed beyond the package mirror), then prepared once as TFDS array_record.
data: $(STAMP)
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "could not install dataset-fashion-mnist; train.py will try its download"; fi
	$(PY) -c "from jaxbn import data; data.load('fashion_mnist', data_dir='data')"

# The default experiments, every one scaled down (14.3 minutes in a fresh clone
# on 2 CPU cores, set-up included) -> reports/default/
train: data
	$(PY) experiments/run.py --size default
	$(PY) experiments/report.py --size default

# Every experiment at full size -> reports/full/ (the committed report): 144 runs,
# about 2 hours on 2 CPU cores. Finished runs are skipped, interrupted ones resume.
reproduce: data
	$(PY) experiments/run.py --size full
	$(PY) experiments/report.py --size full

# Re-draw the committed full report from its metrics files, no training.
report: $(STAMP)
	$(PY) experiments/report.py --size full

# Headline numbers: the environment users have. Then the BN layer again with
# glibc's malloc told to keep freed 32 MB buffers (without it, returning them
# to the OS and page-faulting them back in is a large part of every CPU
# timing of these shapes): the second column of benchmarks/README.md.
BENCH_TUNED_ENV := MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=536870912
bench: $(STAMP)
	$(PY) benchmarks/bn_layer.py
	$(PY) benchmarks/synced.py
	$(PY) benchmarks/train_steps.py
	$(PY) benchmarks/parallel_styles.py
	$(BENCH_TUNED_ENV) $(PY) benchmarks/bn_layer.py
	$(PY) benchmarks/summary.py
