"""The training library: one step per BN mode against one-device oracles, exact
resume, evaluation of the whole test set, several hosts."""

import functools
import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import trainer
from tests.idx_files import make_dataset, write_dataset
from tests.train_runs import free_port, kill_at_checkpoint, metrics, run, train_command

ROOT = Path(__file__).resolve().parents[1]
DEVICES, PER_DEVICE = 8, 4


def _step_inputs(bn):
  config = trainer.Config(model="mlp", bn=bn, parallel="pmap", lr=0.3, batch_size=PER_DEVICE, init_std=0.3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (DEVICES, PER_DEVICE, 28, 28)).astype(np.uint8)
  labels = rng.integers(0, 10, (DEVICES, PER_DEVICE)).astype(np.int32)
  state = trainer.create_train_state(config, (28, 28))
  return config, state, images, labels


def _pmapped_step(config, state, images, labels):
  """One step under pmap, the state placed as train.py places it."""
  model, optimizer = trainer.make_model(config, num_devices=DEVICES), trainer.make_optimizer(config)
  parallel = trainer.make_parallel("pmap", jax.devices(), stat_rows=DEVICES if config.bn == "per-device" else None)
  step = jax.pmap(
    functools.partial(trainer.train_step, model=model, optimizer=optimizer, dropout_key=jax.random.key(0), local=True),
    axis_name=trainer.AXIS,
  )
  new, loss = step(parallel.put_state(state), images, labels)
  if config.bn == "per-device":  # each device sees its own row of running statistics
    new = new.replace(batch_stats=jax.tree.map(lambda a: a[:, 0], new.batch_stats))
  return new, loss


def _single_device_step(config, state, images, labels):
  """The oracle: the same model unsynced on one device, plain optax."""
  model = trainer.make_model(config)  # no axis, no groups

  def loss_fn(params):
    (logits, _), updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      images.astype(jnp.float32) / 255,
      train=True,
      mutable=["batch_stats"],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, grads, updates.get("batch_stats", {})


def _sgd(params, grads, lr):
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


@pytest.mark.slow
@pytest.mark.parametrize("bn", ["sync", "none"])
def test_synced_and_no_bn_step_equal_one_device_on_the_global_batch(bn):
  assert jax.device_count() == DEVICES
  config, state, images, labels = _step_inputs(bn)
  new, loss = _pmapped_step(config, state, images, labels)
  g_loss, g_grads, g_stats = _single_device_step(config, state, images.reshape(-1, 28, 28), labels.reshape(-1))
  np.testing.assert_allclose(loss[0], g_loss, rtol=1e-5)
  expected = _sgd(state.params, g_grads, config.lr)
  for d in (0, DEVICES - 1):
    jax.tree.map(lambda a, b, d=d: np.testing.assert_allclose(a[d], b, rtol=1e-4, atol=1e-6), new.params, expected)
    jax.tree.map(lambda a, b, d=d: np.testing.assert_allclose(a[d], b, rtol=1e-5, atol=1e-6), new.batch_stats, g_stats)


@pytest.mark.slow
def test_per_device_step_averages_per_shard_gradients():
  assert jax.device_count() == DEVICES
  config, state, images, labels = _step_inputs("per-device")
  new, loss = _pmapped_step(config, state, images, labels)
  shards = [_single_device_step(config, state, images[d], labels[d]) for d in range(DEVICES)]
  np.testing.assert_allclose(loss[0], np.mean([s[0] for s in shards]), rtol=1e-5)
  mean_grads = jax.tree.map(lambda *g: sum(g) / DEVICES, *[s[1] for s in shards])
  expected = _sgd(state.params, mean_grads, config.lr)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[3], b, rtol=1e-4, atol=1e-6), new.params, expected)
  for d in (0, 5):  # each device keeps the running statistics of its own batches
    jax.tree.map(
      lambda a, b, d=d: np.testing.assert_allclose(a[d], b, rtol=1e-5, atol=1e-6), new.batch_stats, shards[d][2]
    )
  assert not np.allclose(new.batch_stats["BatchNorm_0"]["mean"][0], new.batch_stats["BatchNorm_0"]["mean"][1])


