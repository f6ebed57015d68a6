"""Argument checks of jaxbn: each error names the argument and what was expected.

Imports jax only.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
  "UnboundAxisNameError",
  "axis_names",
  "check_axis_name",
  "check_feature_array",
  "check_hyperparameters",
  "check_input",
  "check_mask",
  "feature_axes",
]


def feature_axes(ndim: int, axis: int | Sequence[int]) -> tuple[int, ...]:
  """Sorted, non-negative feature axes; `ValueError` if one is out of range."""
  axes = (axis,) if isinstance(axis, int | numbers.Integral) else tuple(axis)
  if not axes:
    raise ValueError("axis: expected at least one feature axis, got ().")
  out: list[int] = []
  for a in axes:
    if not isinstance(a, numbers.Integral):
      raise TypeError(f"axis: expected int or a sequence of ints, got {axis!r}.")
    a = int(a)
    if not -ndim <= a < ndim:
      raise ValueError(
        f"axis: feature axis {a} is out of range for input of rank {ndim} (expected -{ndim} <= axis < {ndim})."
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"axis: repeated feature axis in {axis!r}.")
  return tuple(sorted(out))


def check_input(x) -> jax.Array:
  """Floating or complex array; integers and booleans become float32 (as in flax)."""
  if not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    x = jnp.asarray(x, jnp.float32)
  elif not jnp.issubdtype(x.dtype, jnp.inexact):
    raise TypeError(
      f"x: expected a numeric array (float32, bfloat16, float16, float64, complex or integer), got dtype {x.dtype}."
    )
  if x.ndim < 1:
    raise ValueError("x: expected an array with at least one dimension, got a scalar.")
  return x


def check_mask(mask, shape) -> jax.Array | None:
  """Boolean mask broadcastable to `shape`; a 0/1 integer mask counts as boolean."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if jnp.issubdtype(mask.dtype, jnp.integer):
    mask = mask != 0
  elif mask.dtype != jnp.bool_:
    raise TypeError(f"mask: expected a boolean (or 0/1 integer) array, got dtype {mask.dtype}.")
  try:
    out_shape = jnp.broadcast_shapes(mask.shape, shape)
  except ValueError:
    out_shape = None
  if out_shape != tuple(shape):
    raise ValueError(f"mask: shape {mask.shape} does not broadcast to the input shape {tuple(shape)}.")
  return mask


def check_feature_array(value, name: str, fshape) -> jax.Array:
  value = jnp.asarray(value)
  if value.shape != tuple(fshape):
    raise ValueError(f"{name}: expected shape {tuple(fshape)} (the size of the feature axes), got {value.shape}.")
  return value


def check_hyperparameters(momentum, epsilon) -> None:
  # Traced values cannot be checked here; concrete ones are checked loudly.
  if isinstance(momentum, numbers.Real) and not 0.0 <= float(momentum) <= 1.0:
    raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}.")
  if not isinstance(epsilon, numbers.Real):
    raise TypeError(f"epsilon: expected a Python float, got {type(epsilon).__name__}.")
  if epsilon < 0:
    raise ValueError(f"epsilon: expected a non-negative value, got {epsilon}.")


def axis_names(axis_name) -> tuple:
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


class UnboundAxisNameError(NameError, ValueError):
  """`axis_name` names an axis that no enclosing transform binds.

  A `NameError`, as flax and equinox raise (and users catch), and a
  `ValueError`, as every other bad argument to jaxbn.
  """


def check_axis_name(axis_name) -> None:
  """Fails with a clear message when no transform binds `axis_name`."""
  for name in axis_names(axis_name):
    try:
      lax.axis_size(name)
    except NameError:
      raise UnboundAxisNameError(
        f"axis_name: {name!r} is not bound by any enclosing transform. Synced "
        f"batch statistics need a named axis: call inside jax.pmap(..., "
        f"axis_name={name!r}), jax.vmap(..., axis_name={name!r}) or "
        f"jax.shard_map over a mesh with an axis named {name!r}; or pass "
        f"axis_name=None for per-device statistics."
      ) from None


def choose(name: str, value, options: dict):
  """options[value], or a ValueError naming `name` and what it may be."""
  if value not in options:
    raise ValueError(f"{name}: expected one of {', '.join(options)}, got {value!r}.")
  return options[value]
