"""The one place that spans the training and evaluation steps over devices.

Three styles, one run: `jit` (jax.jit over arrays sharded with NamedSharding
on an Explicit mesh), `shard_map` (jax.jit(jax.shard_map(...))) and `pmap`.
The host keeps the portable state (`state.TrainState`, one set of BN running
statistics per layer); `put_state` places it for the style and
`portable_state` brings it back. For per-device BN the running statistics
carry one row per device while training, in every style:

  jit        rows sharded over the mesh; BN's `batch_groups` makes each
             device's shard of the batch one group (no collective);
  shard_map  rows sharded over the mesh; each device sees its own row;
  pmap       rows on the pmapped axis; each device sees its own row.

`synchronize` pools the rows (law of total variance, `jaxbn.sync_batch_stats`)
before every evaluation and checkpoint, in every style.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from trainer import steps
from trainer.state import AXIS, TrainState


def _pool_rows(batch_stats):
  """One row per device -> the pooled statistics of the feature shape."""
  return jaxbn.sync_batch_stats(batch_stats)


def _widen_rows(batch_stats, rows: int):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (rows, *a.shape)), batch_stats)


class Parallel:
  """Places state and data and builds the parallel programs for one style."""

  def __init__(self, style: str, devices, stat_rows: int | None = None):
    """`stat_rows`: per-device BN's rows of running statistics (one per normalization
    group, each device holding stat_rows / devices of them); None: one set."""
    self.style, self.stat_rows = style, stat_rows
    self.per_device_bn = stat_rows is not None
    self.local = style != "jit"
    self.devices = list(devices)
    self.num_devices = len(self.devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,), axis_types=(AxisType.Explicit,))
    self._jitted = {}

  # ---- placement ------------------------------------------------------------

  def _put(self, tree, spec):
    """Host arrays (every process holds all of them) -> global arrays."""
    sharding = NamedSharding(self.mesh, spec)

    def put(a):
      a = np.asarray(a)
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)

  def replicate(self, tree):
    """The same value on every device (pmap: stacked on a leading axis)."""
    if self.style == "pmap":
      return self._put(jax.tree.map(lambda a: np.broadcast_to(a, (self.num_devices, *np.shape(a))), tree), P(AXIS))
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
    )

  def put_state(self, state: TrainState, rows=None) -> TrainState:
    """The portable state, placed for this style; per-device BN's `rows` (from
    `row_stats`), where given, instead of the portable state's pooled set."""
    state = jax.tree.map(np.asarray, state)
    stats = state.batch_stats
    if self.per_device_bn:
      stats = jax.tree.map(np.asarray, _widen_rows(stats, self.stat_rows) if rows is None else rows)
    rest = state.replace(batch_stats={})
    if self.style == "pmap":  # per-device BN: each device sees its own rows, (rows / devices, features)
      own_rows = lambda a: a.reshape(self.num_devices, -1, *a.shape[1:])
      stats = self.shard(jax.tree.map(own_rows, stats)) if self.per_device_bn else self.replicate(stats)
    else:
      stats = self._put(stats, self._stats_spec())
    return self.replicate(rest).replace(batch_stats=stats)

  def portable_state(self, state: TrainState) -> TrainState:
    """Host copy of the state with pooled running statistics (call after
    `synchronize`: then every device holds the same values)."""
    if self.style == "pmap":  # the first device's values; per-device statistics: its rows
      state = self._call("first", lambda s: jax.tree.map(lambda a: a[0], s), state)
    if self.per_device_bn:  # rows -> one set
      state = state.replace(batch_stats=self._call("pool", _pool_rows, state.batch_stats))
    return jax.tree.map(_host, state)

  def row_stats(self, state):
    """Per-device BN: the running statistics' rows, one per group, on the host."""

    def host(a):
      a = np.asarray(multihost_utils.process_allgather(a, tiled=True))
      return a.reshape(-1, *a.shape[2:]) if self.style == "pmap" else a  # pmap: (devices, rows / devices, ...)

    return jax.tree.map(host, state.batch_stats)

  # ---- programs -------------------------------------------------------------

  def _call(self, name, fn, *args):
    """A small jitted program on placed arrays (pmap's arrays carry no explicit mesh)."""
    if name not in self._jitted:
      self._jitted[name] = jax.jit(fn)
    if self.style == "pmap":
      return self._jitted[name](*args)
    with jax.set_mesh(self.mesh):
      return self._jitted[name](*args)

  def _wrap(self, fn, in_specs, out_specs, donate=()):
    """fn written per device (local=True) or globally (local=False) -> a parallel program."""
    if self.style == "pmap":
      devices = self.devices if jax.process_count() == 1 else None
      return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=donate)
    if self.style == "shard_map":
      fn = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
    jitted = jax.jit(fn, donate_argnums=donate)

    def run(*args):
      with jax.set_mesh(self.mesh):
        return jitted(*args)

    return run

  def train_step(self, state, resident: bool, **kwargs):
    """The program of one step: (state, images, labels[, index]) -> (state, loss).

    `resident`: images/labels are the whole training split, replicated
    (`replicate`), and index the batch's example indices (`put_batch` rows under
    shard_map/pmap, replicated under jit); otherwise the step's batch (`put_batch`).
    """
    key = ("step", resident, kwargs.get("frozen_bn", False))
    if key not in self._jitted:
      specs = self._state_specs(state) if self.style == "shard_map" else None
      data = (P(), P(), P(AXIS)) if resident else (P(AXIS), P(AXIS))
      fn = functools.partial(
        steps.train_batch,
        num_devices=self.num_devices,
        local=self.local,
        **kwargs,
        batch_sharding=None if self.local else P(AXIS),
      )
      self._jitted[key] = self._wrap(fn, (specs, *data), (specs, P()), donate=(0,))
    return self._jitted[key]

  def put_batch(self, rows: np.ndarray):
    """This process's rows of a global batch (rows, ...) -> the program's input."""
    if self.style == "pmap":  # (devices, per_device, ...): pmap places each device's share
      return rows.reshape(len(self.local_devices), -1, *rows.shape[1:])
    sharding = NamedSharding(self.mesh, P(AXIS))
    global_rows = rows.shape[0] * self.num_devices // len(self.local_devices)
    return jax.make_array_from_process_local_data(sharding, rows, (global_rows, *rows.shape[1:]))

  def evaluate(self, state, batches, *, model, pixels, batch_stats_groups=None):
    """Sums over the test set (host floats) and the tracked values of its examples.

    `batches` yields this process's devices' shares (local_devices, chunk, ...)
    of images, labels and `valid`. `model` is the portable one
    (`make_model(config)`): evaluation reads one set of running statistics, the
    pooled one (call after `synchronize`).
    """
    key = ("eval", batch_stats_groups)
    if key not in self._jitted:
      evaluate = functools.partial(steps.eval_step, model=model, pixels=pixels, batch_stats_groups=batch_stats_groups)

      def pooled(s):
        if not self.per_device_bn:
          return s
        if self.local:  # this device's row, already the pooled set
          return s.replace(batch_stats=jax.tree.map(lambda a: a[0], s.batch_stats))
        return s.replace(batch_stats=_pool_rows(s.batch_stats))

      if self.local:

        def fn(s, images, labels, valid):
          if self.style == "shard_map":  # this device's (1, chunk, ...) share
            images, labels, valid = images[0], labels[0], valid[0]
          sums, tracked = evaluate(pooled(s), images, labels, valid, local=True)
          return sums, (tracked[None] if self.style == "shard_map" else tracked)

        specs = self._state_specs(state) if self.style == "shard_map" else None
        self._jitted[key] = self._wrap(fn, (specs, P(AXIS), P(AXIS), P(AXIS)), (P(), P(AXIS)))
      else:  # under jit: every device's share at once, then the sums

        def fn(s, images, labels, valid):
          per_device = jax.vmap(functools.partial(evaluate, local=False), in_axes=(None, 0, 0, 0))
          sums, tracked = per_device(pooled(s), images, labels, valid)
          return jax.tree.map(lambda a: a.sum(0), sums), tracked

        self._jitted[key] = self._wrap(fn, None, None)
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    tracked_all = []
    read = _host_first if self.style == "pmap" else _host
    for images, labels, valid in batches:
      sums, tracked = self._jitted[key](state, *self._put_local_rows((images, labels, valid)))
      for name, value in sums.items():
        totals[name] += float(read(value))
      tracked = np.asarray(multihost_utils.process_allgather(tracked, tiled=True)).reshape(-1)
      valid = np.asarray(multihost_utils.process_allgather(valid, tiled=True)).reshape(-1)
      tracked_all.append(tracked[valid])
    return totals, np.concatenate(tracked_all)

  def _put_local_rows(self, tree):
    """Arrays with a leading axis of this process's devices -> one entry per device globally."""
    if self.style == "pmap":
      return tree
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, a, (self.num_devices, *a.shape[1:])), tree
    )

  def synchronize(self, state):
    """Per-device BN: every device's running statistics := the pooled ones."""
    if not self.per_device_bn:
      return state
    if self.style == "pmap":
      if "sync" not in self._jitted:

        def pooled_over_devices(s):  # this device's rows pooled, then over the devices (equal weights)
          stats = jaxbn.sync_batch_stats(_pool_rows(s.batch_stats), AXIS)
          rows = jax.tree.map(lambda a: a.shape[0], s.batch_stats)
          return s.replace(batch_stats=jax.tree.map(lambda a, n: jnp.broadcast_to(a, (n, *a.shape)), stats, rows))

        self._jitted["sync"] = jax.pmap(
          pooled_over_devices,
          axis_name=AXIS,
          devices=self.devices if jax.process_count() == 1 else None,
        )
      return self._jitted["sync"](state)

    def pooled(s):  # rows := the pooled set, still one row per group
      rows = _widen_rows(_pool_rows(s.batch_stats), self.stat_rows)
      return s.replace(batch_stats=jax.tree.map(lambda a: jax.sharding.reshard(a, P(AXIS)), rows))

    return self._call("sync", pooled, state)


def _host(array) -> np.ndarray:
  """A replicated global array's value, read on this process."""
  return np.asarray(array.addressable_shards[0].data)


def _host_first(array) -> np.ndarray:
  """pmap: the value on this process's first device."""
  return np.asarray(array.addressable_shards[0].data)[0]
