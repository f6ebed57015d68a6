"""Bad input gets a clear error naming the argument (SPEC §5)."""

import jax
import numpy as np
import pytest

import jaxbn

X = np.ones((8, 3), np.float32)
STATS = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}


def bn(x=X, params=None, stats=STATS, **kw):
  kw.setdefault("training", True)
  return jaxbn.batch_norm(x, params, stats, **kw)


def test_non_numeric_input():
  with pytest.raises(TypeError, match=r"x: expected a numeric array.*got dtype <U1"):
    jaxbn.moments(np.full((4, 3), "a"))


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range(axis):
  with pytest.raises(ValueError, match=r"axis: feature axis -?\d+ is out of range for input of rank 2"):
    bn(axis=axis)


def test_repeated_axis():
  with pytest.raises(ValueError, match="axis: repeated feature axis"):
    bn(axis=(1, -1))


@pytest.mark.parametrize(
  "which,value",
  [("stats_mean", np.zeros(4)), ("stats_var", np.ones((3, 1))), ("scale", np.ones(2)), ("bias", np.zeros(5))],
)
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
  with pytest.raises(TypeError, match=r"mask: expected a boolean \(or 0/1 integer\) array, got dtype float32"):
    bn(mask=np.ones((8, 3), np.float32))


def test_unbound_axis_name_says_which_transform():
  # A NameError (what flax and equinox raise, and users catch) and a ValueError.
  for error in (NameError, ValueError):
    with pytest.raises(error, match=r"axis_name: 'batch' is not bound.*jax.pmap.*jax.vmap.*jax.shard_map"):
      bn(axis_name="batch")
  with pytest.raises(NameError, match="axis_name: 'batch' is not bound"):
    jax.jit(lambda x: jaxbn.moments(x, axis_name="batch"))(X)
  with pytest.raises(NameError, match="axis_name: 'batch' is not bound"):
    jaxbn.sync_batch_stats({"bn": STATS}, "batch")
  with pytest.raises(NameError, match="axis_name: 'b' is not bound"):
    jax.vmap(lambda x: bn(x, axis_name=("a", "b"))[0], axis_name="a")(np.ones((2, 4, 3), np.float32))
  with pytest.raises(NameError, match="'batch' is not bound"):
    jaxbn.BatchNorm(use_running_average=False, axis_name="batch").apply(
      {"params": {"scale": np.ones(3), "bias": np.zeros(3)}, "batch_stats": STATS}, X, mutable=["batch_stats"]
    )


def test_module_errors_name_the_argument():
  with pytest.raises(TypeError, match="x: expected a numeric array"):
    jaxbn.BatchNorm(use_running_average=False).init(jax.random.key(0), np.full((4, 3), "a"))
  with pytest.raises(ValueError, match="momentum"):
    jaxbn.BatchNorm(use_running_average=False, momentum=2.0).init(jax.random.key(0), X)
  from flax import nnx

  with pytest.raises(ValueError, match="use_running_average"):
    jaxbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(X)
