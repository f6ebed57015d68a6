"""`pip install jaxbn` needs jax and flax only, and `import jaxbn` pulls in nothing else."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# optax is not here: flax depends on it, and flax.nnx imports it itself.
# trainer: the training harness lives beside the library and is never imported by it.
TRAINING_STACK = ("trainer", "tensorflow_datasets", "array_record", "orbax", "tqdm", "matplotlib", "grain")


def test_runtime_dependencies_are_jax_and_flax():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = sorted(d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"])
  assert names == ["flax", "jax"]
  train = " ".join(project["optional-dependencies"]["train"])
  for package in ("optax", "tensorflow-datasets", "orbax-checkpoint", "tqdm"):
    assert package in train


def test_import_jaxbn_imports_no_training_stack():
  code = f"import sys, jaxbn, jaxbn.nnx; print(','.join(m for m in {TRAINING_STACK!r} if m in sys.modules))"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "", f"import jaxbn imported {result.stdout.strip()}"


def test_the_version_is_written_once_and_in_the_changelog():
  import importlib.metadata

  import jaxbn

  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "version" not in project and "version" in project["dynamic"]  # read from jaxbn.__version__
  assert importlib.metadata.version("jaxbn") == jaxbn.__version__
  assert f"## [{jaxbn.__version__}]" in (ROOT / "CHANGELOG.md").read_text()
