"""The one place that spans the training and evaluation steps over devices.

Three styles, one interface (`Parallel`): place the state, place a batch, build
the step, read results back, pool per-device rows. `STYLES` maps each name to
its implementation; `make_parallel` chooses once.

  jit        jax.jit over arrays sharded with NamedSharding on an Explicit mesh;
             the steps run on global arrays and XLA places the collectives
  shard_map  jax.jit(jax.shard_map(...)) on the same mesh; the steps run per device
  pmap       jax.pmap; the steps run per device on a leading device axis

The host keeps the portable state (`state.TrainState`, one set of BN running
statistics per layer); `put_state` places it for the style and
`portable_state` brings it back. For per-device BN the running statistics
carry one row per normalization group while training, in every style
(jit: rows sharded over the mesh and BN's `batch_groups` making each device's
shard whole groups; shard_map: each device sees its own rows; pmap: the same,
on the pmapped axis). `synchronize` pools the rows (law of total variance,
`jaxbn.sync_batch_stats`) before every evaluation and checkpoint.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from trainer import steps
from trainer.mesh import AXIS, device_mesh

if TYPE_CHECKING:
  from trainer.state import TrainState

__all__ = ["STYLES", "JitStyle", "Parallel", "PmapStyle", "ShardMapStyle", "make_parallel"]


def _pool_rows(batch_stats):
  """One row per group -> the pooled statistics of the feature shape."""
  return jaxbn.sync_batch_stats(batch_stats)


def _widen_rows(batch_stats, rows: int):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (rows, *a.shape)), batch_stats)


def _host(array) -> np.ndarray:
  """A replicated global array's value, read on this process."""
  return np.asarray(array.addressable_shards[0].data)


