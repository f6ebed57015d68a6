"""Eight CPU devices for every test, set before JAX starts its backend; the meaning of `slow`."""

import subprocess

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

# `slow` (pyproject.toml) marks what `make test-fast` leaves out: tests that start
# several JAX processes (train.py --coordinator) or train for long. The first kind is
# enforced here: such a test that is not marked fails.
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
