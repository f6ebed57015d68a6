"""Batch Renormalization and BN folding, against NumPy float64 and batch_norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxbn
from tests import reference as ref


def renorm_reference(x, scale, bias, stats, r_max, d_max, eps=1e-5, axis=-1):
  """Ioffe 2017, Algorithm 1, in float64: y and (r, d)."""
  _, (_count, mean, var) = ref.bn_forward(x, scale, bias, axis, eps)
  sigma_b = np.sqrt(var + eps)
  sigma = np.sqrt(np.asarray(stats["var"], np.float64) + eps)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mean - stats["mean"]) / sigma, -d_max, d_max)
  faxes = jaxbn.functional.feature_axes(x.ndim, axis)
  e = lambda v: np.expand_dims(v, tuple(a for a in range(x.ndim) if a not in faxes))
  xhat = (np.asarray(x, np.float64) - e(mean)) / e(sigma_b)
  return e(scale) * (xhat * e(r) + e(d)) + e(bias), (r, d, mean, var, xhat)


def _data(shape=(32, 4), seed=0, axis=-1):
  rng = np.random.default_rng(seed)
  c = shape[axis]
  x = rng.normal(2.0, 3.0, shape).astype(np.float32)
  scale = rng.normal(1, 0.3, c).astype(np.float32)
  bias = rng.normal(0, 0.3, c).astype(np.float32)
  # Running statistics far enough from the batch's that r and d clip for some features.
  stats = {
    "mean": np.array([2.0, 0.0, 5.0, 2.5][:c], np.float32) if c == 4 else rng.normal(size=c).astype(np.float32),
    "var": np.array([9.0, 1.0, 100.0, 4.0][:c], np.float32) if c == 4 else rng.uniform(1, 9, c).astype(np.float32),
  }
  return x, scale, bias, stats


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0)])
def test_forward_running_stats_and_gradient_match_numpy(r_max, d_max):
  x, scale, bias, stats = _data()
  g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)

  def loss(x, scale, bias):
    y, new = jaxbn.batch_renorm(
      x, {"scale": scale, "bias": bias}, stats, training=True, r_max=r_max, d_max=d_max, momentum=0.9
    )
    return jnp.sum(y * g), (y, new)

  (_, (y, new)), (dx, dscale, dbias) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias)
  y_ref, (r, d, mean, var, xhat) = renorm_reference(x, scale, bias, stats, r_max, d_max)
  assert np.any(r == r_max) or np.any(r == 1 / r_max) or np.any(np.abs(d) == d_max)  # clipping happened
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["mean"], ref.running_update(stats["mean"], mean, 0.9), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], ref.running_update(stats["var"], var, 0.9), rtol=1e-5, atol=1e-6)
  # r and d are constants: dx is BN's gradient with scale*r; dscale sees r*xhat + d.
  dx_ref = ref.bn_backward(x, scale * r, g)[0]
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4 * np.abs(dx_ref).max())
  np.testing.assert_allclose(dscale, (g * (xhat * r + d)).sum(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dbias, g.sum(0), rtol=1e-5, atol=1e-5)


def test_r_max_1_d_max_0_is_batch_norm():
  x, scale, bias, stats = _data(shape=(6, 4, 3, 5), axis=1, seed=2)
  params = {"scale": scale[:4], "bias": bias[:4]}
  stats = {"mean": stats["mean"][:4], "var": stats["var"][:4]}
  f = lambda fn, **kw: jax.value_and_grad(
    lambda x, p: jnp.sum(jnp.sin(fn(x, p, stats, training=True, axis=1, **kw)[0])), (0, 1)
  )(x, params)
  renorm, bn = f(jaxbn.batch_renorm, r_max=1.0, d_max=0.0), f(jaxbn.batch_norm)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), renorm, bn)


def test_unclipped_training_output_is_the_inference_output():
  x, scale, bias, stats = _data(seed=3)
  params = {"scale": scale, "bias": bias}
  y_train, _ = jaxbn.batch_renorm(x, params, stats, training=True, r_max=1e6, d_max=1e6)
  y_infer, same = jaxbn.batch_renorm(x, params, stats, training=False, r_max=1e6, d_max=1e6)
  np.testing.assert_allclose(y_train, y_infer, rtol=1e-5, atol=1e-5)
  assert same is stats


def test_inference_needs_no_limits_and_training_names_the_missing_one():
  x, scale, bias, stats = _data(seed=4)
  params = {"scale": scale, "bias": bias}
  y, same = jaxbn.batch_renorm(x, params, stats, training=False)
  bn, _ = jaxbn.batch_norm(x, params, stats, training=False)
  np.testing.assert_array_equal(y, bn)  # inference is BN's
  assert same is stats
  with pytest.raises(ValueError, match=r"^d_max: .*training"):
    jaxbn.batch_renorm(x, params, stats, training=True, r_max=3.0)
  with pytest.raises(ValueError, match=r"^r_max: .*training"):
    jaxbn.batch_renorm(x, params, stats, training=True, d_max=5.0)


def test_synced_equals_the_global_batch_and_limits_may_be_traced():
  x, scale, bias, stats = _data(shape=(32, 4), seed=4)
  run = jax.jit(
    jax.vmap(
      lambda x, r_max, d_max: jaxbn.batch_renorm(
        x, {"scale": scale, "bias": bias}, stats, training=True, r_max=r_max, d_max=d_max, axis_name="r"
      )[0],
      in_axes=(0, None, None),
      axis_name="r",
    )
  )
  y = run(x.reshape(4, 8, 4), jnp.float32(1.5), jnp.float32(0.5))
  np.testing.assert_allclose(
    y.reshape(32, 4), renorm_reference(x, scale, bias, stats, 1.5, 0.5)[0], rtol=1e-5, atol=1e-5
  )


def test_schedule():
  schedule = jaxbn.renorm_schedule(100, warmup_steps=10)
  for step, (r, d) in ((0, (1, 0)), (10, (1, 0)), (60, (2, 2.5)), (110, (3, 5)), (10_000, (3, 5))):
    np.testing.assert_allclose(schedule(step), (r, d), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(35)), (1.5, 1.25), rtol=1e-6)
  with pytest.raises(ValueError, match="ramp_steps"):
    jaxbn.renorm_schedule(0)


def test_modules_share_the_function_and_bn_layout():
  x, scale, bias, stats = _data(seed=5)
  layer = jaxbn.BatchRenorm(use_running_average=False, momentum=0.9, r_max=1.5, d_max=0.5)
  # BN's layout: the same variables, names, shapes and dtypes, so checkpoints interchange
  bn_variables = jaxbn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  renorm_variables = layer.init(jax.random.key(0), x)
  shape_of = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert shape_of(bn_variables) == shape_of(renorm_variables)
  jax.tree.map(np.testing.assert_array_equal, bn_variables, renorm_variables)
  variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
  y, upd = layer.apply(variables, x, mutable=["batch_stats"])
  y_fn, new = jaxbn.batch_renorm(x, variables["params"], stats, training=True, r_max=1.5, d_max=0.5, momentum=0.9)
  np.testing.assert_array_equal(y, y_fn)
  np.testing.assert_array_equal(upd["batch_stats"]["var"], new["var"])
  y_call, _ = layer.apply(variables, x, r_max=1.0, d_max=0.0, mutable=["batch_stats"])  # per-call limits
  np.testing.assert_allclose(
    y_call, jaxbn.batch_norm(x, variables["params"], stats, training=True)[0], rtol=1e-6, atol=1e-6
  )

  m = jaxbn.nnx.BatchRenorm(4, momentum=0.9, r_max=1.5, d_max=0.5, rngs=nnx.Rngs(0))
  m.scale[...], m.bias[...], m.mean[...], m.var[...] = scale, bias, stats["mean"], stats["var"]
  np.testing.assert_array_equal(m(x), y)
  np.testing.assert_array_equal(m.var[...], new["var"])


@pytest.mark.parametrize("layer", ["dense", "conv"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_folding_gives_the_same_output(layer, use_bias):
  rng = np.random.default_rng(6)
  make = (
    (lambda: nn.Dense(5, use_bias=use_bias))
    if layer == "dense"
    else (lambda: nn.Conv(5, (3, 3), padding="SAME", use_bias=use_bias))
  )
  x = rng.normal(size=(4, 7) if layer == "dense" else (2, 6, 6, 3)).astype(np.float32)
  linear = make()
  lin_vars = linear.init(jax.random.key(0), x)
  if use_bias:
    lin_vars = {"params": {**lin_vars["params"], "bias": rng.normal(size=5).astype(np.float32)}}
  bn_params = {"scale": rng.normal(1, 0.3, 5).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)}
  bn_stats = {"mean": rng.normal(size=5).astype(np.float32), "var": rng.uniform(0.5, 2, 5).astype(np.float32)}
  expected = jaxbn.BatchNorm(use_running_average=True, epsilon=1e-3).apply(
    {"params": bn_params, "batch_stats": bn_stats}, linear.apply(lin_vars, x)
  )
  kernel, bias = jaxbn.fold_batch_norm(
    lin_vars["params"]["kernel"], lin_vars["params"].get("bias"), bn_params, bn_stats, epsilon=1e-3
  )
  folded = make().clone(use_bias=True).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"bn_stats\['mean'\]: expected shape \(5,\)"):
    jaxbn.fold_batch_norm(kernel, bias, bn_params, {"mean": np.zeros(4), "var": np.ones(5)})


def test_per_device_renorm_corrects_toward_the_pooled_statistics():
  """Grouped under jit, or one row per device under shard_map with
  stats_axis_name: the same r and d, against the pooled running statistics."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == 8
  rng = np.random.default_rng(7)
  x = (rng.normal(size=(8, 6, 4)) * rng.uniform(0.5, 2, (8, 1, 1)) + rng.normal(0, 1, (8, 1, 1))).astype(np.float32)
  rows = {"mean": rng.normal(size=(8, 4)).astype(np.float32), "var": rng.uniform(0.5, 3, (8, 4)).astype(np.float32)}
  pooled = {"mean": rows["mean"].mean(0), "var": rows["var"].mean(0) + rows["mean"].var(0)}
  scale, bias = np.full(4, 1.3, np.float32), np.full(4, 0.2, np.float32)
  expected = np.stack([renorm_reference(x[g], scale, bias, pooled, 1.5, 0.5)[0] for g in range(8)])

  y, new = jaxbn.batch_renorm(
    x.reshape(48, 4), {"scale": scale, "bias": bias}, rows, training=True, r_max=1.5, d_max=0.5, batch_groups=8
  )
  np.testing.assert_allclose(np.asarray(y).reshape(8, 6, 4), expected, rtol=1e-5, atol=1e-5)
  assert new["mean"].shape == (8, 4)

  mesh = jax.make_mesh((8,), ("d",))

  def local(x, rows):
    y, _ = jaxbn.batch_renorm(
      x,
      {"scale": scale, "bias": bias},
      jax.tree.map(lambda a: a[0], rows),
      training=True,
      r_max=1.5,
      d_max=0.5,
      stats_axis_name="d",
    )
    return y

  run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))
  y_map = run(put(x.reshape(48, 4)), jax.tree.map(put, rows))
  np.testing.assert_allclose(np.asarray(y_map).reshape(8, 6, 4), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_grouped_and_axis_renorm_agree_in_gradients_and_statistics():
  """What train.py's jit style (batch_groups) and shard_map/pmap styles (stats_axis_name)
  compute for per-device Batch Renorm at 2 examples per device, where r and d clip: the
  same outputs, gradients and new running statistics, up to float rounding."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(16, 4)) * 2 + 1).astype(np.float32)
  rows = {"mean": rng.normal(size=(8, 4)).astype(np.float32), "var": rng.uniform(0.5, 3, (8, 4)).astype(np.float32)}
  params = {"scale": rng.uniform(0.5, 2, 4).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
  kw = dict(training=True, r_max=1.5, d_max=0.5, momentum=0.9)
  pooled_sigma = np.sqrt(rows["var"].mean(0) + rows["mean"].var(0) + 1e-5)
  r = np.sqrt(x.reshape(8, 2, 4).var(1) + 1e-5) / pooled_sigma
  assert np.any((r < 1 / 1.5) | (r > 1.5)) and np.any((r > 1 / 1.5) & (r < 1.5))  # clipped and not

  def grouped(x, p):
    y, s = jaxbn.batch_renorm(x, p, rows, batch_groups=8, **kw)
    return jnp.sum(jnp.sin(y)), (y, s)

  (_, (y, stats)), (dx, dp) = jax.value_and_grad(grouped, argnums=(0, 1), has_aux=True)(x, params)

  def per_device(x, r):
    def f(x, p):
      y, s = jaxbn.batch_renorm(x, p, r, stats_axis_name="d", **kw)
      return jnp.sum(jnp.sin(y)), (y, s)

    (_, (y, s)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, params)
    return y, s, grads

  y_d, stats_d, (dx_d, dp_d) = jax.vmap(per_device, axis_name="d")(x.reshape(8, 2, 4), rows)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  close(y_d.reshape(16, 4), y)
  close(dx_d.reshape(16, 4), dx)
  jax.tree.map(lambda a, b: close(a.sum(0), b), dp_d, dp)  # each device's share of the parameter gradient
  jax.tree.map(close, stats_d, stats)  # one row per device