class Parallel:
  """Places state and data and builds the parallel programs for one style.

  The base class is the mesh-based placement that jit and shard_map share;
  each style overrides what it does differently.
  """

  name: str
  local: bool  # the steps run per device over AXIS (shard_map, pmap), not on global arrays (jit)

  def __init__(self, devices, stat_rows: int | None = None):
    """`stat_rows`: per-device BN's rows of running statistics (one per normalization
    group, each device holding stat_rows / devices of them); None: one set."""
    self.stat_rows = stat_rows
    self.per_device_bn = stat_rows is not None
    self.devices = list(devices)
    self.num_devices = len(self.devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = device_mesh(self.devices)
    self._programs: dict = {}

  # ---- placement ------------------------------------------------------------

  def _put(self, tree, spec):
    """Host arrays (every process holds all of them) -> global arrays."""
    sharding = NamedSharding(self.mesh, spec)

    def put(a):
      a = np.asarray(a)
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)

  def replicate(self, tree):
    """The same value on every device."""
    return self._put(tree, P())

  def shard(self, tree):
    """Host arrays whose leading axis has one entry per device."""
    return self._put(tree, P(AXIS))

  def _stats_spec(self):
    return P(AXIS) if self.per_device_bn else P()

  def _state_specs(self, state):
    return state.replace(
      step=P(),
      params=jax.tree.map(lambda _: P(), state.params),
      opt_state=jax.tree.map(lambda _: P(), state.opt_state),
      batch_stats=jax.tree.map(lambda _: self._stats_spec(), state.batch_stats),
      ema_params=jax.tree.map(lambda _: P(), state.ema_params),
      ema_batch_stats=jax.tree.map(lambda _: P(), state.ema_batch_stats),
    )

  def put_batch_stats(self, stats):
    """Running statistics on the host (per-device BN: one row per group) -> placed."""
    return self._put(stats, self._stats_spec())

  def put_state(self, state: TrainState, rows=None) -> TrainState:
    """The portable state, placed for this style; per-device BN's `rows` (from
    `row_stats`), where given, instead of the portable state's pooled set."""
    state = jax.tree.map(np.asarray, state)
    stats = state.batch_stats
    if self.per_device_bn:
      stats = jax.tree.map(np.asarray, _widen_rows(stats, self.stat_rows) if rows is None else rows)
    return self.replicate(state.replace(batch_stats={})).replace(batch_stats=self.put_batch_stats(stats))

  def put_batch(self, rows: np.ndarray):
    """This process's rows of a global batch (rows, ...) -> the program's input."""
    sharding = NamedSharding(self.mesh, P(AXIS))
    global_rows = rows.shape[0] * self.num_devices // len(self.local_devices)
    return jax.make_array_from_process_local_data(sharding, rows, (global_rows, *rows.shape[1:]))

  def put_indices(self, batches, step: int, rows: range):
    """Device-resident input: the step's example indices, as the resident step reads
    them (per-device styles: this process's rows; jit: the global batch's, replicated)."""
    if self.local:
      return self.put_batch(batches.indices(step, rows))
    return self.replicate(batches.indices(step, range(batches.global_batch)))

  def _put_local_rows(self, tree):
    """Arrays with a leading axis of this process's devices -> one entry per device globally."""
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, a, (self.num_devices, *a.shape[1:])), tree
    )

  # ---- reading back -----------------------------------------------------------

  def _read(self, array) -> np.ndarray:
    """A replicated program output, on the host."""
    return _host(array)

  def _first_device(self, state):
    """The state as one device holds it (after `synchronize` every device holds the same)."""
    return state

  def portable_state(self, state: TrainState) -> TrainState:
    """Host copy of the state with pooled running statistics (call after
    `synchronize`: then every device holds the same values)."""
    state = self._first_device(state)
    if self.per_device_bn:  # rows -> one set
      state = state.replace(batch_stats=self._call("pool", _pool_rows, state.batch_stats))
    return jax.tree.map(_host, state)

  def row_stats(self, state):
    """Per-device BN: the running statistics' rows, one per group, on the host."""
    return jax.tree.map(self._rows_on_host, state.batch_stats)

  def _rows_on_host(self, array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))

  # ---- programs -------------------------------------------------------------

  def _call(self, name, fn, *args):
    """A small jitted program on placed arrays."""
    if name not in self._programs:
      self._programs[name] = jax.jit(fn)
    with jax.set_mesh(self.mesh):
      return self._programs[name](*args)

  def program(self, fn, in_specs, out_specs, donate=()):
    """`fn`, written per device (`local`) or on global arrays, as this style's program."""
    jitted = jax.jit(self._spanned(fn, in_specs, out_specs), donate_argnums=donate)

    def run(*args):
      with jax.set_mesh(self.mesh):
        return jitted(*args)

    return run

  def lower(self, fn, in_specs, out_specs, *args):
    """`program(fn, ...)` lowered for `args`, to compile and read (benchmarks)."""
    with jax.set_mesh(self.mesh):
      return jax.jit(self._spanned(fn, in_specs, out_specs)).lower(*args)

  def _spanned(self, fn, in_specs, out_specs):
    return fn

  def step_program(self, state, resident: bool, **kwargs):
    """The program of one step: (state, images, labels[, index]) -> (state, loss).

    `resident`: images/labels are the whole training split, replicated
    (`replicate`), and index the batch's example indices (`put_indices`);
    otherwise the step's batch (`put_batch`).
    """
    key = ("step", resident, kwargs.get("frozen_bn", False))
    if key not in self._programs:
      specs = self._state_specs(state)
      data = (P(), P(), P(AXIS)) if resident else (P(AXIS), P(AXIS))
      fn = functools.partial(
        steps.train_batch,
        num_devices=self.num_devices,
        local=self.local,
        **kwargs,
        batch_sharding=None if self.local else P(AXIS),
      )
      self._programs[key] = self.program(fn, (specs, *data), (specs, P()), donate=(0,))
    return self._programs[key]

  def _pooled(self, state):
    """Inside an evaluation program: the state with one set of running statistics."""
    if not self.per_device_bn:
      return state
    return state.replace(batch_stats=_pool_rows(state.batch_stats))

  def _evaluation(self, state, evaluate):
    """The evaluation program: (state, images, labels, valid) -> (sums, tracked), per device's share."""

    def fn(s, images, labels, valid):  # every device's share at once, then the sums
      per_device = jax.vmap(functools.partial(evaluate, local=False), in_axes=(None, 0, 0, 0))
      sums, tracked = per_device(self._pooled(s), images, labels, valid)
      return jax.tree.map(lambda a: a.sum(0), sums), tracked

    return self.program(fn, None, None)

  def evaluate(self, state, batches, *, model, pixels, batch_stats_groups=None):
    """Sums over the test set (host floats) and the tracked values of its examples.

    `batches` yields this process's devices' shares (local_devices, chunk, ...)
    of images, labels and `valid`. `model` is the portable one
    (`make_model(config)`): evaluation reads one set of running statistics, the
    pooled one (call after `synchronize`).
    """
    key = ("eval", batch_stats_groups)
    if key not in self._programs:
      evaluate = functools.partial(steps.eval_step, model=model, pixels=pixels, batch_stats_groups=batch_stats_groups)
      self._programs[key] = self._evaluation(state, evaluate)
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    tracked_all = []
    for images, labels, valid in batches:
      sums, tracked = self._programs[key](state, *self._put_local_rows((images, labels, valid)))
      for name, value in sums.items():
        totals[name] += float(self._read(value))
      tracked = np.asarray(multihost_utils.process_allgather(tracked, tiled=True)).reshape(-1)
      valid = np.asarray(multihost_utils.process_allgather(valid, tiled=True)).reshape(-1)
      tracked_all.append(tracked[valid])
    return totals, np.concatenate(tracked_all)

  def synchronize(self, state):
    """Per-device BN: every device's running statistics := the pooled ones."""
    if not self.per_device_bn:
      return state

    def pooled(s):  # rows := the pooled set, still one row per group
      rows = _widen_rows(_pool_rows(s.batch_stats), self.stat_rows)
      return s.replace(batch_stats=jax.tree.map(lambda a: jax.sharding.reshard(a, P(AXIS)), rows))

    return self._call("sync", pooled, state)


