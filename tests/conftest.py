"""Eight CPU devices for every test, set before JAX starts its backend; one compilation
cache for the session; the meaning of `slow`."""

import atexit
import os
import shutil
import subprocess
import tempfile

# One persistent XLA cache for the session's processes (the test processes and every train.py,
# compare.py or example they start): the many short runs compile the same programs. Made by the
# first process (pytest-xdist's workers inherit it) and removed at its end; a cache named in the
# environment is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxbn-tests-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # after the cache settings, which JAX reads once
import pytest

jax.config.update("jax_num_cpu_devices", 8)

# `slow` (pyproject.toml) marks what `make test-fast` leaves out: a test that takes
# longer than SLOW_SECONDS on the 2-core CI machine (a training run end to end, a
# model compiled several ways) or starts several JAX processes (train.py
# --coordinator). The second kind is enforced here (an unmarked one fails); the
# first is reported at the end of the session, with the unmarked tests over it.
SLOW_SECONDS = 10.0
MULTI_PROCESS_FLAG = "--coordinator"


@pytest.fixture(autouse=True)
def _multi_process_tests_are_slow(request, monkeypatch):
  if request.node.get_closest_marker("slow"):
    return
  original = subprocess.Popen.__init__

  def checked(self, args, *rest, **kwargs):
    if MULTI_PROCESS_FLAG in [str(a) for a in (args if isinstance(args, list | tuple) else [args])]:
      pytest.fail(f"{request.node.nodeid} starts train.py {MULTI_PROCESS_FLAG} (several processes): mark it slow")
    original(self, args, *rest, **kwargs)

  monkeypatch.setattr(subprocess.Popen, "__init__", checked)


_unmarked_over: list[tuple[float, str]] = []


def pytest_runtest_logreport(report):
  if report.when == "call" and report.duration > SLOW_SECONDS and "slow" not in report.keywords:
    _unmarked_over.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter):
  if _unmarked_over:
    terminalreporter.write_sep("-", f"tests over {SLOW_SECONDS:.0f} s not marked slow (tests/conftest.py)")
    for seconds, nodeid in sorted(_unmarked_over, reverse=True):
      terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
