"""jaxbn.pytorch: a PyTorch BN layer's tensors and momentum in jaxbn, computing as PyTorch does.

The oracle is PyTorch's BatchNorm as its documentation writes it, in NumPy float64 (no torch
needed): training normalizes by the batch's biased variance and updates
running = (1 - m) * running + m * batch statistic with the *unbiased* variance; inference
normalizes by the running statistics.
"""

import jax
import numpy as np
import pytest

import jaxbn
from jaxbn import pytorch

RNG = np.random.default_rng(0)
F, N = 5, 12
TORCH = {
  "weight": RNG.normal(size=F),
  "bias": RNG.normal(size=F),
  "running_mean": RNG.normal(size=F),
  "running_var": RNG.uniform(0.5, 2.0, size=F),
}
MOMENTUM, EPS = 0.3, 1e-3  # not the defaults of either framework


def _torch_reference(x, training: bool):
  """(y, running_mean, running_var) of torch.nn.BatchNorm1d(F, momentum=MOMENTUM, eps=EPS)."""
  w, b, rm, rv = (np.float64(TORCH[k]) for k in ("weight", "bias", "running_mean", "running_var"))
  if not training:
    return (x - rm) / np.sqrt(rv + EPS) * w + b, rm, rv
  mean, var = x.mean(0), x.var(0)
  y = (x - mean) / np.sqrt(var + EPS) * w + b
  return y, (1 - MOMENTUM) * rm + MOMENTUM * mean, (1 - MOMENTUM) * rv + MOMENTUM * var * N / (N - 1)


@pytest.mark.parametrize("training", [True, False])
def test_a_converted_layer_computes_and_updates_as_pytorch(training):
  variables, fields = pytorch.from_torch_bn(*TORCH.values(), momentum=MOMENTUM, eps=EPS)
  assert fields == {"momentum": pytest.approx(1 - MOMENTUM), "epsilon": EPS, "unbiased": True}
  x = RNG.normal(2.0, 3.0, size=(N, F)).astype(np.float32)
  layer = jaxbn.BatchNorm(use_running_average=not training, **fields)
  y, updates = layer.apply(variables, x, mutable=["batch_stats"])
  want_y, want_mean, want_var = _torch_reference(np.float64(x), training)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], want_var, rtol=1e-5)


def test_the_nnx_layer_takes_the_same_fields():
  from flax import nnx

  variables, fields = pytorch.from_torch_bn(*TORCH.values(), momentum=MOMENTUM, eps=EPS)
  layer = jaxbn.nnx.BatchNorm(F, **fields, rngs=nnx.Rngs(0))
  for name, value in {**variables["params"], **variables["batch_stats"]}.items():
    getattr(layer, name)[...] = value
  x = RNG.normal(size=(N, F)).astype(np.float32)
  want_y, want_mean, want_var = _torch_reference(np.float64(x), training=True)
  np.testing.assert_allclose(layer(x), want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.mean[...], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.var[...], want_var, rtol=1e-5)


def test_to_torch_is_the_inverse():
  variables, fields = pytorch.from_torch_bn(*TORCH.values(), momentum=MOMENTUM, eps=EPS)
  tensors, arguments = pytorch.to_torch_bn(variables, momentum=fields["momentum"], epsilon=fields["epsilon"])
  for name, value in TORCH.items():
    np.testing.assert_allclose(tensors[name], value, rtol=1e-6)
  assert arguments == {"momentum": pytest.approx(MOMENTUM), "eps": EPS}
  assert jax.tree.map(np.shape, variables) == {
    "params": {"scale": (F,), "bias": (F,)},
    "batch_stats": {"mean": (F,), "var": (F,)},
  }


def test_affine_false_is_scale_one_and_bias_zero():
  variables, _ = pytorch.from_torch_bn(None, None, TORCH["running_mean"], TORCH["running_var"])
  np.testing.assert_array_equal(variables["params"]["scale"], 1.0)
  np.testing.assert_array_equal(variables["params"]["bias"], 0.0)


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(momentum=None), "momentum: PyTorch's None"),
    (dict(momentum=1.5), "momentum: expected PyTorch's momentum in [0, 1]"),
    (dict(eps=0.0), "eps: expected a positive number"),
    (dict(weight=np.ones(F + 1)), f"weight: expected shape ({F},)"),
    (dict(running_var=-np.ones(F)), "running_var: expected finite values >= 0"),
    (dict(running_mean=np.ones((F, 2))), "running_mean: expected shape one value per feature"),
  ],
)
def test_bad_input_names_the_argument(change, message):
  arguments = {**TORCH, "momentum": 0.1, "eps": 1e-5, **change}
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
    pytorch.from_torch_bn(**arguments)
