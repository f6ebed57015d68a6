"""jaxbn.BatchNorm and jaxbn.nnx.BatchNorm are drop-in for flax's modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxbn

CASES = [
  dict(shape=(16, 5), kw={}),
  dict(shape=(4, 6, 6, 3), kw={}),
  dict(shape=(4, 3, 6, 6), kw=dict(axis=1)),
  dict(shape=(4, 3, 5, 2), kw=dict(axis=(1, 3))),
  dict(shape=(8, 4), kw=dict(use_bias=False)),
  dict(shape=(8, 4), kw=dict(use_scale=False)),
  dict(shape=(8, 4), kw=dict(use_bias=False, use_scale=False)),
  dict(shape=(8, 4), kw=dict(momentum=0.5, epsilon=1e-3)),
  dict(shape=(8, 4), kw=dict(scale_init=nn.initializers.normal(), bias_init=nn.initializers.normal())),
]


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 2.0 + 0.5


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, v.shape, u.dtype, v.dtype)
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def _case_id(case) -> str:
  """A test id that is the same in every process (pytest-xdist): initializers by name."""
  kw = {k: getattr(v, "__qualname__", v) if callable(v) else v for k, v in case["kw"].items()}
  return f"{case['shape']}-{kw}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_linen_matches_flax(case):
  x = _x(case["shape"])
  ours, theirs = jaxbn.BatchNorm(**case["kw"]), nn.BatchNorm(**case["kw"])
  key = jax.random.key(1)
  v_ours = ours.init(key, x, use_running_average=False)
  v_theirs = theirs.init(key, x, use_running_average=False)
  _assert_trees_close(v_ours, v_theirs, rtol=0, atol=0)  # init never updates stats
  # Training, several steps: outputs and updated statistics.
  for step in range(3):
    xs = _x(case["shape"], seed=10 + step)
    y1, u1 = ours.apply(v_ours, xs, use_running_average=False, mutable=["batch_stats"])
    y2, u2 = theirs.apply(v_theirs, xs, use_running_average=False, mutable=["batch_stats"])
    assert y1.dtype == y2.dtype
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    _assert_trees_close(u1, u2)
    v_ours, v_theirs = {**v_ours, **u1}, {**v_theirs, **u2}
  # Evaluation with the running statistics.
  y1 = ours.apply(v_ours, x, use_running_average=True)
  y2 = theirs.apply(v_theirs, x, use_running_average=True)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)


def test_use_running_average_from_field_or_call():
  x = _x((10, 4))
  train, evaluate = jaxbn.BatchNorm(use_running_average=False), jaxbn.BatchNorm(use_running_average=True)
  v = train.init(jax.random.key(0), x)
  stats = {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 4.0)}
  v = {**v, "batch_stats": stats}
  np.testing.assert_allclose(evaluate.apply(v, x), (x - 0.5) / jnp.sqrt(4.0 + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(jaxbn.BatchNorm().apply(v, x, use_running_average=True), evaluate.apply(v, x), rtol=0)
  with pytest.raises(ValueError, match="use_running_average"):
    jaxbn.BatchNorm(use_running_average=True).apply(v, x, use_running_average=False)
  y, upd = train.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
  assert not np.allclose(upd["batch_stats"]["mean"], stats["mean"])


def test_linen_half_precision_dtypes_follow_flax():
  x = _x((8, 4)).astype(jnp.bfloat16)
  for kw in ({}, dict(dtype=jnp.bfloat16), dict(use_bias=False, use_scale=False), dict(param_dtype=jnp.bfloat16)):
    v = nn.BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
    y1 = jaxbn.BatchNorm(**kw).apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]
    y2 = nn.BatchNorm(**kw).apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]
    assert y1.dtype == y2.dtype, kw
    np.testing.assert_allclose(np.float32(y1), np.float32(y2), rtol=2e-2, atol=2e-2)


def test_variables_load_crosswise():
  """Checkpoints move both ways: same tree, shapes, dtypes; same results."""
  x = _x((12, 6))
  theirs, ours = nn.BatchNorm(momentum=0.8), jaxbn.BatchNorm(momentum=0.8)
  v = theirs.init(jax.random.key(3), x, use_running_average=False)
  v = {**v, "params": {"scale": jnp.arange(6.0) + 1, "bias": jnp.arange(6.0) - 2}}
  _, trained = theirs.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  v = {**v, **trained}
  np.testing.assert_allclose(
    ours.apply(v, x * 3, use_running_average=True), theirs.apply(v, x * 3, use_running_average=True), rtol=1e-6
  )
  _, ours_trained = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  back = {**v, **ours_trained}
  np.testing.assert_allclose(
    theirs.apply(back, x, use_running_average=True), ours.apply(back, x, use_running_average=True), rtol=1e-6
  )


def test_in_a_model_as_an_injected_norm():
  class Model(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(8)(x)
      x = self.norm(use_running_average=not train)(x)
      return nn.Dense(2)(nn.relu(x))

  x = _x((16, 5))
  v = Model(nn.BatchNorm).init(jax.random.key(0), x, train=False)
  for train in (True, False):
    y1 = Model(jaxbn.BatchNorm).apply(v, x, train=train, mutable=["batch_stats"])[0]
    y2 = Model(nn.BatchNorm).apply(v, x, train=train, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)


def test_linen_axis_name_under_vmap_matches_flax():
  x = _x((4, 8, 3))
  kw = dict(use_running_average=False, axis_name="batch")
  v = nn.BatchNorm(**kw).init(jax.random.key(0), x[0])

  def run(module):
    fn = lambda x: module.apply(v, x, mutable=["batch_stats"])
    return jax.vmap(fn, axis_name="batch")(x)

  (y1, u1), (y2, u2) = run(jaxbn.BatchNorm(**kw)), run(nn.BatchNorm(**kw))
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  _assert_trees_close(u1, u2)
  # and it really is the global batch:
  flat = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(
    y1.reshape(-1, 3), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), rtol=1e-4, atol=1e-4
  )


def test_linen_axis_name_under_pmap_matches_flax():
  assert jax.device_count() == 8
  x = _x((8, 6, 4))
  kw = dict(use_running_average=False, axis_name="batch")
  v = nn.BatchNorm(**kw).init(jax.random.key(0), x[0])

  def run(module):
    return jax.pmap(lambda x: module.apply(v, x, mutable=["batch_stats"]), axis_name="batch")(x)

  (y1, u1), (y2, u2) = run(jaxbn.BatchNorm(**kw)), run(nn.BatchNorm(**kw))
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  _assert_trees_close(u1, u2)


def test_linen_mask_fixes_flax_unweighted_mean_over_replicas():
  """Unequal valid counts per replica: jaxbn equals the global batch, flax does not."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 6, 2)).astype(np.float32) + np.arange(8, dtype=np.float32)[:, None, None]
  counts = np.array([1, 6, 2, 6, 3, 6, 4, 5])
  mask = np.arange(6)[None, :, None] < counts[:, None, None]
  kw = dict(use_running_average=False, axis_name="batch", momentum=0.0)
  v = nn.BatchNorm(**kw).init(jax.random.key(0), x[0])
  valid = np.concatenate([x[r, : counts[r]] for r in range(8)])

  def stats(module):
    run = lambda x, m: module.apply(v, x, mask=m, mutable=["batch_stats"])[1]["batch_stats"]
    return jax.pmap(run, axis_name="batch")(x, mask)

  ours, theirs = stats(jaxbn.BatchNorm(**kw)), stats(nn.BatchNorm(**kw))
  np.testing.assert_allclose(ours["mean"][0], valid.mean(0), rtol=1e-5)
  np.testing.assert_allclose(ours["var"][0], valid.var(0), rtol=1e-5)
  assert not np.allclose(theirs["mean"][0], valid.mean(0), rtol=1e-3)


