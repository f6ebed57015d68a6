"""Starting JAX on one process or several (`jax.distributed`), with errors that say what to do.

Several processes: JAX's own messages (C++, on file descriptor 2) go to a log
file whose path is printed, so that what a user reads is one line per event;
a watch thread exits this process with one line when another process stops
answering (killed, crashed, its machine gone) instead of letting it hang in a
collective or end in JAX's abort.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

from trainer.config import Config


def setup_devices(
  config: Config,
  coordinator=None,
  num_processes=None,
  process_id=None,
  auto_detect=False,
  timeout: int = 120,
  peer_timeout: int = 60,
):
  """Starts JAX (several processes if asked) and returns this process's devices to use.

  Several processes: pass the coordinator, or `auto_detect` to let JAX find
  the cluster (SLURM, TPU pods, ...). A process that cannot reach the others
  within `timeout` seconds raises ConnectionError naming the address; once
  running, one whose peer stops answering for `peer_timeout` seconds exits (1).
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
        # JAX's own detection: a backstop behind the watch below, which is quicker and says it in one line
        heartbeat_timeout_seconds=3 * peer_timeout,
      )
    _native_stderr_to(log)
    global _watch
    _watch = PeerWatch(peer_timeout, log)
    _watch.start()
    # atexit runs last-registered first: the watch stops before JAX's own shutdown tears the client
    # down under it (a daemon thread inside a client call at exit aborts the process)
    atexit.register(_watch.stop)
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


def _native_stderr_to(path: Path) -> None:
  """From now on C++ writes to `path`; Python's sys.stderr keeps the terminal."""
  sys.stderr.flush()
  terminal = os.dup(2)
  with open(path, "ab") as f:
    os.dup2(f.fileno(), 2)
  sys.stderr = os.fdopen(terminal, "w", buffering=1)


_resume_hint = None  # () -> str: where the last checkpoint is and how to resume (set by train.py)
_watch: PeerWatch | None = None


def set_resume_hint(hint) -> None:
  """`hint()` is appended to the line a process exits with when a peer is lost."""
  global _resume_hint
  _resume_hint = hint


def peer_lost(message: str) -> None:
  """Exit in one line: what happened, then the last checkpoint and how to resume."""
  exit_now(message + (f" {_resume_hint()}" if _resume_hint else ""))


def lost_peers(wait: float) -> list[str]:
  """The processes that have stopped answering ("0" too when the coordinator is gone),
  watching for up to `wait` seconds; [] without a watch or when every process answers."""
  deadline = time.time() + wait
  while _watch is not None:
    gone = _watch.silent(3.0)
    if gone or time.time() > deadline:
      return gone
    time.sleep(0.5)
  return []


def exit_now(message: str, code: int = 1) -> None:
  """One line, then exit at once: after a peer died, JAX's shutdown would wait
  for it and then abort with a stack trace."""
  print(message, file=sys.stderr, flush=True)
  os._exit(code)


class PeerWatch(threading.Thread):
  """Every process counts up its own key in the coordination service's store
  every second and watches the others'; a count that stops moving for
  `timeout` seconds (or a store that stops answering: the coordinator is
  gone) means that process is dead, and this one exits with one line."""

  PREFIX = "jaxbn/alive/"

  def __init__(self, timeout: int, log: Path):
    super().__init__(daemon=True, name="jaxbn-peer-watch")
    self.timeout, self.log = timeout, log
    self.seen: dict[str, tuple[str, float]] = {}  # process -> (its count, when it last moved)
    self.store_ok = time.time()
    self._stopped = threading.Event()

  def stop(self) -> None:
    """Ends the watch (within a second) and waits for it."""
    self._stopped.set()
    self.join(timeout=5.0)

  def silent(self, seconds: float) -> list[str]:
    """The processes silent for more than `seconds` (process 0 when the store is)."""
    now = time.time()
    if now - self.store_ok > seconds:
      return ["0"]
    return sorted(p for p, (_, moved) in list(self.seen.items()) if now - moved > seconds)

  def run(self):
    from jax._src import distributed

    client, me = distributed.global_state.client, jax.process_index()
    while not self._stopped.is_set():
      now = time.time()
      try:
        client.key_value_increment(f"{self.PREFIX}{me}", 1)
        for key, value in client.key_value_dir_get(self.PREFIX):
          process = key.rsplit("/", 1)[-1]
          if self.seen.get(process, ("", 0.0))[0] != value:
            self.seen[process] = (value, now)
        self.store_ok = now
      except Exception:
        if now - self.store_ok > self.timeout:
          peer_lost(
            f"error: process {me}: the coordinator (process 0) has not answered for {now - self.store_ok:.0f} s "
            f"(--peer-timeout {self.timeout}); exiting. JAX's messages: {self.log}."
          )
      for process, (_, moved) in list(self.seen.items()):
        if now - moved > self.timeout:
          peer_lost(
            f"error: process {me}: process {process} stopped answering {now - moved:.0f} s ago "
            f"(killed or crashed?; --peer-timeout {self.timeout}); exiting. JAX's messages: {self.log}."
          )
      self._stopped.wait(1.0)
