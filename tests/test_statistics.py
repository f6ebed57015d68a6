"""sync_batch_stats and population_stats (Algorithm 2) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn
from tests import reference as ref


def test_sync_batch_stats_is_the_law_of_total_variance():
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  data = rng.normal(rng.normal(0, 3, (8, 1, 4)), 1.5, (8, 50, 4))  # per-device shifted
  per_device = {"block": {"bn": {"mean": data.mean(1).astype(np.float32), "var": data.var(1).astype(np.float32)}}}
  pooled = data.reshape(-1, 4)
  synced = jax.pmap(lambda s: jaxbn.sync_batch_stats(s, "d"), axis_name="d")(per_device)
  for r in (0, 7):
    np.testing.assert_allclose(synced["block"]["bn"]["mean"][r], pooled.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(synced["block"]["bn"]["var"][r], pooled.var(0), rtol=1e-5)
  stacked = jaxbn.sync_batch_stats(per_device)  # host form: devices on the leading axis
  np.testing.assert_allclose(stacked["block"]["bn"]["var"], pooled.var(0), rtol=1e-5)


def test_sync_batch_stats_rejects_other_trees():
  with pytest.raises(TypeError, match="batch_stats: expected nested dicts"):
    jaxbn.sync_batch_stats({"bn": [1, 2]})


class _Net(nn.Module):
  norm: type = jaxbn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = self.norm(use_running_average=not train, name="bn1")(x)
    x = nn.Dense(4)(jnp.tanh(x))
    return self.norm(use_running_average=not train, name="bn2")(x)


@pytest.mark.parametrize("norm", [jaxbn.BatchNorm, nn.BatchNorm])
def test_population_stats_is_algorithm_2(norm):
  rng = np.random.default_rng(1)
  batches = [rng.normal(2, 3, (16, 5)).astype(np.float32) for _ in range(5)]
  model = _Net(norm)
  variables = model.init(jax.random.key(0), batches[0], train=False)
  # Stats stored before must not matter: Algorithm 2 uses batch statistics.
  variables = {**variables, "batch_stats": jax.tree.map(lambda t: t + 7.0, variables["batch_stats"])}
  new = jaxbn.population_stats(model, variables, batches, train=False)

  # NumPy Algorithm 2, layer by layer, with the training network (batch stats).
  p = variables["params"]
  means = {"bn1": [], "bn2": []}
  vars_ = {"bn1": [], "bn2": []}
  for x in batches:
    h = x.astype(np.float64) @ np.asarray(p["Dense_0"]["kernel"], np.float64) + np.asarray(p["Dense_0"]["bias"])
    m = h.shape[0]
    means["bn1"].append(h.mean(0))
    vars_["bn1"].append(h.var(0) * m / (m - 1))
    h, _ = ref.bn_forward(h, p["bn1"]["scale"], p["bn1"]["bias"])
    h = np.tanh(h) @ np.asarray(p["Dense_1"]["kernel"], np.float64) + np.asarray(p["Dense_1"]["bias"])
    means["bn2"].append(h.mean(0))
    vars_["bn2"].append(h.var(0) * m / (m - 1))
  for layer in ("bn1", "bn2"):
    np.testing.assert_allclose(new[layer]["mean"], np.mean(means[layer], 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new[layer]["var"], np.mean(vars_[layer], 0), rtol=1e-4)
  # and the model evaluates with them (Algorithm 2's inference: one affine map per feature), in float64
  x = batches[0].astype(np.float64)
  eps = 1e-5

  def infer(h, layer):
    stats, params = new[layer], p[layer]
    inv = np.asarray(params["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
    return h * inv + (np.asarray(params["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * inv)

  h = infer(x @ np.asarray(p["Dense_0"]["kernel"], np.float64) + np.asarray(p["Dense_0"]["bias"]), "bn1")
  h = infer(np.tanh(h) @ np.asarray(p["Dense_1"]["kernel"], np.float64) + np.asarray(p["Dense_1"]["bias"]), "bn2")
  out = model.apply({**variables, "batch_stats": new}, batches[0], train=False)
  np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-5)


def test_population_stats_with_synced_model():
  model = _Net(lambda **kw: jaxbn.BatchNorm(axis_name="batch", **kw))
  x = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  synced = jaxbn.population_stats(model, variables, [x], train=False)  # no transform needed
  plain = jaxbn.population_stats(_Net(), variables, [x], train=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), synced, plain)
  with pytest.raises(ValueError, match="batches: expected at least one batch"):
    jaxbn.population_stats(_Net(), variables, [], train=False)


def test_combine_groups_is_a_deprecated_alias_of_pool_stats():
  rows = {"mean": jnp.array([[0.0, 1.0], [2.0, 3.0]]), "var": jnp.ones((2, 2))}
  with pytest.warns(DeprecationWarning, match="use jaxbn.pool_stats"):
    old = jaxbn.functional.combine_groups(rows)
  jax.tree.map(np.testing.assert_array_equal, old, jaxbn.pool_stats(rows))
  np.testing.assert_allclose(old["var"], [2.0, 2.0])  # 1 + Var{0, 2}: the law of total variance
