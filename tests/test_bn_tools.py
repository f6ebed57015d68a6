"""The BN tools: FrozenBatchNorm, switching an unmodified model's BN, PreciseBN's two estimators.

Oracles: NumPy float64 formulas, flax's own BatchNorm run per device (pmap, or
shard by shard), and the inference-mode output of the same variables.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

DEVICES = 8


# ---- a ResNet written against flax.linen.BatchNorm (nothing of jaxbn in it) ----------


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
    return nn.relu(x + y)


class TinyResNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = Block(8)(x, train)
    return nn.Dense(3)(x.mean((1, 2)))


def _images(n, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 6, 6, 2)) * 3 + 1


# ---- FrozenBatchNorm ---------------------------------------------------------------


def test_frozen_batch_norm_has_bn_variables_and_normalizes_with_them():
  x = jax.random.normal(jax.random.key(0), (10, 4)) * 2 + 3
  bn_vars = jaxbn.BatchNorm(use_running_average=False).init(jax.random.key(1), x)
  frozen = jaxbn.FrozenBatchNorm()
  fresh = frozen.init(jax.random.key(1), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), fresh) == jax.tree.map(lambda a: (a.shape, a.dtype), bn_vars)
  np.testing.assert_allclose(frozen.apply(fresh, x), x, rtol=1e-6)  # a fresh layer is the identity
  # A BN checkpoint loads: training mode normalizes with the stored statistics, never updates them.
  rng = np.random.default_rng(0)
  trained = {
    "params": {"scale": rng.uniform(0.5, 2, 4), "bias": rng.normal(size=4)},
    "batch_stats": {"mean": rng.normal(size=4), "var": rng.uniform(0.5, 3, 4)},
  }
  y, updates = frozen.apply(trained, x, use_running_average=False, mutable=["batch_stats"])
  s, b = trained["params"]["scale"], trained["params"]["bias"]
  m, v = trained["batch_stats"]["mean"], trained["batch_stats"]["var"]
  expected = s * (np.asarray(x, np.float64) - m) / np.sqrt(v + 1e-5) + b
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], trained["batch_stats"])
  # and back: the same variables run in a BatchNorm's inference mode give the same output
  np.testing.assert_allclose(jaxbn.BatchNorm(use_running_average=True).apply(trained, x), y, rtol=1e-6)


@pytest.mark.parametrize("train_affine", [False, True])
def test_frozen_affine_gets_a_gradient_only_when_asked(train_affine):
  x = jax.random.normal(jax.random.key(0), (10, 4))
  layer = jaxbn.FrozenBatchNorm(train_affine=train_affine)
  # non-trivial statistics and affine: y = scale * (x - mean) / sqrt(var + eps) + bias, all fixed
  stats = {"mean": jnp.asarray([0.5, -1.0, 2.0, 0.0]), "var": jnp.asarray([1.0, 4.0, 0.25, 2.0])}
  params = {"scale": jnp.asarray([1.5, 2.0, 0.5, -1.0]), "bias": jnp.asarray([0.1, 0.2, 0.3, 0.4])}
  variables = {"params": params, "batch_stats": stats}
  grads = jax.grad(lambda p: jnp.sum(layer.apply({**variables, "params": p}, x) ** 2))(params)
  y = np.asarray(layer.apply(variables, x), np.float64)
  inv = 1 / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
  xhat = (np.asarray(x, np.float64) - np.asarray(stats["mean"])) * inv
  np.testing.assert_allclose(y, np.asarray(params["scale"]) * xhat + np.asarray(params["bias"]), rtol=1e-5, atol=1e-6)
  if train_affine:  # d/dscale sum(y^2) = sum 2 y xhat, d/dbias = sum 2 y
    np.testing.assert_allclose(grads["scale"], (2 * y * xhat).sum(0), rtol=1e-5)
    np.testing.assert_allclose(grads["bias"], (2 * y).sum(0), rtol=1e-5)
  else:
    assert all(not bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
  dx = jax.grad(lambda x: jnp.sum(layer.apply(variables, x) ** 2))(x)  # through the fixed statistics
  np.testing.assert_allclose(dx, 2 * y * np.asarray(params["scale"]) * inv, rtol=1e-5, atol=1e-6)


def test_frozen_folds_into_the_layer_before():
  x = jax.random.normal(jax.random.key(0), (7, 3))
  kernel, bias = jax.random.normal(jax.random.key(1), (3, 4)), jnp.arange(4.0)
  stats = {"mean": jnp.asarray([0.5, -1.0, 2.0, 0.0]), "var": jnp.asarray([1.0, 4.0, 0.25, 2.0])}
  params = {"scale": jnp.asarray([1.0, 2.0, 0.5, -1.0]), "bias": jnp.asarray([0.1, 0.2, 0.3, 0.4])}
  frozen = jaxbn.FrozenBatchNorm().apply({"params": params, "batch_stats": stats}, x @ kernel + bias)
  k2, b2 = jaxbn.fold_batch_norm(kernel, bias, params, stats, epsilon=1e-5)
  np.testing.assert_allclose(x @ k2 + b2, frozen, rtol=1e-5, atol=1e-5)


def test_nnx_frozen_batch_norm():
  bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (10, 4)) * 2 + 1
  bn(x)  # trains: statistics move
  frozen = jaxbn.nnx.FrozenBatchNorm(4, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(frozen(x), x, rtol=1e-6)  # fresh: the identity
  for name in ("scale", "bias", "mean", "var"):
    getattr(frozen, name)[...] = getattr(bn, name)[...]
  before = frozen.mean[...]
  y = frozen(x, use_running_average=False)
  np.testing.assert_array_equal(frozen.mean[...], before)
  bn.eval()
  np.testing.assert_allclose(y, bn(x), rtol=1e-6)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(frozen)
  assert not np.any(grads["scale"][...]) and not np.any(grads["bias"][...])


# ---- switching the BN of an unmodified Linen model ------------------------------------


@pytest.mark.slow
def test_swap_under_jit_gives_pmaps_per_device_bn_on_a_flax_resnet():
  """Per-device BN of a model written with flax.linen.BatchNorm, moved to jit over a
  sharded batch: `swap_batch_norm(batch_groups=8)` equals flax's own per-device BN
  under pmap (no axis_name) in outputs, gradients and each device's statistics."""
  assert jax.device_count() == DEVICES
  model = TinyResNet()
  x = _images(DEVICES * 4)
  variables = model.init(jax.random.key(0), x[:2], train=False)

  def loss(params, batch_stats, x):
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(logits**2), updates["batch_stats"]

  # The oracle: flax under pmap, each device its own 4 examples.
  stacked = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES, *a.shape)), t)
  (ref_loss, ref_stats), ref_grads = jax.pmap(jax.value_and_grad(loss, has_aux=True))(
    stacked(variables["params"]), stacked(variables["batch_stats"]), x.reshape(DEVICES, 4, *x.shape[1:])
  )
  mesh = jax.make_mesh((DEVICES,), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  with jaxbn.swap_batch_norm(batch_groups=DEVICES), jax.set_mesh(mesh):
    (total, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      replicated["params"], replicated["batch_stats"], xs
    )
  np.testing.assert_allclose(total, ref_loss.sum(), rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b.sum(0), rtol=1e-4, atol=1e-5), grads, ref_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, ref_stats)  # a row each


