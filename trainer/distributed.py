"""Starting JAX on one process or several (`jax.distributed`), with errors that say what to do."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import jax

from trainer.config import Config


def setup_devices(
  config: Config, coordinator=None, num_processes=None, process_id=None, auto_detect=False, timeout: int = 120
):
  """Starts JAX (several processes if asked) and returns this process's devices to use.

  Several processes: pass the coordinator, or `auto_detect` to let JAX find
  the cluster (SLURM, TPU pods, ...). A process that cannot reach the others
  within `timeout` seconds raises ConnectionError naming the address.
  """
  if config.devices:
    jax.config.update("jax_num_cpu_devices", config.devices)
  if auto_detect or coordinator or num_processes or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the auto-detected coordinator"
    if coordinator and process_id:
      _wait_for(coordinator, timeout, process_id)
    # JAX ends the process (a C++ abort, no Python exception) when the others
    # do not all arrive in time: say beforehand what it waits for, and keep
    # the abort's stack trace out of the way.
    log = Path(tempfile.gettempdir()) / f"jaxbn-distributed-{os.getpid()}.log"
    print(
      f"process {process_id}: waiting up to {timeout} s (--connect-timeout) for "
      f"{num_processes or 'all'} processes at {address}; JAX's own messages: {log}",
      file=sys.stderr,
      flush=True,
    )
    with _stderr_to(log):
      jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
      )
  devices = jax.local_devices()
  if config.devices:
    if len(devices) < config.devices:
      raise ValueError(f"devices: asked for {config.devices}, this process has {len(devices)}.")
    devices = devices[: config.devices]
  return devices


def _wait_for(address: str, timeout: int, process_id) -> None:
  """A non-coordinator process: the coordinator's port must open within `timeout` s."""
  host, port = address.rsplit(":", 1)
  deadline = time.time() + timeout
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=5).close()
      return
    except OSError:
      if time.time() > deadline:
        raise ConnectionError(
          f"process {process_id}: no coordinator at {address} within {timeout} s; start process 0 "
          f"with the same --coordinator, or raise --connect-timeout."
        ) from None
      time.sleep(0.5)


@contextlib.contextmanager
def _stderr_to(path: Path):
  """Sends file descriptor 2 (where C++ code writes) to `path` for a while."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "ab") as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
