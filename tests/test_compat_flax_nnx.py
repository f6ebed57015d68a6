"""flax's own NNX BatchNorm tests, ported onto jaxbn.nnx.BatchNorm.

Ported (rewritten, not copied) from google/flax at commit
18f8f311c275d57f46d95e41b15aa97b454754c0:
  tests/nnx/nn/normalization_test.py  test_nnx_linen_batchnorm_equivalence,
                                      test_nnx_linen_spectralnorm_equivalence
  tests/nnx/transforms_test.py        test_complex, test_complex_view,
                                      test_complex_functional, test_state_axes_simple,
                                      test_example, test_state_axes_from_state,
                                      test_graph_updates_unflatten
flax's tests compare its Linen and NNX modules bit for bit; the ports compare
jaxbn's two modules bit for bit, and each against flax's module of the same
kind. The transform tests run with jaxbn's class and with flax's, from the
same keys, and the results must agree.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import jaxbn

MASK = np.array([True, False, True, False, True])  # features 1 and 3 have no valid element


def _linen_model(norm_cls, dtype, param_dtype):
  class LinenModel(linen.Module):
    def setup(self):
      self.norm_layer = norm_cls(use_running_average=False, dtype=dtype, param_dtype=param_dtype)
      self.linear = linen.Dense(4, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, *, mask=None):
      return self.linear(self.norm_layer(x, mask=mask))

  return LinenModel()


def _nnx_model(norm_cls, dtype, param_dtype, linen_variables, **norm_kwargs):
  class NNXModel(nnx.Module):
    def __init__(self, rngs):
      self.norm_layer = norm_cls(
        5, use_running_average=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **norm_kwargs
      )
      self.linear = nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, mask=None):
      return self.linear(self.norm_layer(x, mask=mask))

  model = NNXModel(nnx.Rngs(42))
  model.linear.kernel[...] = linen_variables["params"]["linear"]["kernel"]
  model.linear.bias[...] = linen_variables["params"]["linear"]["bias"]
  return model


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("mask", [None, MASK])
def test_nnx_linen_batchnorm_equivalence(dtype, param_dtype, mask):
  x = jax.random.normal(jax.random.key(0), (10, 5))
  linen_model = _linen_model(jaxbn.BatchNorm, dtype, param_dtype)
  variables = linen_model.init(jax.random.key(1), x)
  linen_out, updates = linen_model.apply(variables, x, mask=mask, mutable=["batch_stats"])
  variables = {**variables, **updates}
  # flax's test passes an identity promote_dtype so NNX behaves as Linen.
  nnx_model = _nnx_model(
    jaxbn.nnx.BatchNorm,
    dtype,
    param_dtype,
    variables,
    use_fast_variance=False,  # accepted for flax's configurations; jaxbn's variance is always the two-pass one
    promote_dtype=lambda x, **kw: x,
  )
  nnx_out = nnx_model(x, mask=mask)
  np.testing.assert_array_equal(linen_out, nnx_out)
  for name, value in (("scale", nnx_model.norm_layer.scale), ("bias", nnx_model.norm_layer.bias)):
    np.testing.assert_array_equal(variables["params"]["norm_layer"][name], value[...])
  for name, value in (("mean", nnx_model.norm_layer.mean), ("var", nnx_model.norm_layer.var)):
    np.testing.assert_array_equal(variables["batch_stats"]["norm_layer"][name], value[...])

  # flax's Linen module as the oracle, on the features that have statistics.
  flax_out, flax_updates = _linen_model(linen.BatchNorm, dtype, param_dtype).apply(
    variables | {"batch_stats": linen_model.init(jax.random.key(1), x)["batch_stats"]},
    x,
    mask=mask,
    mutable=["batch_stats"],
  )
  valid = slice(None) if mask is None else mask
  tol = 1e-2 if jnp.float16 in (dtype, param_dtype) else 1e-5
  for key in ("mean", "var"):
    np.testing.assert_allclose(
      variables["batch_stats"]["norm_layer"][key][valid],
      flax_updates["batch_stats"]["norm_layer"][key][valid],
      rtol=tol,
      atol=tol,
    )
  if mask is None:
    np.testing.assert_allclose(np.asarray(linen_out, np.float32), np.asarray(flax_out, np.float32), rtol=tol, atol=tol)
  else:
    # Documented difference: flax turns a feature without valid elements into
    # NaN (output and running statistics); jaxbn outputs its bias and keeps
    # its running statistics.
    assert np.isnan(flax_updates["batch_stats"]["norm_layer"]["mean"][~mask]).all()
    np.testing.assert_array_equal(variables["batch_stats"]["norm_layer"]["mean"][~mask], 0)
    np.testing.assert_array_equal(variables["batch_stats"]["norm_layer"]["var"][~mask], 1)
    assert np.isfinite(np.asarray(linen_out, np.float32)).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("mask", [None, MASK[None].repeat(10, 0) | np.eye(10, 5, dtype=bool)])
def test_nnx_module_matches_flax_nnx_module(dtype, mask):
  """The default promote_dtype, against flax.nnx.BatchNorm itself."""
  x = jax.random.normal(jax.random.key(0), (10, 5)) * 3 + 1
  outs = []
  for cls in (jaxbn.nnx.BatchNorm, nnx.BatchNorm):
    layer = cls(5, use_running_average=False, dtype=dtype, momentum=0.8, rngs=nnx.Rngs(0))
    y = layer(x, mask=mask)
    layer.eval()
    outs.append((y, layer.mean[...], layer.var[...], layer(x)))
  tol = 3e-3 if dtype == jnp.float16 else 1e-5
  for a, b in zip(*outs, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("n_steps", [1, 10])
@pytest.mark.parametrize("update_stats", [True, False])
def test_nnx_linen_spectralnorm_equivalence(n_steps, update_stats):
  dtype = param_dtype = jnp.float32

  class NNXModel(nnx.Module):
    def __init__(self, rngs):
      self.seq = nnx.Sequential(
        nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        nnx.relu,
        jaxbn.nnx.BatchNorm(4, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_running_average=not update_stats),
      )
      self.norm_layer = nnx.SpectralNorm(
        self.seq, n_steps=n_steps, dtype=dtype, param_dtype=param_dtype, update_stats=update_stats, rngs=rngs
      )

    def __call__(self, x):
      return self.norm_layer(x)

  class LinenModel(linen.Module):
    def setup(self):
      self.seq = linen.Sequential(
        [
          linen.Dense(4, dtype=dtype, param_dtype=param_dtype),
          linen.relu,
          jaxbn.BatchNorm(dtype=dtype, param_dtype=param_dtype, use_running_average=not update_stats),
        ]
      )
      self.norm_layer = linen.SpectralNorm(self.seq, n_steps=n_steps)

    def __call__(self, x):
      return self.norm_layer(x, update_stats=update_stats)

  x = jax.random.normal(jax.random.key(0), (10, 5))
  linen_model = LinenModel()
  variables = linen_model.init(jax.random.key(1), x)
  nnx_model = NNXModel(nnx.Rngs(42))
  dense = variables["params"]["seq"]["layers_0"]
  nnx_model.seq.layers[0].kernel.set_value(dense["kernel"])
  nnx_model.seq.layers[0].bias.set_value(dense["bias"])
  nnx_model.seq.layers[2].scale.set_value(variables["params"]["seq"]["layers_2"]["scale"])
  nnx_model.seq.layers[2].bias.set_value(dense["bias"])  # as flax's test does
  norm_stats = variables["batch_stats"]["norm_layer"]
  for leaf in ("u", "sigma"):
    nnx_model.norm_layer.batch_stats[("layers", 0, "kernel", leaf)].set_value(norm_stats[f"seq/layers_0/kernel/{leaf}"])
  linen_out = linen_model.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(linen_out[0], nnx_model(x))
  for leaf in ("u", "sigma"):
    np.testing.assert_array_equal(
      nnx_model.norm_layer.batch_stats[("layers", 0, "kernel", leaf)],
      linen_out[1]["batch_stats"]["norm_layer"][f"seq/layers_0/kernel/{leaf}"],
    )


def test_every_flax_constructor_argument_is_accepted():
  ours = inspect.signature(jaxbn.nnx.BatchNorm.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  for name, param in theirs.items():
    assert name in ours, name
    assert ours[name].kind == param.kind, name
    if param.default is not inspect.Parameter.empty and name not in ("bias_init", "scale_init"):
      assert ours[name].default == param.default, name
  metadata = dict(scale_metadata={"tag": "gamma"}, bias_metadata={"tag": "beta"})
  layer = jaxbn.nnx.BatchNorm(3, **metadata, rngs=nnx.Rngs(0))
  reference = nnx.BatchNorm(3, **metadata, rngs=nnx.Rngs(0))
  assert layer.scale.get_metadata() == reference.scale.get_metadata()
  assert layer.bias.get_metadata() == reference.bias.get_metadata()
  assert layer.scale.tag == "gamma" and layer.bias.tag == "beta"


def test_promote_dtype_is_called_as_in_flax():
  seen = []

  def promote(args, *, dtype=None):
    seen.append(tuple(None if a is None else a.dtype for a in args))
    return nnx.nn.dtypes.promote_dtype(args, dtype=dtype)

  layer = jaxbn.nnx.BatchNorm(3, dtype=jnp.bfloat16, promote_dtype=promote, rngs=nnx.Rngs(0))
  y = layer(jnp.ones((4, 3)))
  assert seen == [(jnp.float32,) * 5] and y.dtype == jnp.bfloat16


def test_view_info_and_view():
  model = nnx.Sequential(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  info = nnx.view_info(model)
  assert "use_running_average" in info and "stored batch statistics" in info
  evaluated = nnx.view(model, use_running_average=True)
  assert evaluated.layers[1].use_running_average is True
  assert model.layers[1].use_running_average is False


# ---- transforms_test.py ports: run with both classes, compare ----------------


def _block(norm_cls):
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 3, rngs=rngs)
      self.bn = norm_cls(3, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)
      self.node = nnx.BatchStat(jnp.ones((2,)))

    def __call__(self, x):
      return nnx.gelu(self.dropout(self.bn(self.linear(x)))), None

  return MLP


@pytest.mark.parametrize("graph_mode", [True, False])
@pytest.mark.parametrize("use_view", [True, False])
def test_complex_functional_and_view(graph_mode, use_view):
  def run(norm_cls):
    MLP = _block(norm_cls)

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      module = MLP(rngs)
      if not use_view:
        module.set_attributes(deterministic=False, use_running_average=False)
      return module

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))
    if use_view:
      module = nnx.view(module, deterministic=False, use_running_average=False)
    y, _ = forward(module, jnp.ones((1, 3)))  # a batch of one, in training mode
    assert y.shape == (1, 3)
    return (y, module.bn.mean[...], module.bn.var[...])

  results = [run(norm_cls) for norm_cls in (jaxbn.nnx.BatchNorm, nnx.BatchNorm)]
  for a, b in zip(*results, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_complex_graph_updates():
  def run(norm_cls):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = norm_cls(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x):
        return nnx.gelu(self.dropout(self.bn(self.linear(x)))), None

    module = MLP(rngs=nnx.Rngs(0))
    module.set_attributes(deterministic=False, use_running_average=False)
    assert module.linear.kernel.shape == (5, 3, 3)
    y, _ = module(jnp.ones((1, 3)))
    return (y, module.bn.mean[...])

  results = [run(norm_cls) for norm_cls in (jaxbn.nnx.BatchNorm, nnx.BatchNorm)]
  for a, b in zip(*results, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graph", [True, False])
def test_state_axes_simple_functional(graph):
  def run(norm_cls):

    class Block(nnx.Module):
      def __init__(self, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = norm_cls(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    rngs = nnx.Rngs(params=0, dropout=1).split({"dropout": 5})
    abstract = nnx.eval_shape(lambda: Block(nnx.Rngs(params=0, dropout=1)))
    axes = nnx.prefix(abstract, {(nnx.BatchStat, "dropout"): 0, ...: None}, graph=graph)

    @nnx.vmap(in_axes=(None, 0), out_axes=axes, graph=graph, graph_updates=False)
    def create(params, dropout):
      return Block(nnx.Rngs(params=params, dropout=dropout))

    module = create(rngs.params, rngs.dropout)
    assert module.bn.scale.shape == (3,) and module.bn.mean.shape == (5, 3)
    initial_mean = module.bn.mean[...]

    @nnx.vmap(in_axes=(axes, 0), out_axes=0, graph=graph, graph_updates=False)
    def forward(module, x):
      return module(x)

    x = jax.random.normal(jax.random.key(2), (5, 3, 2))
    y = forward(module, x)
    assert y.shape == (5, 3, 3)
    assert not jnp.allclose(initial_mean, module.bn.mean[...])  # updates tracked
    return (y, module.bn.mean[...], module.bn.var[...])

  results = [run(norm_cls) for norm_cls in (jaxbn.nnx.BatchNorm, nnx.BatchNorm)]
  for a, b in zip(*results, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graph,graph_updates", [(True, True), (True, False), (False, False)])
def test_ensemble_example(graph, graph_updates):
  def run(norm_cls):

    class Model(nnx.Module):
      def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.bn = norm_cls(dout, use_running_average=False, rngs=rngs)

      def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    @nnx.vmap(in_axes=0, out_axes=0, graph=graph, graph_updates=graph_updates)
    def initialize_ensemble(key):
      return Model(2, 3, rngs=nnx.Rngs(key))

    ensemble = initialize_ensemble(jax.random.split(jax.random.key(0), 5))
    assert ensemble.linear.kernel.shape == (5, 2, 3)

    @nnx.vmap(in_axes=(0, None), out_axes=0, graph=graph, graph_updates=graph_updates)
    def forward(model, x):
      return model(x)

    y = forward(ensemble, jnp.arange(8.0).reshape(4, 2))
    assert y.shape == (5, 4, 3)
    return y

  results = [run(norm_cls) for norm_cls in (jaxbn.nnx.BatchNorm, nnx.BatchNorm)]
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_state_axes_from_state():
  class Model(nnx.Module):
    def __init__(self, din, dout, *, rngs):
      self.linear = nnx.Linear(din, dout, rngs=rngs)
      self.bn = jaxbn.nnx.BatchNorm(dout, rngs=rngs)

  state = nnx.state(Model(2, 3, rngs=nnx.Rngs(0)))
  state["linear"]["kernel"], state["linear"]["bias"] = 0, 1
  state["bn"]["scale"], state["bn"]["mean"], state["bn"]["var"], state["bn"]["bias"] = 0, 1, 0, None
  state_axes = nnx.StateAxes(state)

  @nnx.vmap(out_axes=state_axes, axis_size=5, graph=True, graph_updates=True)
  def create_block():
    return Model(2, 3, rngs=nnx.Rngs(0))

  model = create_block()
  assert model.bn.scale.shape == (5, 3) and model.bn.var.shape == (5, 3)
  assert model.bn.mean.shape == (3, 5) and model.bn.bias.shape == (3,)


def test_graph_updates_unflatten():
  class Foo(nnx.Module):
    def __init__(self, *, rngs):
      self.a = nnx.Linear(2, 2, rngs=rngs)
      self.b = jaxbn.nnx.BatchNorm(2, rngs=rngs)

  @nnx.jit(graph=True, graph_updates=True)
  def swap(m):
    m.a, m.b = m.b, m.a

  m = Foo(rngs=nnx.Rngs(0))
  a, b = m.a, m.b
  before = [v[...] for v in (b.scale, b.bias, b.mean, b.var)]
  swap(m)
  assert m.a is b and m.b is a
  for old, new in zip(before, (b.scale, b.bias, b.mean, b.var), strict=True):
    np.testing.assert_array_equal(old, new[...])
