"""The paper's models: shapes, where BN sits, what they return."""

import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

import jaxbn
from trainer.models import MLP, InceptionNet

X = jax.random.uniform(jax.random.key(42), (6, 28, 28))


def _init(model, x=X):
  # jitted: one compilation instead of op-by-op dispatch of a whole net
  return jax.jit(lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False))(x)


def test_mlp_shapes_and_init():
  variables = _init(MLP(init_std=0.05))
  params = variables["params"]
  assert [params[f"Dense_{i}"]["kernel"].shape for i in range(4)] == [(784, 100), (100, 100), (100, 100), (100, 10)]
  assert all("bias" in params[f"Dense_{i}"] for i in range(4))
  assert "batch_stats" not in variables
  kernel = np.asarray(params["Dense_1"]["kernel"])
  assert abs(kernel.std() - 0.05) < 0.005  # small Gaussian init, as configured


def test_mlp_bn_before_each_sigmoid_and_no_hidden_bias():
  model = MLP(norm=jaxbn.BatchNorm)
  variables = _init(model)
  params = variables["params"]
  assert all("bias" not in params[f"Dense_{i}"] for i in range(3)) and "bias" in params["Dense_3"]
  assert sorted(variables["batch_stats"]) == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]
  logits, extras = model.apply(variables, X, train=True, mutable=["batch_stats"])[0]
  assert logits.shape == (6, 10)
  # The tracked pre-activation is BN's output: zero mean, unit variance per unit in training.
  pre = np.asarray(extras["last_preactivation"])
  np.testing.assert_allclose(pre.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(pre.var(0), 1, rtol=1e-2)


def test_mlp_preactivation_is_the_last_sigmoids_input():
  model = MLP()
  variables = _init(model)
  logits, extras = model.apply(variables, X, train=False)
  p = variables["params"]
  h = X.reshape(6, -1)
  for i in range(2):
    h = nn.sigmoid(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
  pre = h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
  np.testing.assert_allclose(extras["last_preactivation"], pre, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    logits, nn.sigmoid(pre) @ p["Dense_3"]["kernel"] + p["Dense_3"]["bias"], rtol=1e-5, atol=1e-6
  )


@pytest.mark.slow
@pytest.mark.parametrize("bn", [False, True])
def test_inception_shapes_and_bn_placement(bn):
  model = InceptionNet(norm=jaxbn.BatchNorm if bn else None, width=4, dropout=0.3)
  variables = _init(model)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, X)
  assert logits.shape == (6, 10)
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  has_conv_bias = any(p[-2].key.startswith("Conv_") and p[-1].key == "bias" for p in paths)
  assert has_conv_bias != bn  # conv bias only without BN
  if bn:
    stats = jax.tree_util.tree_leaves(variables["batch_stats"])
    # one BN per conv unit: stem + 4 modules x 7 units (1 + 2 + 3 + pool 1), mean and var each
    assert len(stats) == 2 * (1 + 4 * 7)
  # Dropout is active only in training.
  train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0][0])
  y1, y2 = train(variables, X, jax.random.key(0)), train(variables, X, jax.random.key(1))
  assert not np.allclose(y1, y2)


@pytest.mark.slow
def test_inception_with_synced_norm_normalizes_over_the_global_batch():
  """Synced over 2 shards of 3 examples (vmap's axis), the sigmoid Inception net computes what
  the unsynced net computes on the 6 examples at once: logits and running statistics."""
  synced = InceptionNet(norm=functools.partial(jaxbn.BatchNorm, axis_name="batch"), activation=nn.sigmoid, width=4)
  whole = InceptionNet(norm=jaxbn.BatchNorm, activation=nn.sigmoid, width=4)
  variables = _init(synced)  # init needs no bound axis, as in flax
  apply = lambda model, x: model.apply(variables, x, train=True, mutable=["batch_stats"])
  (out, _), updates = jax.jit(jax.vmap(lambda x: apply(synced, x), axis_name="batch"))(X.reshape(2, 3, 28, 28))
  (want, _), want_updates = jax.jit(lambda x: apply(whole, x))(X.reshape(6, 28, 28))
  np.testing.assert_allclose(out.reshape(6, 10), want, rtol=1e-4, atol=1e-5)
  for got, expected in zip(jax.tree.leaves(updates), jax.tree.leaves(want_updates), strict=True):
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-6)  # every shard holds the global statistics
    np.testing.assert_allclose(got[1], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_inception_dropout_on_a_batch_sharded_explicit_mesh():
  """Regression: train.py's jit style (batch sharded on an Explicit mesh) failed in
  flax's nn.Dropout, whose lax.select refuses a replicated mask for a sharded input."""
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  model = InceptionNet(norm=jaxbn.BatchNorm, width=4, dropout=0.5)
  variables = _init(model)
  x = np.random.default_rng(0).random((16, 28, 28), np.float32)
  train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0][0])
  with jax.set_mesh(mesh):
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    y1, y2 = train(variables, x, jax.random.key(0)), train(variables, x, jax.random.key(1))
  assert y1.sharding.spec[0] == "batch"
  assert not np.allclose(y1, y2)  # the mask acted
