"""Synced BN on 8 devices equals BN of the concatenated global batch."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import reference as ref

R = 8  # replicas
CAP = 6  # per-replica capacity (rows), padded
C = 3  # features


def _require_devices():
  assert jax.device_count() == R, "tests/conftest.py must provide 8 CPU devices"


def _split(counts, x_global, mask_global, seed):
  """Pads each replica to CAP rows; padding is finite garbage, marked invalid."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(50.0, 30.0, (R, CAP, C)).astype(np.float32)
  ms = np.zeros((R, CAP, C), bool)
  start = 0
  for r, n in enumerate(counts):
    xs[r, :n] = x_global[start : start + n]
    ms[r, :n] = mask_global[start : start + n]
    start += n
  return xs, ms


def _loss_and_stats(axis_name):
  def loss(x, scale, bias, mask, g):
    y, new = jaxbn.batch_norm(
      x,
      {"scale": scale, "bias": bias},
      {"mean": jnp.zeros(C), "var": jnp.ones(C)},
      training=True,
      momentum=0.0,
      axis_name=axis_name,
      mask=mask,
    )
    return jnp.sum(y * g), (y, new)

  return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)


@functools.cache
def _pmapped():
  return jax.pmap(_loss_and_stats("r"), axis_name="r", in_axes=(0, None, None, 0, 0))


@functools.cache
def _shard_mapped():
  mesh = jax.make_mesh((R,), ("r",))

  def run(x, scale, bias, mask, g):
    (_l, (y, new)), (dx, ds, db) = _loss_and_stats("r")(x[0], scale, bias, mask[0], g[0])
    return y[None], new, dx[None], ds, db

  fn = jax.jit(
    jax.shard_map(
      run, mesh=mesh, in_specs=(P("r"), P(), P(), P("r"), P("r")), out_specs=(P("r"), P(), P("r"), P(), P())
    )
  )
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P("r")))
  return lambda x, s, b, m, g: fn(put(x), s, b, put(m), put(g))


def _check_synced_equals_global(runner, counts, seed, per_device_params):
  _require_devices()
  rng = np.random.default_rng(seed)
  total = sum(counts)
  x_global = rng.normal(rng.uniform(-5, 5, C), rng.uniform(0.5, 3, C), (total, C)).astype(np.float32)
  mask_global = rng.random((total, C)) < 0.8
  mask_global[:2] = True  # at least two valid values per feature
  scale = rng.normal(1, 0.3, C).astype(np.float32)
  bias = rng.normal(0, 0.3, C).astype(np.float32)
  xs, ms = _split(counts, x_global, mask_global, seed)
  gs = rng.normal(size=(R, CAP, C)).astype(np.float32)

  y, new, dx, dscale, dbias = runner(xs, scale, bias, ms, gs)

  # Oracle: the global batch is every row of every replica (padding included,
  # since those outputs also depend on the statistics), with the valid mask.
  x_all, m_all, g_all = xs.reshape(-1, C), ms.reshape(-1, C), gs.reshape(-1, C)
  y_ref, (_, mean, var) = ref.bn_forward(x_all, scale, bias, mask=m_all)
  dx_ref, dscale_ref, dbias_ref = ref.bn_backward(x_all, scale, g_all, mask=m_all)
  np.testing.assert_allclose(np.asarray(new["mean"]).reshape(-1, C)[0], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new["var"]).reshape(-1, C)[0], var, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, C), y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx).reshape(-1, C), dx_ref, rtol=1e-4, atol=1e-4 * np.abs(dx_ref).max())
  if per_device_params:  # pmap: each device holds its share; they sum to the total
    dscale, dbias = np.sum(dscale, 0), np.sum(dbias, 0)
  np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-4, atol=1e-4)


def _pmap_runner(xs, scale, bias, ms, gs):
  (_, (y, new)), (dx, ds, db) = _pmapped()(xs, scale, bias, ms, gs)
  return y, new, dx, ds, db


counts_strategy = st.lists(st.integers(0, CAP), min_size=R, max_size=R).filter(lambda c: sum(c) >= 2)


@settings(max_examples=25, deadline=None)
@given(counts=counts_strategy, seed=st.integers(0, 2**16))
def test_pmap_synced_equals_global_batch(counts, seed):
  _check_synced_equals_global(_pmap_runner, counts, seed, per_device_params=True)


@settings(max_examples=15, deadline=None)
@given(counts=counts_strategy, seed=st.integers(0, 2**16))
def test_shard_map_synced_equals_global_batch(counts, seed):
  _check_synced_equals_global(_shard_mapped(), counts, seed, per_device_params=False)


@pytest.mark.parametrize("counts", [[CAP] * R, [0, 0, 0, CAP, 0, 0, 0, 1], [1, 2, 3, 4, 5, 6, 0, 6]])
def test_named_splits_equal_global_batch(counts):
  """Equal replicas, empty replicas and ragged replicas, under both transforms."""
  _check_synced_equals_global(_pmap_runner, counts, 0, per_device_params=True)
  _check_synced_equals_global(_shard_mapped(), counts, 1, per_device_params=False)


