"""flax's own Linen BatchNorm tests, ported onto jaxbn.BatchNorm.

Ported (rewritten, not copied) from google/flax at commit
18f8f311c275d57f46d95e41b15aa97b454754c0:
  tests/linen/linen_test.py             test_batch_norm, test_batch_norm_complex,
                                        test_batch_norm_multi_init
  tests/linen/linen_transforms_test.py  test_vmap_batchnorm
  tests/linen/summary_test.py           test_module_reuse (tabulate with BatchNorm)
Where flax's test checks a property (zero mean, unit variance, the running
average formula) the port checks the same property; where it compares two
models, flax's nn.BatchNorm is the oracle for jaxbn.BatchNorm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import random

import jaxbn


def _nan_masked_input(dtype, test_mask):
  key1, key2 = random.split(random.key(0))
  x = random.normal(key1, (4, 3, 2), dtype=dtype)
  if not test_mask:
    return x, None
  m = random.randint(key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32).astype(jnp.bool_)
  return jnp.where(m, x, jnp.nan), m


@pytest.mark.parametrize("test_mask", [True, False])
def test_batch_norm(test_mask):
  x, m = _nan_masked_input(jnp.float32, test_mask)
  model = jaxbn.BatchNorm(momentum=0.9, use_running_average=False)
  y, variables = model.init_with_output(random.key(3), x, mask=m)
  np.testing.assert_allclose(y.mean((0, 1), where=m), [0.0, 0.0], atol=1e-4)
  np.testing.assert_allclose(y.var((0, 1), where=m), [1.0, 1.0], rtol=1e-4)
  _, updated = model.apply(variables, x, mutable=["batch_stats"], mask=m)
  ema = updated["batch_stats"]
  np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=m), atol=1e-4)
  np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=m), rtol=1e-4)
  # flax's module as the oracle on the same variables.
  _, expected = nn.BatchNorm(momentum=0.9, use_running_average=False).apply(
    variables, x, mutable=["batch_stats"], mask=m
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updated, expected)


@pytest.mark.parametrize("test_mask", [True, False])
def test_batch_norm_complex(test_mask):
  x, m = _nan_masked_input(jnp.complex64, test_mask)
  model = jaxbn.BatchNorm(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
  y, variables = model.init_with_output(random.key(3), x, mask=m)
  mean = y.mean((0, 1), where=m)
  np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-4)
  np.testing.assert_allclose(y.var((0, 1), where=m), [1.0, 1.0], rtol=1e-4)
  assert mean.dtype == jnp.complex64
  _, updated = model.apply(variables, x, mutable=["batch_stats"], mask=m)
  ema = updated["batch_stats"]
  np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=m), atol=1e-4)
  np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=m), rtol=1e-4)
  _, expected = nn.BatchNorm(momentum=0.9, use_running_average=False, dtype=jnp.complex64).apply(
    variables, x, mutable=["batch_stats"], mask=m
  )
  for key in ("mean", "var"):
    assert ema[key].dtype == expected["batch_stats"][key].dtype
    np.testing.assert_allclose(ema[key], expected["batch_stats"][key], rtol=1e-5, atol=1e-6)


def test_batch_norm_multi_init():
  class Foo(nn.Module):
    @nn.compact
    def __call__(self, x):
      norm = jaxbn.BatchNorm(name="norm", use_running_average=False, axis_name="batch")
      x = norm(x)
      return x, norm(x)

  x = random.normal(random.key(1), (2, 4))
  (y1, y2), _ = Foo().init_with_output(random.key(0), x)  # no axis "batch" bound at init
  np.testing.assert_allclose(y1, y2, rtol=0.005)


def test_vmap_batchnorm():
  key1, key2, key3 = random.split(random.key(3), 3)
  x = random.uniform(key1, (4, 4))
  x2 = random.uniform(key2, (5, 4, 4))

  class MlpBn(nn.Module):
    axis_name: str | None = None
    norm: type = jaxbn.BatchNorm

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(3)(x)
      return self.norm(axis_name=self.axis_name, use_running_average=False)(x)

  def vmapped(norm):
    return nn.vmap(
      MlpBn,
      in_axes=(0,),
      variable_axes={"params": None, "batch_stats": None},
      split_rngs={"params": False},
      axis_name="batch",
    )(axis_name="batch", norm=norm)

  variables = MlpBn().init(key3, x)
  y1 = MlpBn().apply(variables, x2.reshape((-1, 4)), mutable=["batch_stats"])[0].reshape((5, 4, 3))
  y2, stats = vmapped(jaxbn.BatchNorm).apply(variables, x2, mutable=["batch_stats"])
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  _, stats_flax = vmapped(nn.BatchNorm).apply(variables, x2, mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, stats_flax)


@pytest.mark.parametrize("use_running_average", [True, False])
def test_tabulate_module_reuse(use_running_average):
  def cnn(norm):
    class ConvBlock(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Conv(8, [3, 3])(x)
        x = norm(use_running_average=use_running_average)(x)
        return nn.relu(nn.Dropout(0.5, deterministic=True)(x))

    class CNN(nn.Module):
      @nn.compact
      def __call__(self, x):
        block = ConvBlock()
        return block(block(block(x)))

    return CNN()

  # A batch of one: the usual tabulate/init input, also in training mode.
  x = jnp.ones((1, 12, 12, 8))
  kwargs = dict(
    show_repeated=True,
    compute_flops=True,
    compute_vjp_flops=True,
    console_kwargs={"force_terminal": False, "width": 10_000},
  )
  ours = cnn(jaxbn.BatchNorm).tabulate(random.key(0), x, **kwargs).splitlines()
  theirs = cnn(nn.BatchNorm).tabulate(random.key(0), x, **kwargs).splitlines()
  rows = [i for i, line in enumerate(theirs) if "ConvBlock_0/BatchNorm_0" in line]
  assert len(rows) == 3
  assert [i for i, line in enumerate(ours) if "ConvBlock_0/BatchNorm_0" in line] == rows
  assert "mean" in ours[rows[0]] and "bias" in ours[rows[0]]  # variables shown on the first call
  assert "mean" not in ours[rows[1]] and "bias" not in ours[rows[2]]
  words = lambda line: [w for w in line.split() if not w.replace(",", "").replace(".", "").isdigit()]
  assert [words(row) for row in ours] == [words(row) for row in theirs]  # same table, flops aside
