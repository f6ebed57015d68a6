"""haiku's and equinox's BatchNorm tests, ported onto jaxbn.

Ported (rewritten, not copied) from:
  google-deepmind/dm-haiku at 178818b8e01be9545c6b6de7778be4bc9d10b3ed,
    haiku/_src/batch_norm_test.py (every BatchNorm test but the two that check
    haiku's own constructor arguments `create_scale`/`create_offset`).
  patrick-kidger/equinox at 04bbd34337eaa000b9f3c047d5257c4ae6a8f102,
    tests/test_nn.py::test_batch_norm (the stateful `eqx.nn.State` version).
haiku and equinox keep scale/offset and state outside the layer; the
functional `jaxbn.batch_norm` is the same shape of API, so the ports call it.
Translations: haiku's `decay_rate` is jaxbn's `momentum`; haiku's `axis`
lists the reduced axes, jaxbn's names the feature axes; equinox's examples
are channels-first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


def _stats(c, dtype=jnp.float32):
  return {"mean": jnp.zeros(c, dtype), "var": jnp.ones(c, dtype)}


# ---- haiku -----------------------------------------------------------------


def test_haiku_basic():
  data = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  # momentum 0: the running statistics become this batch's (haiku debiases
  # its moving average to the same effect after one step).
  y, stats = jaxbn.batch_norm(data, None, _stats(4), training=True, momentum=0.0)
  np.testing.assert_allclose(y, jnp.broadcast_to(y[:, :, :1], y.shape))  # symmetric per channel
  y_eval, _ = jaxbn.batch_norm(data, None, stats, training=False)
  np.testing.assert_allclose(y_eval, y, rtol=1e-6, atol=1e-6)  # the stored statistics are the batch's


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_haiku_simple_training(layout):
  axis = -1 if layout == "NHWC" else 1
  shape = (2, 3, 3, 5) if layout == "NHWC" else (2, 5, 3, 3)
  params = {"scale": np.full(5, 0.5), "bias": np.full(5, 2.0)}
  y, _ = jaxbn.batch_norm(np.ones(shape, np.float32), params, _stats(5), training=True, momentum=0.9, axis=axis)
  np.testing.assert_equal(np.asarray(y), np.full(shape, 2.0))


def test_haiku_simple_training_normalized_axes():
  # haiku reduces over axes [0, 2, 3]: the feature axis is 1.
  inputs = np.stack([2.0 * np.ones([5, 3, 3]), np.ones([5, 3, 3])], 1).astype(np.float32)
  y, _ = jaxbn.batch_norm(inputs, None, _stats(2), training=True, axis=1)
  np.testing.assert_equal(np.asarray(y), np.zeros(inputs.shape))


def test_haiku_no_scale_and_offset():
  y, _ = jaxbn.batch_norm(jnp.ones([2, 5, 3, 3, 3]), None, _stats(3), training=True)
  np.testing.assert_equal(np.asarray(y), np.zeros([2, 5, 3, 3, 3]))


def test_haiku_cross_replica_axis():
  assert jax.device_count() == 8
  inputs = np.arange(8 * 4).reshape(8, 4)  # integers, as haiku's test feeds them
  f = jax.pmap(lambda x: jaxbn.batch_norm(x, None, _stats(4), training=True, axis_name="i")[0], axis_name="i")
  expected = (inputs - inputs.mean(0)) / (inputs.std(0) + 1e-10)
  np.testing.assert_array_almost_equal(f(inputs), expected)


def test_haiku_cross_replica_axis_index_groups():
  assert jax.device_count() == 8
  groups = np.arange(8).reshape(4, 2).tolist()
  inputs = np.arange(8 * 4).reshape(8, 4).astype(np.float32)
  f = jax.pmap(
    lambda x: jaxbn.batch_norm(x, None, _stats(4), training=True, axis_name="i", axis_index_groups=groups)[0],
    axis_name="i",
  )
  expected = np.concatenate([(g - g.mean(0)) / (g.std(0) + 1e-10) for g in inputs.reshape(4, 2, 4)])
  np.testing.assert_array_almost_equal(f(inputs), expected)


def test_haiku_vmap_cross_replica_axis():
  inputs = jax.random.normal(jax.random.key(42), (4, 32, 32, 3))
  params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])}
  step = jax.vmap(
    lambda x, stats, training: jaxbn.batch_norm(x, params, stats, training=training, momentum=0.9, axis_name="batch"),
    in_axes=(0, None, None),
    out_axes=(0, None),
    axis_name="batch",
  )
  y, stats = step(inputs, _stats(3), True)
  mean = inputs.mean((0, 1, 2), keepdims=True)
  var = inputs.var((0, 1, 2), keepdims=True)
  expected = (inputs - mean) / jnp.sqrt(var + 1e-5) * params["scale"] + params["bias"]
  np.testing.assert_array_almost_equal(y, expected, decimal=4)
  y_eval, _ = step(inputs, stats, False)
  expected_eval = (inputs - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]
  np.testing.assert_array_almost_equal(y_eval, expected_eval, decimal=4)


def test_haiku_eps_keeps_bfloat16():
  x = np.ones([1], jnp.bfloat16)
  params = {"scale": np.ones(1, jnp.bfloat16), "bias": np.zeros(1, jnp.bfloat16)}
  y, _ = jaxbn.batch_norm(x, params, _stats(1, jnp.bfloat16), training=False, epsilon=0.1)
  assert y.dtype == jnp.bfloat16


def test_haiku_no_type_promotion():
  x = np.random.default_rng(0).normal(size=[100, 5]).astype(np.float32)
  params = {"scale": jnp.ones(5), "bias": jnp.zeros(5)}
  y, stats = jaxbn.batch_norm(x, params, _stats(5), training=True)
  assert y.dtype == jnp.float32
  to_bf16 = lambda tree: jax.tree.map(lambda v: v.astype(jnp.bfloat16), tree)
  y, _ = jaxbn.batch_norm(x.astype(jnp.bfloat16), to_bf16(params), to_bf16(stats), training=False)
  assert y.dtype == jnp.bfloat16


# ---- equinox ---------------------------------------------------------------


def _channels_first_bn(axis_name, params=None, training=True):
  def bn(x, stats):
    return jaxbn.batch_norm(x, params, stats, training=training, axis=0, axis_name=axis_name)

  return bn


@pytest.mark.slow
def test_equinox_batch_norm():
  keys = jax.random.split(jax.random.key(0), 5)
  x0 = jax.random.uniform(keys[0], (5,))
  x1 = jax.random.uniform(keys[1], (10, 5))
  x2 = jax.random.uniform(keys[2], (10, 5, 6))
  x3 = jax.random.uniform(keys[3], (10, 5, 7, 8))

  # A single vmapped axis_name.
  vbn = jax.vmap(_channels_first_bn("batch"), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  for x in (x1, x2, x3):
    out, stats = vbn(x, _stats(5))
    assert out.shape == x.shape
    assert stats["mean"].shape == (5,) and stats["var"].shape == (5,)

  # No transform binds the name: a NameError.
  with pytest.raises(NameError):
    jax.vmap(_channels_first_bn("batch"), in_axes=(0, None), out_axes=(0, None))(x1, _stats(5))
  with pytest.raises(NameError):
    _channels_first_bn("batch")(x0, _stats(5))

  # Inside another vmap without a name: statistics per outer index.
  out, stats = jax.vmap(
    jax.vmap(_channels_first_bn("batch"), axis_name="batch", in_axes=(1, None), out_axes=(1, None)), in_axes=(0, None)
  )(x2, _stats(5))
  assert out.shape == x2.shape and stats["mean"].shape == (10, 5) and stats["var"].shape == (10, 5)

  # Several axis names: the statistics of both vmapped axes together.
  vvbn = _channels_first_bn(("batch1", "batch2"))
  for name in ("batch1", "batch2"):
    vvbn = jax.vmap(vvbn, axis_name=name, in_axes=(0, None), out_axes=(0, None))
  out, stats = vvbn(x2, _stats(6))
  assert out.shape == x2.shape and stats["mean"].shape == (6,)
  flat = x2.reshape(-1, 6)
  np.testing.assert_allclose(
    out.reshape(-1, 6), (flat - flat.mean(0)) / jnp.sqrt(flat.var(0) + 1e-5), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(stats["mean"], 0.01 * flat.mean(0), rtol=1e-5)

  # It normalises.
  x1alt = jax.random.normal(jax.random.key(5678), (10, 5))
  vbn = jax.vmap(_channels_first_bn("batch"), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  out, stats = vbn(x1alt, _stats(5))
  np.testing.assert_allclose(out, (x1alt - x1alt.mean(0)) / jnp.sqrt(x1alt.var(0) + 1e-5), rtol=1e-5, atol=1e-5)

  # Statistics update in training...
  _, stats = vbn(x1, stats)
  _, stats2 = vbn(3 * x1 + 10, stats)
  assert not jnp.allclose(stats["mean"], stats2["mean"]) and not jnp.allclose(stats["var"], stats2["var"])
  # ...and not at inference, bit for bit.
  vibn = jax.vmap(_channels_first_bn("batch", training=False), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  _, stats3 = vibn(4 * x1 + 20, stats2)
  np.testing.assert_array_equal(stats2["mean"], stats3["mean"])
  np.testing.assert_array_equal(stats2["var"], stats3["var"])

  # Differentiable, with a (vmapped) batch of one.
  grad = jax.grad(lambda x: jnp.sum(vbn(x, stats)[0]))(jax.random.normal(keys[4], (1, 5)))
  assert grad.shape == (1, 5) and np.all(np.isfinite(grad))
