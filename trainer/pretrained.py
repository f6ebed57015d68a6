"""PyTorch weights in and out: a torchvision or timm ResNet state dict <-> the trainer's variables.

    state_dict = read_state_dict("resnet50.safetensors")
    variables, notes = from_torch(state_dict, fresh_variables, MODELS["resnet50"].torch_names(model))

A state dict maps PyTorch module names with `.weight`, `.bias`, `.running_mean`,
`.running_var` to tensors; `torch_names` (the model's registry entry) maps the
model's flax modules to those names. Per module:

  convolution  weight (out, in, h, w)  -> kernel (h, w, in, out)
  linear       weight (out, in), bias  -> kernel (in, out), bias
  BN           weight, bias, running_mean, running_var -> scale, bias, mean, var
               (`jaxbn.pytorch.from_torch_bn`: PyTorch stores the running variance it
               normalizes with at inference, so it carries over unchanged;
               `num_batches_tracked` is not needed)

A state dict carries no epsilon or momentum: torchvision's and timm's ResNets use
PyTorch's defaults (eps 1e-5, jaxbn's default too; momentum 0.1, flax's 0.9, the
ImageNet ResNets' recipe). Files are read without pickle: safetensors, or a
`.pth`/`.pt` file through torch's `weights_only` loader where torch is installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxbn import pytorch
from trainer.errors import ConfigError

__all__ = ["check_file", "from_torch", "read_state_dict", "stage_count", "stage_of", "to_torch", "write_safetensors"]

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
IGNORED = ("num_batches_tracked",)  # PyTorch's count of updates: not a weight
HEAD = "fc"  # the classifier's PyTorch name: replaced when the class count differs


def _fail(path, message: str):
  raise ConfigError(f"--init-from {path}: {message}")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """The file's tensors as float32 NumPy arrays by name (a DistributedDataParallel
  `module.` prefix removed). ConfigError (naming the file) for anything else."""
  path = check_file(path)
  if path.suffix == ".safetensors":
    tensors = _read_safetensors(path)
  elif path.suffix in PICKLE_SUFFIXES:
    tensors = _read_pickle(path)
  else:
    _fail(path, f"expected a .safetensors file (or a PyTorch {'/'.join(PICKLE_SUFFIXES)} file), got {path.suffix!r}")
  if not tensors:
    _fail(path, "holds no tensors")
  if all(name.startswith("module.") for name in tensors):
    tensors = {name.removeprefix("module."): value for name, value in tensors.items()}
  return {name: value for name, value in tensors.items() if name.rsplit(".", 1)[-1] not in IGNORED}


def check_file(path: str | Path) -> Path:
  """`path`, or ConfigError when there is no such file (before a run sets anything up)."""
  path = Path(path)
  if not path.is_file():
    _fail(path, "no such file")
  return path


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  try:
    with safe_open(str(path), framework="numpy") as f:
      return {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}  # noqa: SIM118
  except Exception as error:  # the library raises its own error types, and TypeError for odd dtypes
    _fail(path, f"not a readable safetensors file ({type(error).__name__}: {str(error).splitlines()[0][:200]})")


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    _fail(
      path,
      "a PyTorch pickle, which train.py reads only with torch's weights_only loader, and torch is not installed: "
      'install torch, or convert the file where torch is: python -c "import torch, safetensors.torch as s; '
      f"s.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\"",
    )
  try:
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as error:
    _fail(
      path, f"torch.load(weights_only=True) refused it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    )
  for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
    if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
      loaded = loaded[wrapper]
  if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
    _fail(path, "expected a state dict (tensor names -> tensors)")
  return {name: value.detach().float().numpy() for name, value in loaded.items()}


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  from safetensors.numpy import save_file

  save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, str(path), dict(metadata))


def stage_of(torch_name: str) -> int | None:
  """The stage of a PyTorch ResNet module: 0 for the stem (conv1, bn1), K for layerK.*,
  None for the classifier."""
  if torch_name.split(".")[0] == HEAD:
    return None
  match = re.match(r"layer(\d+)\.", torch_name)
  return int(match[1]) if match else 0


def stage_count(names: Mapping[tuple[str, ...], str]) -> int:
  return max(stage for name in names.values() if (stage := stage_of(name)) is not None)


def _modules(params: Mapping, names: Mapping[tuple[str, ...], str]):
  """(flax path, PyTorch name, flax params of the module) of every module with parameters."""

  def walk(tree, path):
    if any(isinstance(v, Mapping) for v in tree.values()):
      for key, sub in tree.items():
        yield from walk(sub, (*path, key))
    else:
      if path not in names:
        raise KeyError(f"{'/'.join(path)} has no PyTorch name (trainer.models.resnet.torch_module_names)")
      yield path, names[path], tree

  yield from walk(params, ())


def _get(tree: Mapping, path: tuple[str, ...]) -> Mapping:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _expected(module: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
  """The PyTorch tensors (suffix -> shape) of one flax module."""
  if "scale" in module:  # BN
    return dict.fromkeys(BN_TENSORS, module["scale"].shape)
  kernel = np.shape(module["kernel"])
  if len(kernel) == 4:  # convolution: (h, w, in, out) <- (out, in, h, w)
    return {"weight": (kernel[3], kernel[2], kernel[0], kernel[1])}
  return {"weight": kernel[::-1], "bias": np.shape(module["bias"])}  # linear


def _describe(state_dict: Mapping[str, np.ndarray]) -> str:
  """What ResNet a state dict holds: blocks per stage, and their kind."""
  blocks: dict[int, set[int]] = {}
  for name in state_dict:
    match = re.match(r"layer(\d+)\.(\d+)\.", name)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if not blocks:
    return "the file holds no ResNet stages (layer1, ...)"
  kind = "bottleneck" if any(".conv3." in name for name in state_dict) else "basic"
  sizes = tuple(len(blocks[i]) for i in sorted(blocks))
  return f"the file holds a ResNet with {kind} blocks {sizes} per stage"


def from_torch(
  state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any], names: Mapping[tuple[str, ...], str], path=""
) -> tuple[dict[str, Any], list[str]]:
  """`variables` ({"params", "batch_stats"}, e.g. a fresh model's) with every module
  taken from the PyTorch `state_dict`, and the notes to show (a classifier for
  another class count, or none in the file, stays freshly initialised). ConfigError
  naming the first missing, extra or mis-shaped tensor."""
  notes: list[str] = []
  modules = []  # (flax path, PyTorch name, flax module, expected tensors, keep the fresh head)
  for flax_path, torch_name, module in _modules(variables["params"], names):
    expected = _expected(module)
    fresh = torch_name == HEAD and _replaced_head(state_dict, expected, notes, path)
    modules.append((flax_path, torch_name, module, expected, fresh))
  wanted = [f"{name}.{suffix}" for _, name, _, expected, fresh in modules if not fresh for suffix in expected]
  missing = [key for key in wanted if key not in state_dict]
  if missing:
    _fail(path, f"missing {missing[0]} (and {len(missing) - 1} more tensors of the model); {_describe(state_dict)}")
  extra = sorted(set(state_dict) - set(wanted) - {f"{HEAD}.weight", f"{HEAD}.bias"})
  if extra:
    _fail(path, f"unexpected tensor {extra[0]} (and {len(extra) - 1} more) for this model; {_describe(state_dict)}")
  loaded: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for flax_path, torch_name, module, expected, fresh in modules:
    if fresh:
      _set(loaded["params"], flax_path, dict(module))
      continue
    tensors = {suffix: state_dict[f"{torch_name}.{suffix}"] for suffix in expected}
    for suffix, tensor in tensors.items():
      if tensor.shape != tuple(expected[suffix]):
        hint = ""
        if tensor.ndim == 4 and tensor.shape[1] != expected[suffix][1] and stage_of(torch_name) == 0:
          hint = f" (it takes images of {tensor.shape[1]} channels, the data has {expected[suffix][1]})"
        _fail(
          path, f"{torch_name}.{suffix} has shape {tensor.shape}, the model expects {tuple(expected[suffix])}{hint}"
        )
    if "scale" in module:
      bn, _ = pytorch.from_torch_bn(*(tensors[s] for s in BN_TENSORS))
      _set(loaded["params"], flax_path, bn["params"])
      _set(loaded["batch_stats"], flax_path, bn["batch_stats"])
    elif len(tensors["weight"].shape) == 4:
      _set(loaded["params"], flax_path, {"kernel": tensors["weight"].transpose(2, 3, 1, 0)})
    else:
      _set(loaded["params"], flax_path, {"kernel": tensors["weight"].T, "bias": tensors["bias"]})
  return loaded, notes


def _replaced_head(state_dict, expected, notes, path) -> bool:
  """Whether the classifier stays fresh: the file has none, or one for another class count."""
  weight = state_dict.get(f"{HEAD}.weight")
  if weight is None and f"{HEAD}.bias" not in state_dict:
    notes.append(f"--init-from {path}: the file has no classifier ({HEAD}.*): the head is freshly initialised")
    return True
  classes, features = expected["weight"]
  if weight is not None and weight.shape[1:] == (features,) and weight.shape[0] != classes:
    notes.append(
      f"--init-from {path}: the file's classifier has {weight.shape[0]} classes, the data {classes}: "
      f"{HEAD}.weight and {HEAD}.bias replaced by a freshly initialised head"
    )
    return True
  return False


def to_torch(
  variables: Mapping[str, Any], names: Mapping[tuple[str, ...], str], updates: int = 0
) -> dict[str, np.ndarray]:
  """The inverse of `from_torch`: a state dict torchvision's (or timm's) model loads
  with `load_state_dict(strict=True)`; `updates` becomes BN's `num_batches_tracked`."""
  stats = variables.get("batch_stats", {})
  state_dict: dict[str, np.ndarray] = {}
  for flax_path, torch_name, module in _modules(variables["params"], names):
    module = {k: np.asarray(v, np.float32) for k, v in module.items()}
    if "scale" in module:
      bn_variables = {"params": module, "batch_stats": _get(stats, flax_path)}
      tensors, _ = pytorch.to_torch_bn(bn_variables)
      tensors["num_batches_tracked"] = np.asarray(updates, np.int64)
    elif module["kernel"].ndim == 4:
      tensors = {"weight": module["kernel"].transpose(3, 2, 0, 1)}
    else:
      tensors = {"weight": module["kernel"].T, "bias": module["bias"]}
    state_dict.update({f"{torch_name}.{suffix}": value for suffix, value in tensors.items()})
  return state_dict
