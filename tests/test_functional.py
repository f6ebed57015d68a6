"""jaxbn.batch_norm and jaxbn.moments on one device, against NumPy float64."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import jaxbn
from tests import reference as ref

SHAPES_AXES = [((64, 7), -1), ((4, 5, 6, 3), -1), ((6, 3, 5, 5), 1), ((4, 3, 5, 2), (1, 3))]


def _data(shape, axis, seed=0, loc=3.0, spread=2.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(loc, spread, shape).astype(np.float32)
  fshape = tuple(shape[a] for a in sorted(np.atleast_1d(axis) % len(shape)))
  scale = rng.normal(1.0, 0.5, fshape).astype(np.float32)
  bias = rng.normal(0.0, 0.5, fshape).astype(np.float32)
  stats = {"mean": rng.normal(size=fshape).astype(np.float32), "var": rng.uniform(0.5, 2, fshape).astype(np.float32)}
  return x, scale, bias, stats


def _assert_rel(actual, expected, rtol, atol=0.0):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_training_matches_algorithm_1(shape, axis):
  x, scale, bias, stats = _data(shape, axis)
  y, new = jaxbn.batch_norm(
    x, {"scale": scale, "bias": bias}, stats, training=True, axis=axis, momentum=0.9, epsilon=1e-3
  )
  y_ref, (_, mean, var) = ref.bn_forward(x, scale, bias, axis, eps=1e-3)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  _assert_rel(y, y_ref, rtol=1e-5, atol=1e-5)
  _assert_rel(new["mean"], ref.running_update(stats["mean"], mean, 0.9), rtol=1e-5, atol=1e-6)
  _assert_rel(new["var"], ref.running_update(stats["var"], var, 0.9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_gradients_match_paper_formula(shape, axis):
  x, scale, bias, stats = _data(shape, axis, seed=1)
  g = np.random.default_rng(2).normal(size=shape).astype(np.float32)

  def loss(x, scale, bias):
    y, _ = jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, stats, training=True, axis=axis)
    return jnp.sum(y * g)

  dx, dscale, dbias = jax.grad(loss, (0, 1, 2))(x, scale, bias)
  dx_ref, dscale_ref, dbias_ref = ref.bn_backward(x, scale, g, axis)
  scale_of = lambda r: np.max(np.abs(r))
  _assert_rel(dx, dx_ref, rtol=1e-4, atol=1e-4 * scale_of(dx_ref))
  _assert_rel(dscale, dscale_ref, rtol=1e-4, atol=1e-4 * scale_of(dscale_ref))
  _assert_rel(dbias, dbias_ref, rtol=1e-4, atol=1e-4 * scale_of(dbias_ref))


def _autodiff_reference(x, scale, bias, g, axis, mask=None):
  """Plain autodiff of a definitional two-pass BN, in float64."""
  x, scale, bias, g = (jnp.asarray(v, jnp.float64) for v in (x, scale, bias, g))
  faxes = jaxbn.functional.feature_axes(x.ndim, axis)
  raxes = tuple(a for a in range(x.ndim) if a not in faxes)
  w = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(mask, x.shape).astype(jnp.float64)

  def loss(x, scale, bias):
    m = w.sum(raxes, keepdims=True)
    mean = (w * x).sum(raxes, keepdims=True) / m
    var = (w * (x - mean) ** 2).sum(raxes, keepdims=True) / m
    e = lambda v: jnp.expand_dims(v, raxes)
    return jnp.sum(g * (e(scale) * (x - mean) / jnp.sqrt(var + 1e-5) + e(bias)))

  return jax.grad(loss, (0, 1, 2))(x, scale, bias)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES[:3])
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_equals_autodiff_and_finite_differences(shape, axis, masked):
  x, scale, bias, stats = _data(shape, axis, seed=3)
  rng = np.random.default_rng(4)
  g = rng.normal(size=shape)
  mask = rng.random(shape) < 0.7 if masked else None
  with enable_x64():
    x64, s64, b64 = (np.asarray(v, np.float64) for v in (x, scale, bias))
    st64 = jax.tree.map(lambda v: np.asarray(v, np.float64), stats)

    def loss(x, scale, bias):
      y, _ = jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, st64, training=True, axis=axis, mask=mask)
      return jnp.sum(y * g)

    grads = jax.grad(loss, (0, 1, 2))(x64, s64, b64)
    expected = _autodiff_reference(x64, s64, b64, g, axis, mask)
    for got, want in zip(grads, expected, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # Central finite differences along a random direction.
    direction = rng.normal(size=shape)
    h = 1e-6
    fd = (loss(x64 + h * direction, s64, b64) - loss(x64 - h * direction, s64, b64)) / (2 * h)
    np.testing.assert_allclose(np.sum(grads[0] * direction), fd, rtol=1e-6)


def test_inference_is_one_affine_map_and_leaves_stats_bit_identical():
  x, scale, bias, stats = _data((32, 6), -1, seed=5)
  stats = jax.tree.map(jnp.asarray, stats)
  y, out = jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, stats, training=False, epsilon=1e-3)
  assert out is stats  # returned unchanged, not recomputed
  a = scale / np.sqrt(np.float64(stats["var"]) + 1e-3)
  b = bias - a * np.float64(stats["mean"])
  _assert_rel(y, a * x.astype(np.float64) + b, rtol=1e-5, atol=1e-5)

  def step(stats):
    return jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, stats, training=False)[1]

  after = jax.jit(step)(stats)
  for k in ("mean", "var"):
    assert np.array_equal(np.asarray(after[k]).view(np.uint32), np.asarray(stats[k]).view(np.uint32))


def test_missing_params_mean_scale_one_bias_zero():
  x, _, _, stats = _data((16, 4), -1)
  ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
  full, _ = jaxbn.batch_norm(x, {"scale": ones, "bias": zeros}, stats, training=True)
  for params in (None, {}, {"scale": ones}, {"bias": zeros}):
    y, _ = jaxbn.batch_norm(x, params, stats, training=True)
    np.testing.assert_array_equal(y, full)


def test_unbiased_running_variance():
  x, _scale, _bias, stats = _data((10, 3), -1)
  _, new = jaxbn.batch_norm(x, None, stats, training=True, momentum=0.5, unbiased=True)
  var_unbiased = np.var(x.astype(np.float64), axis=0, ddof=1)
  _assert_rel(new["var"], ref.running_update(stats["var"], var_unbiased, 0.5), rtol=1e-5)


@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4])
def test_large_offset_stays_accurate(ratio):
  rng = np.random.default_rng(6)
  std = 1.0
  x = (ratio + std * rng.normal(size=(4096, 8))).astype(np.float32)
  m = jaxbn.moments(x)
  _, mean, var = ref.batch_moments(x)  # of the float32 values actually stored
  _assert_rel(m.mean, mean, rtol=1e-6)
  _assert_rel(m.var, var, rtol=1e-3)
  y, _ = jaxbn.batch_norm(x, None, {"mean": np.zeros(8), "var": np.ones(8)}, training=True)
  y_ref, _ = ref.bn_forward(x, np.ones(8), np.zeros(8))
  _assert_rel(y, y_ref, rtol=0, atol=5e-3)


def test_large_offset_where_flax_fast_variance_fails():
  """The documented failure of E[x²]-E[x]² that jaxbn must not share."""
  import flax.linen as nn

  rng = np.random.default_rng(7)
  x = (1e4 + rng.normal(size=(1024, 4))).astype(np.float32)
  _, _, var = ref.batch_moments(x)
  flax_vars = nn.BatchNorm(use_running_average=False, momentum=0.0).init(jax.random.key(0), x)
  _, updated = nn.BatchNorm(use_running_average=False, momentum=0.0).apply(flax_vars, x, mutable=["batch_stats"])
  flax_err = np.max(np.abs(np.asarray(updated["batch_stats"]["var"]) - var) / var)
  ours_err = np.max(np.abs(np.asarray(jaxbn.moments(x).var) - var) / var)
  assert flax_err > 0.1  # the one-pass formula has lost the variance
  assert ours_err < 1e-3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_reduces_in_float32_and_keeps_dtype(dtype):
  x, scale, bias, stats = _data((256, 4, 4, 8), -1, seed=8, loc=50.0, spread=1.0)
  xh = jnp.asarray(x, dtype)
  y, new = jaxbn.batch_norm(xh, {"scale": scale, "bias": bias}, stats, training=True, momentum=0.0)
  assert y.dtype == dtype and new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32
  x_stored = np.asarray(xh.astype(jnp.float32), np.float64)  # oracle sees the rounded input
  y_ref, (_, mean, var) = ref.bn_forward(x_stored, scale, bias)
  _assert_rel(new["mean"], mean, rtol=1e-6)
  _assert_rel(new["var"], var, rtol=1e-4)
  tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3  # one rounding of the output
  _assert_rel(y, y_ref, rtol=tol, atol=tol)

  def loss(x):
    return jnp.sum(jaxbn.batch_norm(x, None, stats, training=True)[0].astype(jnp.float32) ** 2)

  assert jax.grad(loss)(xh).dtype == dtype


def test_float64_input_reduces_in_float64():
  with enable_x64():
    x = np.random.default_rng(9).normal(1e6, 1.0, (512, 3))
    stats = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}
    y, _ = jaxbn.batch_norm(x, None, stats, training=True)
    assert y.dtype == jnp.float64
    y_ref, _ = ref.bn_forward(x, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)


def test_mask_uses_only_valid_elements():
  x, scale, bias, stats = _data((40, 5), -1, seed=10)
  rng = np.random.default_rng(11)
  mask = rng.random((40, 5)) < 0.6
  x_garbage = np.where(mask, x, np.float32(np.nan))
  y, new = jaxbn.batch_norm(x_garbage, {"scale": scale, "bias": bias}, stats, training=True, mask=mask, momentum=0.0)
  y_ref, (_, mean, var) = ref.bn_forward(x, scale, bias, mask=mask)
  _assert_rel(new["mean"], mean, rtol=1e-5)
  _assert_rel(new["var"], var, rtol=1e-5)
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, y_ref, 0), rtol=1e-5, atol=1e-5)


def test_nonfinite_batch_does_not_poison_running_stats():
  x, _, _, stats = _data((16, 3), -1)
  x[3, 1] = np.nan
  x[5, 2] = np.inf
  _, kept = jaxbn.batch_norm(x, None, stats, training=True, momentum=0.5)
  _, (_, mean, _var) = ref.bn_forward(x[:, :1], np.ones(1), np.zeros(1))
  np.testing.assert_array_equal(np.asarray(kept["mean"][1:]), stats["mean"][1:])
  np.testing.assert_array_equal(np.asarray(kept["var"][1:]), stats["var"][1:])
  _assert_rel(kept["mean"][:1], ref.running_update(stats["mean"][:1], mean, 0.5), rtol=1e-5)
  _, poisoned = jaxbn.batch_norm(x, None, stats, training=True, skip_nonfinite=False)
  assert np.isnan(poisoned["mean"][1]) and not np.isfinite(poisoned["var"][2])


def test_moments_empty_batch_is_defined():
  x = np.ones((4, 2), np.float32)
  m = jaxbn.moments(x, mask=np.zeros((4, 1), bool))
  np.testing.assert_array_equal(m.count, [0, 0])
  np.testing.assert_array_equal(m.mean, [0, 0])
  np.testing.assert_array_equal(m.var, [0, 0])


def test_jit_and_vmap_without_axis_name():
  x, scale, bias, stats = _data((3, 16, 4), -1)
  fn = lambda x: jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, stats, training=True)[0]
  batched = jax.jit(jax.vmap(fn))(x)
  for i in range(3):
    _assert_rel(batched[i], ref.bn_forward(x[i], scale, bias)[0], rtol=1e-5, atol=1e-5)


# ---- the shifted single pass itself ------------------------------------------


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_shifted_moments_match_numpy(shape, axis, offset):
  from jaxbn import reductions

  x, *_ = _data(shape, axis, seed=12)
  x = x + np.float32(offset)
  _, mean, var = ref.batch_moments(x, axis)
  count, m, m2, _ = reductions._shifted_moments(jnp.asarray(x), None, reductions.feature_axes(x.ndim, axis))
  _assert_rel(m, mean, rtol=1e-6, atol=1e-6)
  _assert_rel(m2 / count, var, rtol=1e-4 if offset else 1e-5)


def test_the_functions_keywords_are_the_options_fields():
  """batch_norm and batch_renorm hand their keywords to BNOptions by name (BNOptions.from_keywords):
  every field but renorm is a keyword of both, and they have no other keywords than their own."""
  fields = set(jaxbn.BNOptions._fields) - {"renorm"}

  def keywords(fn):
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

  assert keywords(jaxbn.batch_norm) == fields | {"training", "mask"}
  assert keywords(jaxbn.batch_renorm) == fields | {"training", "mask", "r_max", "d_max", "stats_axis_name"}
