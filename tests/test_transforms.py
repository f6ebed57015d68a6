"""Every JAX transform through training-mode BN (SPEC §4.8).

Oracle: plain autodiff of a definitional two-pass BN in float64, and flax's
own modules. jaxbn runs in float64 too where the comparison is tight, so a
wrong derivative rule cannot hide behind float32 round-off.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import enable_x64
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

R = 4  # replicas for the vmapped (synced) cases


def reference_bn(x, scale, bias, axis=-1, mask=None, eps=1e-5):
  """Two-pass BN over the valid elements, written for plain autodiff."""
  faxes = jaxbn.functional.feature_axes(x.ndim, axis)
  raxes = tuple(a for a in range(x.ndim) if a not in faxes)
  w = jnp.ones(x.shape, x.dtype) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  m = w.sum(raxes, keepdims=True)
  mean = (w * x).sum(raxes, keepdims=True) / m
  var = (w * (x - mean) ** 2).sum(raxes, keepdims=True) / m
  e = lambda v: jnp.expand_dims(v, raxes)
  return e(scale) * (x - mean) / jnp.sqrt(var + eps) + e(bias)


def _stats(c, dtype):
  return {"mean": jnp.zeros(c, dtype), "var": jnp.ones(c, dtype)}


CASES = {
  # name: (shape, axis, masked, synced over a vmapped replica axis)
  "dense": ((12, 3), -1, False, False),
  "conv_nchw": ((3, 2, 4, 3), 1, False, False),
  "masked": ((12, 3), -1, True, False),
  "synced_vmap": ((R, 5, 3), -1, False, True),
  "synced_masked": ((R, 5, 3), -1, True, True),
}


def _case(name, dtype=np.float64, seed=0):
  shape, axis, masked, synced = CASES[name]
  rng = np.random.default_rng(seed)
  x = rng.normal(2.0, 1.5, shape).astype(dtype)
  c = shape[axis]
  scale = rng.normal(1.0, 0.3, c).astype(dtype)
  bias = rng.normal(0.0, 0.3, c).astype(dtype)
  mask = None
  if masked:
    mask = rng.random(shape) < 0.7
    mask[(0,) * (len(shape) - 1)] = True  # two valid rows: every feature has statistics
    mask[(1,) * (len(shape) - 1)] = True

  def jaxbn_fn(x, scale, bias):
    if synced:
      run = lambda xr, mr: jaxbn.batch_norm(
        xr, {"scale": scale, "bias": bias}, _stats(c, x.dtype), training=True, axis=axis, axis_name="r", mask=mr
      )[0]
      return (
        jax.vmap(run, axis_name="r")(x, mask)
        if mask is not None
        else jax.vmap(lambda xr: run(xr, None), axis_name="r")(x)
      )
    return jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, _stats(c, x.dtype), training=True, axis=axis, mask=mask)[
      0
    ]

  def reference_fn(x, scale, bias):
    if synced:  # the concatenated global batch
      flat = reference_bn(
        x.reshape((-1, *x.shape[2:])), scale, bias, axis, None if mask is None else mask.reshape((-1, *x.shape[2:]))
      )
      return flat.reshape(x.shape)
    return reference_bn(x, scale, bias, axis, mask)

  return (x, scale, bias), jaxbn_fn, reference_fn


def _close(actual, expected, rtol=1e-9, atol=1e-9):
  """Leaf-by-leaf closeness of two equal pytrees (hessians are nested tuples)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _tangents(args, seed=1):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=a.shape).astype(a.dtype) for a in args)


@pytest.mark.parametrize("name", CASES)
def test_jvp_and_linearize(name):
  with enable_x64():
    args, f, ref = _case(name)
    t = _tangents(args)
    y, dy = jax.jvp(f, args, t)
    y_ref, dy_ref = jax.jvp(ref, args, t)
    _close(y, y_ref)
    _close(dy, dy_ref)
    y_lin, f_lin = jax.linearize(f, *args)
    _close(y_lin, y_ref)
    _close(f_lin(*t), dy_ref)
    t2 = _tangents(args, seed=2)
    _close(f_lin(*t2), jax.jvp(ref, args, t2)[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "masked", "synced_vmap"])
