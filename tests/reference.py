"""NumPy float64 oracles: the paper's formulas, written out plainly."""

import numpy as np


def _split_axes(ndim, axis):
  faxes = tuple(sorted(a % ndim for a in np.atleast_1d(axis)))
  raxes = tuple(a for a in range(ndim) if a not in faxes)
  return faxes, raxes


def _expand(v, ndim, raxes):
  return np.expand_dims(v, raxes)


def batch_moments(x, axis=-1, mask=None):
  """Two-pass count, mean and biased variance over the valid elements."""
  x = np.asarray(x, np.float64)
  _, raxes = _split_axes(x.ndim, axis)
  w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  xz = np.where(w > 0, x, 0.0)
  count = w.sum(raxes)
  mean = xz.sum(raxes) / count
  var = (w * (xz - _expand(mean, x.ndim, raxes)) ** 2).sum(raxes) / count
  return count, mean, var


def bn_forward(x, scale, bias, axis=-1, eps=1e-5, mask=None):
  """Algorithm 1: returns y and the batch (count, mean, var)."""
  x = np.asarray(x, np.float64)
  _, raxes = _split_axes(x.ndim, axis)
  count, mean, var = batch_moments(x, axis, mask)
  e = lambda v: _expand(np.asarray(v, np.float64), x.ndim, raxes)
  xhat = (x - e(mean)) / np.sqrt(e(var) + eps)
  return e(scale) * xhat + e(bias), (count, mean, var)


def bn_backward(x, scale, g, axis=-1, eps=1e-5, mask=None):
  """Paper §3 (with a mask: sums over all outputs, correction on valid ones).

  dL/dbeta  = Σ g
  dL/dgamma = Σ g xhat
  dL/dx_i   = gamma / (m sqrt(var + eps)) (m g_i - w_i (Σ g + xhat_i Σ g xhat))
  """
  x = np.asarray(x, np.float64)
  g = np.asarray(g, np.float64)
  _, raxes = _split_axes(x.ndim, axis)
  count, mean, var = batch_moments(x, axis, mask)
  e = lambda v: _expand(np.asarray(v, np.float64), x.ndim, raxes)
  w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  xhat = (x - e(mean)) / np.sqrt(e(var) + eps)
  sum_g = g.sum(raxes)
  sum_gxhat = (g * xhat).sum(raxes)
  dx = e(scale) / (e(count) * np.sqrt(e(var) + eps)) * (e(count) * g - w * (e(sum_g) + xhat * e(sum_gxhat)))
  return dx, sum_gxhat, sum_g


def running_update(running, batch, momentum):
  return momentum * np.asarray(running, np.float64) + (1 - momentum) * np.asarray(batch, np.float64)
