"""Stopping for preemption: SIGTERM or SIGINT ends the run at the next step, with a checkpoint of it.

A cloud VM gets about 30 seconds of notice (SIGTERM), SLURM a signal before its
time limit. train.py finishes the step in flight (one step per dispatch, at most
two in flight), saves a checkpoint of that step and the losses of the
unfinished evaluation period, says how to continue, and exits 0; `--resume`
then continues exactly. With several processes, every one must save the same
step: JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`)
agrees on it, the notice reaching every process through the coordination service.
"""

from __future__ import annotations

import signal

from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run stopped at `step` on a signal; its checkpoint is saved."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"stopped at step {step} ({signal_name})")
    self.step, self.signal_name = step, signal_name


class StopSignals:
  """Catches SIGTERM and SIGINT while training; `should_stop(step)` after each step."""

  def __init__(self, processes: int):
    self.processes = processes
    self.received: str | None = None
    self._previous = {}
    # With several processes JAX's own SIGTERM handler reports the notice to the
    # coordination service; SIGINT is passed on to it as SIGTERM.
    for sig in (signal.SIGINT,) if processes > 1 else (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    if self.processes > 1:
      signal.raise_signal(signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """True at the step every process stops at (call after every step, on every process)."""
    if self.processes > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or "SIGTERM"
        return True
      return False
    return self.received is not None

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