# ---- NNX ---------------------------------------------------------------------

NNX_CASES = [
  dict(shape=(16, 5), kw={}),
  dict(shape=(4, 6, 6, 3), kw={}),
  dict(shape=(4, 3, 6, 6), kw=dict(axis=1)),
  dict(shape=(8, 4), kw=dict(use_bias=False)),
  dict(shape=(8, 4), kw=dict(use_scale=False, momentum=0.5)),
]


@pytest.mark.parametrize("case", NNX_CASES, ids=_case_id)
def test_nnx_matches_flax(case):
  axis = case["kw"].get("axis", -1)
  features = case["shape"][axis]
  ours = jaxbn.nnx.BatchNorm(features, rngs=nnx.Rngs(0), **case["kw"])
  theirs = nnx.BatchNorm(features, rngs=nnx.Rngs(0), **case["kw"])
  _assert_trees_close(nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs)), 0, 0)
  for step in range(3):
    x = _x(case["shape"], seed=step)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
  _assert_trees_close(nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs)))
  ours.eval()
  theirs.eval()
  x = _x(case["shape"], seed=9)
  before = nnx.to_pure_dict(nnx.state(ours, nnx.BatchStat))
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
  after = nnx.to_pure_dict(nnx.state(ours, nnx.BatchStat))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)


def test_nnx_state_loads_crosswise_and_trains_under_jit():
  ours = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(1), momentum=0.9)
  theirs(_x((10, 3)))
  nnx.update(ours, nnx.state(theirs))
  ours.eval(), theirs.eval()
  np.testing.assert_allclose(ours(_x((4, 3), 2)), theirs(_x((4, 3), 2)), rtol=1e-6)

  @nnx.jit
  def train_step(model, x):
    return model(x, use_running_average=False)

  ours.train()
  train_step(ours, _x((10, 3), 3))
  assert not np.allclose(ours.mean[...], theirs.mean[...])


def test_nnx_axis_name_under_vmap():
  x = _x((4, 8, 3))
  ours = jaxbn.nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))
  y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(ours, x)
  flat = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(
    np.asarray(y).reshape(-1, 3), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), rtol=1e-4, atol=1e-4
  )