def test_jacfwd_equals_jacrev_equals_reference(name):
  with enable_x64():
    args, f, ref = _case(name)
    for argnum in (0, 1):
      expected = jax.jacrev(ref, argnum)(*args)
      _close(jax.jacfwd(f, argnum)(*args), expected)
      _close(jax.jacrev(f, argnum)(*args), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["masked", "synced_vmap"])  # second order is slow to compile
def test_hessian_and_grad_of_grad(name):
  with enable_x64():
    args, f, ref = _case(name)
    w = _tangents(args, seed=3)[0]
    loss = lambda g: lambda x, s, b: jnp.sum(jnp.sin(g(x, s, b)) * w)
    _close(jax.hessian(loss(f), (0, 1))(*args), jax.hessian(loss(ref), (0, 1))(*args), rtol=1e-8, atol=1e-8)
    grad_norm = lambda g: lambda x, s, b: jnp.sum(jax.grad(loss(g), (0, 1))(x, s, b)[0] ** 2)
    _close(jax.grad(grad_norm(f), (0, 1, 2))(*args), jax.grad(grad_norm(ref), (0, 1, 2))(*args), rtol=1e-8, atol=1e-8)


def test_float32_derivatives_match_float64_reference():
  args64, _, ref = _case("masked")
  with enable_x64():
    args64 = tuple(jnp.asarray(a, jnp.float64) for a in args64)
    t64 = _tangents(args64)
    _, dy_ref = jax.jvp(ref, args64, t64)
    dx_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * t64[0]))(*args64)
  args32, f, _ = _case("masked", dtype=np.float32)
  t32 = tuple(np.asarray(t, np.float32) for t in t64)
  _, dy = jax.jvp(f, args32, t32)
  dx = jax.grad(lambda *a: jnp.sum(f(*a) * t32[0]))(*args32)
  assert dy.dtype == jnp.float32
  _close(dy, dy_ref, rtol=1e-4, atol=1e-4)
  _close(dx, dx_ref, rtol=1e-4, atol=1e-4)


def test_jvp_synced_under_shard_map_equals_global_batch():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("d",))
  rng = np.random.default_rng(7)
  x = rng.normal(1.0, 2.0, (8, 4, 3)).astype(np.float32)
  dx = rng.normal(size=x.shape).astype(np.float32)
  scale = np.array([0.5, 1.0, 2.0], np.float32)

  def local(x, dx):
    f = lambda x: jaxbn.batch_norm(x, {"scale": scale}, _stats(3, jnp.float32), training=True, axis_name="d")[0]
    return jax.jvp(f, (x,), (dx,))

  run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(P("d"), P("d"))))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))
  y, dy = run(put(x), put(dx))
  g = lambda x: reference_bn(x, scale, np.zeros(3, np.float32))
  y_ref, dy_ref = jax.jvp(g, (x.reshape(-1, 3),), (dx.reshape(-1, 3),))
  _close(y.reshape(-1, 3), y_ref, rtol=1e-5, atol=1e-5)
  _close(dy.reshape(-1, 3), dy_ref, rtol=1e-4, atol=1e-4)


# ---- the modules, against flax's ------------------------------------------


def _linen_pair(**kw):
  return jaxbn.BatchNorm(use_running_average=False, **kw), nn.BatchNorm(use_running_average=False, **kw)