# ---- train.py end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("idx"), make_dataset(n_train=240, n_test=37))


def _train_cmd(idx_dir, out, *extra):
  return train_command(idx_dir, out, "--batch-size", "6", *extra)


DETERMINISTIC = ("step", "train_loss", "test_loss", "test_accuracy", "p15", "p50", "p85")


@pytest.mark.slow  # 1,500 steps, twice
def test_resume_after_sigkill_is_exact(tmp_path, idx_dir):
  args = ("--bn", "per-device", "--devices", "2", "--steps", "1500", "--eval-every", "20", "--checkpoint-every", "200")
  reference = run(_train_cmd(idx_dir, tmp_path / "full", *args))
  assert reference.returncode == 0, reference.stderr[-3000:]

  out = tmp_path / "killed"
  kill_at_checkpoint(_train_cmd(idx_dir, out, *args), out, 400)
  interrupted_at = metrics(out)[-1]["step"]
  assert interrupted_at < 1500, "the run finished before it could be killed"

  resumed = run(_train_cmd(idx_dir, out, *args, "--resume"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  full, again = metrics(tmp_path / "full"), metrics(out)
  assert [m["step"] for m in again] == list(range(20, 1501, 20))
  for a, b in zip(full, again, strict=True):
    assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}


@pytest.mark.slow
def test_evaluation_covers_the_whole_test_set(tmp_path, idx_dir):
  """37 test examples on 8 devices: the reported accuracy is over all 37."""
  out = tmp_path / "run"
  result = run(_train_cmd(idx_dir, out, "--bn", "sync", "--devices", "8", "--steps", "40", "--eval-every", "40"))
  assert result.returncode == 0, result.stderr[-3000:]
  config = trainer.Config(**json.loads((out / "config.json").read_text()))
  model = trainer.make_model(config)
  abstract = trainer.create_train_state(config, (28, 28))
  state = ocp.CheckpointManager((out / "checkpoints").absolute()).restore(40, args=ocp.args.StandardRestore(abstract))
  from trainer import data

  ds = data.load("mnist", data_dir=str(tmp_path / "tfds"))
  assert ds.test_images.shape[0] == 37
  logits, _ = model.apply(
    {"params": state.params, "batch_stats": state.batch_stats}, ds.test_images.astype(np.float32) / 255, train=False
  )
  accuracy = float(np.mean(np.argmax(logits, -1) == ds.test_labels))
  loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, ds.test_labels).mean())
  last = metrics(out)[-1]
  assert last["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)  # steps of 1/37
  assert last["test_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, idx_dir):
  """2 processes x 2 CPU devices (gloo on 127.0.0.1) == 1 process x 4 devices,
  in train.py's default parallel style (jax.jit over sharded arrays).

  gloo sums the gradient all-reduce in another order than the in-process
  collective (last-bit differences after one step, which training amplifies),
  so a short run is compared at 1e-4 (O(1) values); a BN synced only within each process
  would differ by percents.
  """
  args = ("--bn", "sync", "--steps", "20", "--eval-every", "10", "--checkpoint-every", "20", "--lr", "0.1")
  single = run(_train_cmd(idx_dir, tmp_path / "single", "--devices", "4", *args))
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  multi = tmp_path / "multi"
  procs = [
    subprocess.Popen(
      _train_cmd(
        idx_dir,
        multi,
        "--devices",
        "2",
        *args,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
      ),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs[0][-2000:] + logs[1][-2000:]
  one, two = metrics(tmp_path / "single"), metrics(multi)
  assert [m["step"] for m in two] == [10, 20]
  for a, b in zip(one, two, strict=True):
    for key in ("train_loss", "test_loss", "test_accuracy", "p15", "p50", "p85"):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
  # Same running statistics at the end.
  config = trainer.Config(**json.loads((multi / "config.json").read_text()))
  abstract = trainer.create_train_state(config, (28, 28))
  restore = lambda out: ocp.CheckpointManager((out / "checkpoints").absolute()).restore(
    20, args=ocp.args.StandardRestore(abstract)
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
    restore(tmp_path / "single").batch_stats,
    restore(multi).batch_stats,
  )
