"""Per-device (grouped) and global statistics under jax.jit with a sharded batch.

Oracles: pmap's per-device mode (each device's own batch), BN of the
concatenated global batch (NumPy float64), and collectives counted in the
compiled HLO.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import reference as ref

D, B, C = 8, 6, 5  # devices, examples per device, features
MODES = [AxisType.Explicit, AxisType.Auto]


def _data(seed=0):
  rng = np.random.default_rng(seed)
  # Each device's batch has its own location and spread, so per-device and
  # global statistics differ clearly.
  x = rng.normal(size=(D, B, C)) * rng.uniform(0.5, 3, (D, 1, 1)) + rng.normal(0, 2, (D, 1, 1))
  g = rng.normal(size=(D, B, C))
  mask = rng.random((D, B, C)) < 0.75
  mask[:, :2] = True
  scale = rng.normal(1, 0.3, C).astype(np.float32)
  bias = rng.normal(0, 0.3, C).astype(np.float32)
  stats = {"mean": rng.normal(size=C).astype(np.float32), "var": rng.uniform(0.5, 2, C).astype(np.float32)}
  return x.astype(np.float32), g.astype(np.float32), mask, scale, bias, stats


def _mesh(mode):
  assert jax.device_count() == D
  return jax.make_mesh((D,), ("data",), axis_types=(mode,))


def _shard(mesh, a):
  """(devices, per-device, features) -> the global batch, sharded over the devices."""
  return jax.device_put(a.reshape(D * B, C), NamedSharding(mesh, P("data")))


def _collectives(compiled_text):
  ops = re.findall(
    r"= [^=]*? (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", compiled_text
  )
  return {op: ops.count(op) for op in sorted(set(ops))}


def _step(batch_groups, mask=None):
  def step(x, g, scale, bias, stats):
    def loss(x, scale, bias):
      y, new = jaxbn.batch_norm(
        x, {"scale": scale, "bias": bias}, stats, training=True, momentum=0.9, batch_groups=batch_groups, mask=mask
      )
      return jnp.sum(y * g), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias)
    return y, new, grads

  return step


@pytest.mark.parametrize("mode", MODES)
def test_grouped_under_jit_equals_pmap_per_device(mode):
  x, g, _, scale, bias, stats = _data()
  mesh = _mesh(mode)
  with jax.set_mesh(mesh):
    put = lambda a: _shard(mesh, a)
    y, new, (dx, dscale, dbias) = jax.jit(_step(D))(put(x), put(g), scale, bias, stats)
  assert new["mean"].shape == (D, C)

  y_p, new_p, (dx_p, dscale_p, dbias_p) = jax.pmap(_step(None), axis_name="d", in_axes=(0, 0, None, None, None))(
    x, g, scale, bias, stats
  )
  np.testing.assert_allclose(np.asarray(y).reshape(D, B, C), y_p, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dx).reshape(D, B, C), dx_p, rtol=1e-5, atol=1e-5)
  for key in ("mean", "var"):  # each group's running statistics are its device's
    np.testing.assert_allclose(new[key], new_p[key], rtol=1e-6, atol=1e-6)
  # A replicated parameter's gradient is the sum of the devices' shares.
  np.testing.assert_allclose(dscale, dscale_p.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dbias, dbias_p.sum(0), rtol=1e-5, atol=1e-5)
  # And the oracle of the oracle: NumPy BN of each device's batch.
  for d in range(D):
    np.testing.assert_allclose(y_p[d], ref.bn_forward(x[d], scale, bias)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_grouped_compiles_to_no_collective(mode):
  x, g, _, scale, bias, stats = _data()
  mesh = _mesh(mode)
  with jax.set_mesh(mesh):
    put = lambda a: _shard(mesh, a)
    args = (put(x), put(g), scale, bias, stats)

    def forward(x, g, scale, bias, stats):  # output and updated running statistics
      return jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, stats, training=True, batch_groups=D)

    def input_gradient(x, g, scale, bias, stats):
      return jax.grad(lambda x: jnp.sum(forward(x, g, scale, bias, stats)[0] * g))(x)

    assert _collectives(jax.jit(forward).lower(*args).compile().as_text()) == {}
    assert _collectives(jax.jit(input_gradient).lower(*args).compile().as_text()) == {}
    # Global statistics under the same jit: XLA inserts the all-reduces.
    global_forward = lambda x, *a: jaxbn.batch_norm(x, {"scale": a[1]}, a[3], training=True)[0]
    assert _collectives(jax.jit(global_forward).lower(*args).compile().as_text()).get("all-reduce", 0) >= 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_plain_bn_under_jit_is_the_global_batch(mode, masked):
  x, g, mask, scale, bias, stats = _data(seed=1)
  mask = mask if masked else None
  mesh = _mesh(mode)
  with jax.set_mesh(mesh):
    put = lambda a: _shard(mesh, a)
    m = None if mask is None else put(mask)
    y, new, (dx, dscale, _dbias) = jax.jit(lambda *a: _step(None, m)(*a))(put(x), put(g), scale, bias, stats)
  flat = lambda a: None if a is None else a.reshape(D * B, C)
  y_ref, (_, mean, var) = ref.bn_forward(flat(x), scale, bias, mask=flat(mask))
  dx_ref, dscale_ref, _dbias_ref = ref.bn_backward(flat(x), scale, flat(g), mask=flat(mask))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4 * np.abs(dx_ref).max())
  np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new["mean"], ref.running_update(stats["mean"], mean, 0.9), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], ref.running_update(stats["var"], var, 0.9), rtol=1e-5, atol=1e-6)


def test_ghost_batches_on_one_device():
  """batch_groups is ghost/virtual BN whatever the device count."""
  x, _, mask, scale, bias, stats = _data(seed=2)
  flat_x, flat_mask = x.reshape(D * B, C), mask.reshape(D * B, C)
  y, new = jaxbn.batch_norm(
    flat_x,
    {"scale": scale, "bias": bias},
    stats,
    training=True,
    batch_groups=4,
    mask=flat_mask,
    unbiased=True,
    momentum=0.5,
  )
  groups = flat_x.reshape(4, -1, C)
  for k, (xg, mg) in enumerate(zip(groups, flat_mask.reshape(4, -1, C), strict=True)):
    y_ref, (count, mean, var) = ref.bn_forward(xg, scale, bias, mask=mg)
    np.testing.assert_allclose(np.asarray(y).reshape(4, -1, C)[k], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"][k], ref.running_update(stats["mean"], mean, 0.5), rtol=1e-5)
    np.testing.assert_allclose(
      new["var"][k], ref.running_update(stats["var"], var * count / (count - 1), 0.5), rtol=1e-5
    )
  # NCHW: the batch axis is 0 and the features are axis 1.
  x4 = np.random.default_rng(3).normal(size=(8, C, 3, 3)).astype(np.float32)
  y4, _ = jaxbn.batch_norm(x4, None, stats, training=True, axis=1, batch_groups=2)
  np.testing.assert_allclose(y4[4:], ref.bn_forward(x4[4:], np.ones(C), np.zeros(C), axis=1)[0], rtol=1e-5, atol=1e-5)


def test_grouped_inference_pools_the_groups():
  x, *_ = _data(seed=4)
  rng = np.random.default_rng(5)
  grouped = {"mean": rng.normal(size=(D, C)), "var": rng.uniform(0.5, 2, (D, C))}
  pooled = {
    "mean": grouped["mean"].mean(0),
    "var": grouped["var"].mean(0) + grouped["mean"].var(0),
  }  # the law of total variance
  y, same = jaxbn.batch_norm(x, None, grouped, training=False, batch_groups=D)
  np.testing.assert_allclose(y, (x - pooled["mean"]) / np.sqrt(pooled["var"] + 1e-5), rtol=1e-5, atol=1e-5)
  assert same is grouped
  np.testing.assert_allclose(jaxbn.sync_batch_stats({"bn": grouped})["bn"]["var"], pooled["var"], rtol=1e-6)


def test_grouped_errors_name_the_argument():
  x = np.ones((12, 3), np.float32)
  stats = {"mean": np.zeros(3), "var": np.ones(3)}
  with pytest.raises(ValueError, match=r"batch_groups: the batch axis 0 has 12 examples, which do not split into 5"):
    jaxbn.batch_norm(x, None, stats, training=True, batch_groups=5)
  with pytest.raises(ValueError, match="batch_groups: expected a positive integer"):
    jaxbn.batch_norm(x, None, stats, training=True, batch_groups=0)
  with pytest.raises(ValueError, match=r"batch_groups: .* cannot be combined with axis_name"):
    jax.vmap(lambda x: jaxbn.batch_norm(x, None, stats, training=True, batch_groups=2, axis_name="b"), axis_name="b")(
      np.ones((2, 12, 3), np.float32)
    )
  with pytest.raises(ValueError, match=r"batch_axis: expected an axis before every feature axis"):
    jaxbn.batch_norm(
      np.ones((3, 12)),
      None,
      {"mean": np.zeros(3), "var": np.ones(3)},
      training=True,
      axis=0,
      batch_axis=1,
      batch_groups=2,
    )
  with pytest.raises(ValueError, match=r'stats\["mean"\]: expected shape \(3,\) or, one set per group, \(4, 3\)'):
    jaxbn.batch_norm(x, None, {"mean": np.zeros((2, 3)), "var": np.ones(3)}, training=True, batch_groups=4)


# ---- the modules -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_linen_module_per_device_under_jit(mode):
  x, *_ = _data(seed=6)
  layer = jaxbn.BatchNorm(use_running_average=False, momentum=0.9, batch_groups=D)
  variables = layer.init(jax.random.key(0), jnp.ones((1, C)))  # init with a batch of one
  assert variables["batch_stats"]["mean"].shape == (D, C)
  mesh = _mesh(mode)
  with jax.set_mesh(mesh):
    xs = _shard(mesh, x)
    y, updates = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))(variables, xs)
  updates = jax.tree.map(np.asarray, updates)
  plain = jaxbn.BatchNorm(use_running_average=False, momentum=0.9)
  plain_vars = plain.init(jax.random.key(0), x[0])
  for d in range(D):
    y_d, upd_d = plain.apply(plain_vars, x[d], mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y).reshape(D, B, C)[d], y_d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"][d], upd_d["batch_stats"]["var"], rtol=1e-6)
  # Evaluation pools the per-device statistics, as sync_batch_stats would.
  evaluated = layer.clone(use_running_average=True).apply({**variables, **updates}, x.reshape(D * B, C))
  pooled = jaxbn.sync_batch_stats(updates["batch_stats"])
  expected = plain.clone(use_running_average=True).apply({**plain_vars, "batch_stats": pooled}, x.reshape(D * B, C))
  np.testing.assert_allclose(evaluated, expected, rtol=1e-6, atol=1e-6)


def test_flax_bn_under_jit_is_silently_global():
  """The pitfall jaxbn's batch_groups answers: flax's axis_name=None is global under jit."""
  x, *_ = _data(seed=7)
  mesh = _mesh(AxisType.Explicit)
  layer = nn.BatchNorm(use_running_average=False)
  variables = layer.init(jax.random.key(0), x[0])
  with jax.set_mesh(mesh):
    xs = _shard(mesh, x)
    y, _ = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))(variables, xs)
  np.testing.assert_allclose(y, ref.bn_forward(x.reshape(D * B, C), np.ones(C), np.zeros(C))[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_device", [True, False])
def test_nnx_under_jit_and_shard_map(per_device):
  """nnx.jit with a sharded batch, and nnx.shard_map with a replicated model:
  the same outputs and statistics."""
  x, *_ = _data(seed=8)
  mesh = _mesh(AxisType.Explicit)

  def model(axis_name=None):
    return jaxbn.nnx.BatchNorm(
      C,
      use_running_average=False,
      momentum=0.9,
      rngs=nnx.Rngs(0),
      batch_groups=D if per_device else None,
      axis_name=axis_name,
    )

  with jax.set_mesh(mesh):
    xs = _shard(mesh, x)
    jitted = model()
    y_jit = nnx.jit(lambda m, x: m(x))(jitted, xs)

    mapped = model(axis_name=None if per_device else "data")
    # Per-device statistics live one row per device.
    stats = nnx.state(mapped, nnx.BatchStat)
    nnx.update(mapped, jax.device_put(stats, NamedSharding(mesh, P("data") if per_device else P())))
    # Parameters replicated; per-device statistics sharded (one row per device).
    stats_spec = P("data") if per_device else P()
    state_spec = nnx.StateSharding({nnx.BatchStat: stats_spec, ...: P()})
    run = nnx.shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(state_spec, P("data")), out_specs=P("data"))
    y_map = nnx.jit(run)(mapped, xs)

  np.testing.assert_allclose(y_jit, y_map, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jitted.mean[...], mapped.mean[...], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jitted.var[...], mapped.var[...], rtol=1e-6, atol=1e-6)
  if per_device:
    y_ref = np.concatenate([ref.bn_forward(x[d], np.ones(C), np.zeros(C))[0] for d in range(D)])
  else:
    y_ref = ref.bn_forward(x.reshape(D * B, C), np.ones(C), np.zeros(C))[0]
  np.testing.assert_allclose(y_jit, y_ref, rtol=1e-5, atol=1e-5)