def test_linen_forward_mode_matches_flax():
  x = jax.random.normal(jax.random.key(0), (16, 5)) * 2 + 1
  t = jax.random.normal(jax.random.key(1), x.shape)
  ours, theirs = _linen_pair(momentum=0.9)
  variables = theirs.init(jax.random.key(2), x)
  variables = {
    "params": {"scale": jnp.linspace(0.5, 2, 5), "bias": jnp.linspace(-1, 1, 5)},
    "batch_stats": variables["batch_stats"],
  }

  def out(module):
    return lambda x: module.apply(variables, x, mutable=["batch_stats"])

  (y, upd), (dy, _) = jax.jvp(out(ours), (x,), (t,))
  (y_f, upd_f), (dy_f, _) = jax.jvp(out(theirs), (x,), (t,))
  _close(y, y_f, rtol=1e-5, atol=1e-5)
  _close(dy, dy_f, rtol=1e-4, atol=1e-4)
  _close(upd["batch_stats"]["var"], upd_f["batch_stats"]["var"], rtol=1e-5, atol=1e-6)
  _close(jax.jacfwd(lambda x: out(ours)(x)[0])(x), jax.jacfwd(lambda x: out(theirs)(x)[0])(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_nnx_forward_mode_matches_flax():
  x = jax.random.normal(jax.random.key(0), (16, 5)) * 2 + 1
  t = jax.random.normal(jax.random.key(1), x.shape)

  def out(cls):
    graphdef, state = nnx.split(cls(5, use_running_average=False, rngs=nnx.Rngs(0)))
    # A fresh copy of the variables inside each trace, as NNX requires.
    return lambda x: nnx.merge(graphdef, state, copy=True)(x)

  y, dy = jax.jvp(out(jaxbn.nnx.BatchNorm), (x,), (t,))
  y_f, dy_f = jax.jvp(out(nnx.BatchNorm), (x,), (t,))
  _close(y, y_f, rtol=1e-5, atol=1e-5)
  _close(dy, dy_f, rtol=1e-4, atol=1e-4)
  h = lambda f: jax.hessian(lambda x: jnp.sum(f(x) ** 3))(x[:4])
  _close(h(out(jaxbn.nnx.BatchNorm)), h(out(nnx.BatchNorm)), rtol=1e-3, atol=1e-3)


def test_remat_and_jit_give_the_same_gradient():
  args, f, _ = _case("masked", dtype=np.float32)
  loss = lambda g: lambda *a: jnp.sum(jnp.tanh(g(*a)))
  plain = jax.grad(loss(f), (0, 1, 2))(*args)
  for wrapped in (jax.checkpoint(f), jax.jit(f), jax.remat(jax.jit(f))):
    for a, b in zip(jax.jit(jax.grad(loss(wrapped), (0, 1, 2)))(*args), plain, strict=True):
      _close(a, b, rtol=1e-6, atol=1e-6)


def test_linen_scan_over_bn_layers_matches_flax():
  class Block(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, carry, _):
      h = nn.Dense(4, kernel_init=nn.initializers.orthogonal())(carry)
      return jnp.tanh(self.norm(use_running_average=False)(h)), None

  def model(norm):
    return nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}, length=3)(norm)

  x = jax.random.normal(jax.random.key(0), (8, 4))
  variables = model(nn.BatchNorm).init(jax.random.key(1), x, None)
  outputs = []
  for norm in (jaxbn.BatchNorm, nn.BatchNorm):
    f = lambda v, norm=norm: model(norm).apply(v, x, None, mutable=["batch_stats"])
    (y, _), upd = f(variables)
    grads = jax.grad(lambda p, f=f: jnp.sum(f({**variables, "params": p})[0][0] ** 2))(variables["params"])
    outputs.append((y, upd, grads))
  (y, upd, grads), (y_f, upd_f, grads_f) = outputs
  _close(y, y_f, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-4, atol=1e-5), upd, upd_f)
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-3, atol=1e-4), grads, grads_f)


def test_eval_shape_and_export_roundtrip():
  args, f, _ = _case("conv_nchw", dtype=np.float32)
  step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1, 2)))
  shapes = jax.eval_shape(step, *args)
  assert shapes[1][0].shape == args[0].shape and shapes[1][0].dtype == jnp.float32
  exported = jax.export.export(step)(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
  restored = jax.export.deserialize(exported.serialize())
  for a, b in zip(jax.tree.leaves(restored.call(*args)), jax.tree.leaves(step(*args)), strict=True):
    _close(a, b, rtol=1e-6, atol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _nnx_train_step(cls, x):
  model = cls(3, use_running_average=False, rngs=nnx.Rngs(0))
  loss = lambda m: jnp.sum(m(x) ** 3)
  grads = nnx.grad(loss)(model)
  return grads["scale"][...], model.mean[...]


def test_nnx_grad_under_jit_matches_flax():
  x = jax.random.normal(jax.random.key(3), (10, 3)) + 2
  g, mean = _nnx_train_step(jaxbn.nnx.BatchNorm, x)
  g_f, mean_f = _nnx_train_step(nnx.BatchNorm, x)
  _close(g, g_f, rtol=1e-4, atol=1e-4)
  _close(mean, mean_f, rtol=1e-6, atol=1e-6)