class JitStyle(Parallel):
  name, local = "jit", False


class ShardMapStyle(Parallel):
  name, local = "shard_map", True

  def _spanned(self, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

  def _pooled(self, state):
    if not self.per_device_bn:
      return state  # this device's row, already the pooled set (after `synchronize`)
    return state.replace(batch_stats=jax.tree.map(lambda a: a[0], state.batch_stats))

  def _evaluation(self, state, evaluate):
    def fn(s, images, labels, valid):  # this device's (1, chunk, ...) share
      sums, tracked = evaluate(self._pooled(s), images[0], labels[0], valid[0], local=True)
      return sums, tracked[None]

    specs = self._state_specs(state)
    return self.program(fn, (specs, P(AXIS), P(AXIS), P(AXIS)), (P(), P(AXIS)))


class PmapStyle(ShardMapStyle):
  """Every value carries a leading axis of this process's devices; each device sees its own."""

  name, local = "pmap", True

  def replicate(self, tree):
    return self._put(jax.tree.map(lambda a: np.broadcast_to(a, (self.num_devices, *np.shape(a))), tree), P(AXIS))

  def put_batch_stats(self, stats):
    if not self.per_device_bn:
      return self.replicate(stats)
    own_rows = lambda a: a.reshape(self.num_devices, -1, *a.shape[1:])  # (devices, rows / devices, features)
    return self.shard(jax.tree.map(own_rows, stats))

  def put_batch(self, rows: np.ndarray):
    return rows.reshape(len(self.local_devices), -1, *rows.shape[1:])  # pmap places each device's share

  def _put_local_rows(self, tree):
    return tree

  def _read(self, array) -> np.ndarray:
    return _host(array)[0]  # the value on this process's first device

  def _first_device(self, state):
    return self._call("first", lambda s: jax.tree.map(lambda a: a[0], s), state)

  def _rows_on_host(self, array) -> np.ndarray:
    array = super()._rows_on_host(array)  # (devices, rows / devices, ...)
    return array.reshape(-1, *array.shape[2:])

  def _call(self, name, fn, *args):  # pmap's arrays carry no explicit mesh
    if name not in self._programs:
      self._programs[name] = jax.jit(fn)
    return self._programs[name](*args)

  def program(self, fn, in_specs, out_specs, donate=()):
    devices = self.devices if jax.process_count() == 1 else None
    return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=donate)

  def lower(self, fn, in_specs, out_specs, *args):
    return self.program(fn, in_specs, out_specs).lower(*args)

  def _evaluation(self, state, evaluate):
    def fn(s, images, labels, valid):
      return evaluate(self._pooled(s), images, labels, valid, local=True)

    return self.program(fn, None, None)

  def synchronize(self, state):
    if not self.per_device_bn:
      return state
    if "sync" not in self._programs:

      def pooled_over_devices(s):  # this device's rows pooled, then over the devices (equal weights)
        stats = jaxbn.sync_batch_stats(_pool_rows(s.batch_stats), AXIS)
        rows = jax.tree.map(lambda a: a.shape[0], s.batch_stats)
        return s.replace(batch_stats=jax.tree.map(lambda a, n: jnp.broadcast_to(a, (n, *a.shape)), stats, rows))

      self._programs["sync"] = self.program(pooled_over_devices, None, None)
    return self._programs["sync"](state)


STYLES: dict[str, type[Parallel]] = {style.name: style for style in (JitStyle, ShardMapStyle, PmapStyle)}


def make_parallel(style: str, devices, stat_rows: int | None = None) -> Parallel:
  """The implementation of `style` (a key of STYLES) over `devices`."""
  return STYLES[style](devices, stat_rows)