def test_swap_to_frozen_gives_inference_outputs_in_training_mode():
  model = TinyResNet()
  x = _images(16)
  variables = model.init(jax.random.key(0), x, train=False)
  _, moved = model.apply(variables, x * 2, train=True, mutable=["batch_stats"])  # statistics away from init
  variables = {**variables, "batch_stats": moved["batch_stats"]}
  with jaxbn.swap_batch_norm(kind="frozen"):
    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, model.apply(variables, x, train=False), rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
  trained, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert np.abs(np.asarray(trained) - np.asarray(y)).max() > 1e-3  # training mode is not inference mode without it


def test_swap_overrides_fields_and_names_bad_ones():
  model = TinyResNet()
  x = _images(8)
  variables = model.init(jax.random.key(0), x, train=False)
  with jaxbn.swap_batch_norm(momentum=0.0):  # the running statistics become this batch's
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  h = nn.Conv(8, (3, 3), use_bias=False).apply({"params": variables["params"]["Conv_0"]}, x)
  np.testing.assert_allclose(
    updates["batch_stats"]["BatchNorm_0"]["mean"], np.asarray(h).mean((0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  with pytest.raises(ValueError, match="batch_size: not a field of BatchNorm"), jaxbn.swap_batch_norm(batch_size=2):
    pass
  with (
    pytest.raises(ValueError, match="kind: expected one of batch_norm, frozen, renorm"),
    jaxbn.swap_batch_norm("ghost"),
  ):
    pass


# ---- switching the BN of an unmodified NNX model --------------------------------------


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([nnx.BatchNorm(8, rngs=rngs)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.blocks[0](nnx.relu(self.bn(self.conv(x)))).mean((1, 2)))


def test_nnx_swap_per_device_under_jit_equals_each_shard_alone():
  assert jax.device_count() == DEVICES
  x = _images(DEVICES * 4, seed=1)
  reference = [NNXNet(nnx.Rngs(0)) for _ in range(DEVICES)]
  outputs = [m(x[4 * d : 4 * d + 4]) for d, m in enumerate(reference)]  # flax's BN, one shard each
  model = jaxbn.nnx.swap_batch_norm(NNXNet(nnx.Rngs(0)), batch_groups=DEVICES)
  assert isinstance(model.bn, jaxbn.nnx.BatchNorm) and isinstance(model.blocks[0], jaxbn.nnx.BatchNorm)
  assert model.bn.momentum == 0.9 and model.bn.mean.shape == (DEVICES, 8)  # its own fields, one row per device
  mesh = jax.make_mesh((DEVICES,), ("data",))
  with jax.set_mesh(mesh):
    y = nnx.jit(lambda m, x: m(x))(model, jax.device_put(x, NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(y, np.concatenate(outputs), rtol=1e-4, atol=1e-5)
  for d in (0, 5):
    np.testing.assert_allclose(np.asarray(model.bn.mean[...])[d], reference[d].bn.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      np.asarray(model.blocks[0].var[...])[d], reference[d].blocks[0].var[...], rtol=1e-5, atol=1e-6
    )


def test_nnx_swap_carries_parameters_and_freezes():
  model = NNXNet(nnx.Rngs(0))
  x = _images(8)
  model(x * 3)  # statistics away from init
  scale = model.bn.scale
  jaxbn.nnx.swap_batch_norm(model, "frozen")
  assert isinstance(model.bn, jaxbn.nnx.FrozenBatchNorm) and model.bn.scale is scale  # the same Variable
  y = model(x)
  model.eval()
  np.testing.assert_allclose(y, model(x), rtol=1e-6)
  with pytest.raises(ValueError, match="batch_size: not an argument of"):
    jaxbn.nnx.swap_batch_norm(model, batch_size=2)


# ---- PreciseBN: the paper's and the pooled estimator ----------------------------------


def _estimates(hidden, masks):
  """NumPy float64 oracle over per-batch (rows, features) arrays and masks."""
  means, variances, pooled = [], [], []
  for h, m in zip(hidden, masks, strict=True):
    v = np.asarray(h, np.float64)[np.asarray(m)]
    means.append(v.mean(0))
    variances.append(v.var(0, ddof=1))
    pooled.append(v)
  allv = np.concatenate(pooled)
  return {"paper": (np.mean(means, 0), np.mean(variances, 0)), "pooled": (allv.mean(0), allv.var(0))}


class MaskedNet(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    h = nn.Dense(5)(x)
    return nn.BatchNorm(use_running_average=True)(h, mask=mask), h


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_linen_population_stats_match_numpy_with_unequal_batches_and_a_mask(estimator):
  rng = np.random.default_rng(0)
  batches = [rng.normal(2, 3, (n, 4)).astype(np.float32) for n in (8, 5, 13)]
  masks = [rng.random((len(b), 1)) > 0.3 for b in batches]
  model = MaskedNet()
  variables = model.init(jax.random.key(0), batches[0], masks[0])
  hidden = [model.apply(variables, b, m)[1] for b, m in zip(batches, masks, strict=True)]
  stats = jaxbn.population_stats(model, variables, list(zip(batches, masks, strict=True)), estimator=estimator)
  mean, var = _estimates(hidden, [np.broadcast_to(m, h.shape)[:, 0] for m, h in zip(masks, hidden, strict=True)])[
    estimator
  ]
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], var, rtol=1e-5, atol=1e-6)


def test_the_estimators_differ_where_batches_are_small():
  """Two batches of 2: the paper's unbiased per-batch variances vs the pooled spread."""
  rng = np.random.default_rng(1)
  batches = [rng.normal(0, 1, (2, 4)).astype(np.float32) + 5 * i for i in range(2)]
  model = MaskedNet()
  variables = model.init(jax.random.key(0), batches[0], None)
  results = {
    e: jaxbn.population_stats(model, variables, [(b, None) for b in batches], estimator=e) for e in ("paper", "pooled")
  }
  assert not np.allclose(results["paper"]["BatchNorm_0"]["var"], results["pooled"]["BatchNorm_0"]["var"], rtol=0.1)
  with pytest.raises(ValueError, match="estimator: expected one of paper, pooled"):
    jaxbn.population_stats(model, variables, [(batches[0], None)], estimator="ema")


def test_population_stats_of_a_conv_layer_at_its_normalization_batch_and_not_of_frozen_layers():
  """A conv BN with batch_groups=2 is estimated over groups of N/2 examples (m = N/2*H*W);
  a FrozenBatchNorm keeps its statistics."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(3, (3, 3))(x)
      y = jaxbn.BatchNorm(use_running_average=True, batch_groups=2)(h)
      return jaxbn.FrozenBatchNorm()(y), h

  x = [_images(8, seed=s) for s in range(2)]
  model = Net()
  variables = model.init(jax.random.key(0), x[0])
  hidden = [np.asarray(model.apply(variables, b)[1], np.float64) for b in x]
  groups = [g.reshape(-1, 3) for h in hidden for g in np.split(h, 2)]  # 4 groups of 4 examples
  stats = jaxbn.population_stats(model, variables, x, estimator="paper")
  assert stats["BatchNorm_0"]["mean"].shape == (2, 3)  # the layer's own one-row-per-group shape
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"][1], np.mean([g.mean(0) for g in groups], 0), rtol=1e-5)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"][0], np.mean([g.var(0, ddof=1) for g in groups], 0), rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, stats["FrozenBatchNorm_0"], variables["batch_stats"]["FrozenBatchNorm_0"])


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_nnx_population_stats_in_place_match_numpy(estimator):
  model = NNXNet(nnx.Rngs(0))
  jaxbn.nnx.swap_batch_norm(model, "frozen")  # then only the first becomes plain BN again
  model.bn = jaxbn.nnx.BatchNorm(8, rngs=nnx.Rngs(1))
  model.eval()
  frozen_var = model.blocks[0].var[...]
  batches = [_images(n, seed=n) for n in (3, 6, 10)]
  hidden = [np.asarray(model.conv(b)).reshape(-1, 8) for b in batches]
  assert jaxbn.nnx.population_stats(model, batches, estimator=estimator) is model
  mean, var = _estimates(hidden, [np.ones(len(h), bool) for h in hidden])[estimator]
  np.testing.assert_allclose(model.bn.mean[...], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.bn.var[...], var, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(model.blocks[0].var[...], frozen_var)  # frozen: untouched


def test_pool_stats_is_the_law_of_total_variance_once_for_complex_means_too():
  means = jnp.asarray([[1 + 2j, 0.5], [-1 + 0j, 1.5j]], jnp.complex64)
  variances = jnp.asarray([[1.0, 2.0], [3.0, 0.5]])
  stats = {"mean": means, "var": variances}
  expected_mean = np.mean(np.asarray(means), 0)
  expected_var = np.mean(np.asarray(variances), 0) + np.mean(np.abs(np.asarray(means) - expected_mean) ** 2, 0)
  leading = jaxbn.sync_batch_stats(stats)
  named = jax.vmap(functools.partial(jaxbn.sync_batch_stats, axis_name="d"), axis_name="d")(stats)
  for pooled in (leading, jax.tree.map(lambda a: a[0], named)):
    np.testing.assert_allclose(pooled["mean"], expected_mean, rtol=1e-6)
    np.testing.assert_allclose(pooled["var"], expected_var, rtol=1e-6)