def test_vmap_axis_name_equals_global_batch():
  rng = np.random.default_rng(3)
  x = rng.normal(2, 3, (R, CAP, C)).astype(np.float32)
  fn = jax.vmap(lambda x: jaxbn.moments(x, axis_name="v"), axis_name="v")
  m = fn(x)
  _, mean, var = ref.batch_moments(x.reshape(-1, C))
  np.testing.assert_allclose(m.mean[3], mean, rtol=1e-5)
  np.testing.assert_allclose(m.var[5], var, rtol=1e-5)
  np.testing.assert_array_equal(m.count[0], [R * CAP] * C)


def test_synced_stats_stable_at_large_offset():
  _require_devices()
  rng = np.random.default_rng(4)
  x = (1e4 + rng.normal(size=(R, 512, C))).astype(np.float32)
  m = jax.pmap(lambda x: jaxbn.moments(x, axis_name="r"), axis_name="r")(x)
  _, mean, var = ref.batch_moments(x.reshape(-1, C))
  np.testing.assert_allclose(m.var[0], var, rtol=1e-3)
  np.testing.assert_allclose(m.mean[0], mean, rtol=1e-6)


def test_axis_index_groups_give_each_groups_statistics():
  _require_devices()
  groups = [[0, 3, 5], [1, 2], [4, 6, 7]]
  rng = np.random.default_rng(5)
  x = rng.normal(1, 2, (R, CAP, C)).astype(np.float32)
  m = jax.pmap(lambda x: jaxbn.moments(x, axis_name="r", axis_index_groups=groups), axis_name="r")(x)
  for group in groups:
    _, mean, var = ref.batch_moments(x[group].reshape(-1, C))
    for r in group:
      np.testing.assert_allclose(m.mean[r], mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(m.var[r], var, rtol=1e-5)


def test_per_device_mode_equals_bn_of_each_shard():
  _require_devices()
  rng = np.random.default_rng(6)
  x = rng.normal(size=(R, CAP, C)).astype(np.float32) * rng.uniform(0.5, 2, (R, 1, 1)).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  scale = np.full(C, 1.5, np.float32)
  stats = {"mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}

  def step(x, g):
    def loss(x):
      y, new = jaxbn.batch_norm(x, {"scale": scale}, stats, training=True, momentum=0.0)
      return jnp.sum(y * g), (y, new)

    return jax.grad(loss, has_aux=True)(x)

  dx, (y, new) = jax.pmap(step, axis_name="r")(x, g)
  for r in range(R):
    y_ref, (_, _mean, var) = ref.bn_forward(x[r], scale, np.zeros(C))
    np.testing.assert_allclose(y[r], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["var"][r], var, rtol=1e-5)
    np.testing.assert_allclose(dx[r], ref.bn_backward(x[r], scale, g[r])[0], rtol=1e-4, atol=1e-4)
  assert not np.allclose(new["var"][0], new["var"][1])  # statistics really are per device


# ---- collectives in the lowered program -----------------------------------


def _count_collectives(hlo_text):
  return {
    op: len(re.findall(rf"\b{op}\b", hlo_text))
    for op in ("all_gather", "all_reduce", "all_to_all", "collective_permute", "reduce_scatter")
  }


def _bn_program(layer, grad):
  x = np.ones((R, 16, 4, 4, 8), np.float32)
  variables = layer.init(jax.random.key(0), x[0])

  def fwd(variables, x):
    y, upd = layer.apply(variables, x, mutable=["batch_stats"])
    return jnp.sum(y * y), upd

  fn = jax.grad(fwd, argnums=(0, 1), has_aux=True) if grad else fwd
  variables = jax.tree.map(lambda t: np.broadcast_to(t, (R, *t.shape)), variables)
  return jax.pmap(fn, axis_name="r").lower(variables, x).as_text()


def test_one_collective_forward_and_one_backward():
  _require_devices()
  layer = jaxbn.BatchNorm(use_running_average=False, axis_name="r")
  fwd = _count_collectives(_bn_program(layer, grad=False))
  both = _count_collectives(_bn_program(layer, grad=True))
  assert fwd == {"all_gather": 1, "all_reduce": 0, "all_to_all": 0, "collective_permute": 0, "reduce_scatter": 0}, fwd
  assert both == {"all_gather": 1, "all_reduce": 1, "all_to_all": 0, "collective_permute": 0, "reduce_scatter": 0}, both


def test_flax_reference_program_has_collectives_too():
  """The counting above is not vacuous: flax's synced BN shows its collectives."""
  _require_devices()
  counts = _count_collectives(_bn_program(nn.BatchNorm(use_running_average=False, axis_name="r"), grad=True))
  assert counts["all_reduce"] >= 2
