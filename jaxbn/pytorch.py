"""PyTorch BN layers' tensors to jaxbn's variables and back, with the conventions that differ.

    variables, fields = jaxbn.pytorch.from_torch_bn(state["bn1.weight"], state["bn1.bias"],
                                                   state["bn1.running_mean"], state["bn1.running_var"],
                                                   momentum=0.1, eps=1e-5)
    layer = jaxbn.BatchNorm(**fields)      # momentum 0.9, epsilon 1e-5, unbiased=True

What differs between `torch.nn.BatchNorm2d` and `jaxbn.BatchNorm` (flax's conventions):

- **momentum** is the weight of the *new* batch in PyTorch (`running = (1 - m) * running + m * batch`,
  default 0.1) and of the *old* value in flax (default 0.99): jaxbn's momentum is 1 - PyTorch's.
  PyTorch's `momentum=None` (a cumulative average over `num_batches_tracked`) has no moving-
  average equivalent and is refused.
- **running variance**: PyTorch updates it with the *unbiased* batch variance (n/(n-1)), flax with
  the biased one; both normalize a training batch by its biased variance. `unbiased=True` makes
  jaxbn's update PyTorch's; at inference both divide by sqrt(running_var + eps), so the stored
  values carry over unchanged.
- **epsilon** is per layer in PyTorch (`eps`, default 1e-5, flax's default 1e-5 too): kept.
- **names**: weight/bias -> scale/bias (params), running_mean/running_var -> mean/var (batch_stats).

The functions take and return NumPy-compatible arrays (a torch tensor: `t.numpy()`); jaxbn never
imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["from_torch_bn", "from_torch_momentum", "to_torch_bn", "to_torch_momentum"]


def from_torch_momentum(momentum: float | None) -> float:
  """PyTorch's BN momentum (weight of the new batch) -> jaxbn's / flax's (weight of the old value)."""
  if momentum is None:
    raise ValueError(
      "momentum: PyTorch's None (a cumulative average of every batch) has no moving-average equivalent; "
      "give the momentum to continue with (PyTorch's default is 0.1)."
    )
  if not 0.0 <= float(momentum) <= 1.0:
    raise ValueError(f"momentum: expected PyTorch's momentum in [0, 1], got {momentum}.")
  return round(1.0 - float(momentum), 12)  # 1 - (1 - 0.1) is 0.1, not 0.09999999999999998


def to_torch_momentum(momentum: float) -> float:
  """jaxbn's / flax's BN momentum -> PyTorch's."""
  if not 0.0 <= float(momentum) <= 1.0:
    raise ValueError(f"momentum: expected jaxbn's momentum in [0, 1], got {momentum}.")
  return round(1.0 - float(momentum), 12)  # 1 - (1 - 0.1) is 0.1, not 0.09999999999999998


def _vector(name: str, value, features: int | None) -> np.ndarray:
  array = np.asarray(value, np.float32)
  if array.ndim != 1 or (features is not None and array.shape[0] != features):
    want = f"({features},)" if features is not None else "one value per feature"
    raise ValueError(f"{name}: expected shape {want}, got {array.shape}.")
  return array


def from_torch_bn(
  weight, bias, running_mean, running_var, *, momentum: float | None = 0.1, eps: float = 1e-5
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A PyTorch BN layer's tensors -> (jaxbn variables, jaxbn.BatchNorm fields).

  Args:
    weight, bias: the affine parameters (None for `affine=False`: scale 1, bias 0).
    running_mean, running_var: the running statistics, one value per feature.
    momentum: the PyTorch layer's momentum (default 0.1).
    eps: the PyTorch layer's eps.

  Returns:
    `({"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}, {"momentum", "epsilon",
    "unbiased": True})`: the variables of one layer, and the fields that make a
    `jaxbn.BatchNorm` (or `jaxbn.nnx.BatchNorm`) compute and update as the PyTorch layer does.
  """
  mean = _vector("running_mean", running_mean, None)
  features = mean.shape[0]
  var = _vector("running_var", running_var, features)
  if np.any(var < 0) or not np.all(np.isfinite(var)):
    raise ValueError("running_var: expected finite values >= 0.")
  scale = np.ones(features, np.float32) if weight is None else _vector("weight", weight, features)
  shift = np.zeros(features, np.float32) if bias is None else _vector("bias", bias, features)
  if not eps > 0:
    raise ValueError(f"eps: expected a positive number, got {eps}.")
  variables = {"params": {"scale": scale, "bias": shift}, "batch_stats": {"mean": mean, "var": var}}
  fields = {"momentum": from_torch_momentum(momentum), "epsilon": float(eps), "unbiased": True}
  return variables, fields


def to_torch_bn(variables: dict[str, Any], *, momentum: float = 0.99, epsilon: float = 1e-5):
  """jaxbn variables of one BN layer -> (PyTorch state-dict tensors as NumPy, PyTorch constructor
  arguments): `{"weight", "bias", "running_mean", "running_var"}`, `{"momentum", "eps"}`.
  The inverse of `from_torch_bn`."""
  params, stats = variables.get("params", {}), variables["batch_stats"]
  mean = _vector("batch_stats.mean", stats["mean"], None)
  features = mean.shape[0]
  tensors = {
    "weight": _vector("params.scale", params.get("scale", np.ones(features)), features),
    "bias": _vector("params.bias", params.get("bias", np.zeros(features)), features),
    "running_mean": mean,
    "running_var": _vector("batch_stats.var", stats["var"], features),
  }
  return tensors, {"momentum": to_torch_momentum(momentum), "eps": float(epsilon)}
