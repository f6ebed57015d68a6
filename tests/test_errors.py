"""Bad input gets a clear error naming the argument (SPEC §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

X = np.ones((8, 3), np.float32)
STATS = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}


def bn(x=X, params=None, stats=STATS, **kw):
  kw.setdefault("training", True)
  return jaxbn.batch_norm(x, params, stats, **kw)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, bool])
def test_integer_input(dtype):
  with pytest.raises(TypeError, match=r"x: expected a floating-point array.*int|x: expected a floating-point array.*bool"):
    bn(X.astype(dtype))
  with pytest.raises(TypeError, match="x: expected a floating-point"):
    jaxbn.moments(X.astype(dtype))


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range(axis):
  with pytest.raises(ValueError, match=r"axis: feature axis -?\d+ is out of range for input of rank 2"):
    bn(axis=axis)


def test_repeated_axis():
  with pytest.raises(ValueError, match="axis: repeated feature axis"):
    bn(axis=(1, -1))


@pytest.mark.parametrize("which,value", [
    ("stats_mean", np.zeros(4)), ("stats_var", np.ones((3, 1))),
    ("scale", np.ones(2)), ("bias", np.zeros(5))])
def test_shape_mismatch(which, value):
  stats, params = dict(STATS), {}
  if which.startswith("stats"):
    stats[which.split("_")[1]] = value
    name = f'stats\\["{which.split("_")[1]}"\\]'
  else:
    params[which] = value
    name = f'params\\["{which}"\\]'
  with pytest.raises(ValueError, match=rf"{name}: expected shape \(3,\)"):
    bn(params=params, stats=stats)


def test_stats_and_params_keys():
  with pytest.raises(ValueError, match="stats: expected a dict with keys 'mean' and 'var'"):
    bn(stats={"mean": STATS["mean"]})
  with pytest.raises(ValueError, match="params: unexpected keys \\['gamma'\\]"):
    bn(params={"gamma": np.ones(3)})


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_range(momentum):
  with pytest.raises(ValueError, match=r"momentum: expected a value in \[0, 1\]"):
    bn(momentum=momentum)


def test_negative_epsilon():
  with pytest.raises(ValueError, match="epsilon: expected a non-negative value"):
    bn(epsilon=-1e-5)


def test_mask_does_not_broadcast():
  with pytest.raises(ValueError, match=r"mask: shape \(8, 2\) does not broadcast to the input shape \(8, 3\)"):
    bn(mask=np.ones((8, 2), bool))
  with pytest.raises(TypeError, match="mask: expected a boolean array"):
    bn(mask=np.ones((8, 3), np.float32))


def test_single_element_per_feature_without_sync():
  with pytest.raises(ValueError, match="x: training needs more than one value per feature"):
    bn(np.ones((1, 3), np.float32))
  # Inference, or a synced batch, is fine with one element per device.
  bn(np.ones((1, 3), np.float32), training=False)
  y = jax.vmap(lambda x: bn(x, axis_name="b")[0], axis_name="b")(np.arange(6.0, dtype=np.float32).reshape(2, 1, 3))
  assert np.all(np.isfinite(y))


def test_unbound_axis_name_says_which_transform():
  with pytest.raises(ValueError, match=r"axis_name: 'batch' is not bound.*jax.pmap.*jax.vmap.*jax.shard_map"):
    bn(axis_name="batch")
  with pytest.raises(ValueError, match="axis_name: 'batch' is not bound"):
    jax.jit(lambda x: jaxbn.moments(x, axis_name="batch"))(X)
  with pytest.raises(ValueError, match="axis_name: 'batch' is not bound"):
    jaxbn.sync_batch_stats({"bn": STATS}, "batch")


def test_module_errors_name_the_argument():
  with pytest.raises(TypeError, match="x: expected a floating-point"):
    jaxbn.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((4, 3), jnp.int32))
  with pytest.raises(ValueError, match="momentum"):
    jaxbn.BatchNorm(use_running_average=False, momentum=2.0).init(jax.random.key(0), X)
  from flax import nnx
  with pytest.raises(ValueError, match="use_running_average"):
    jaxbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(X)
