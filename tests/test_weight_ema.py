"""--weight-ema: the averaged weights and the statistics that go with them.

Oracles: a NumPy float64 moving average of the parameters the run went through and of
its running statistics (pooled over per-device rows by the law of total variance); the
limit of a decay near 0, where the averaged model is the live one; and an uninterrupted
run, which a run stopped (SIGKILL, SIGTERM) and resumed must reproduce digit for digit,
with gradient accumulation on.
"""

import dataclasses
import json
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import train
import trainer
from tests.idx_files import make_dataset, write_dataset
from tests.train_runs import ROOT, kill_at_checkpoint, metrics, run, train_command
from trainer.input import Batches
from trainer.loop import train_and_evaluate

DEVICES, PER_DEVICE, STEPS, DECAY = 8, 4, 4, 0.7


def _pooled64(stats, rows: bool):
  """float64 running statistics, one set (rows pooled: mean of variances + variance of means)."""
  out = {}
  for name, layer in stats.items():
    mean, var = np.float64(layer["mean"]), np.float64(layer["var"])
    if rows:
      mean, var = mean.mean(0), var.mean(0) + ((mean - mean.mean(0)) ** 2).mean(0)
    out[name] = {"mean": mean, "var": var}
  return out


@pytest.mark.parametrize("bn", ["per-device", "sync"])
@pytest.mark.parametrize("style", trainer.PARALLEL_STYLES)
def test_averaged_weights_and_statistics_are_the_moving_average_of_the_run(bn, style):
  assert jax.device_count() == DEVICES
  config = trainer.Config(
    model="mlp", bn=bn, parallel=style, batch_size=PER_DEVICE, lr=0.2, init_std=0.3, weight_ema=DECAY
  )
  rows = bn == "per-device"
  parallel = trainer.make_parallel(style, jax.devices(), stat_rows=DEVICES if rows else None)
  initial = trainer.create_train_state(config, (28, 28, 1))
  state = parallel.put_state(initial)
  program = parallel.step_program(
    state,
    resident=False,
    model=trainer.make_model(config, num_devices=DEVICES),
    optimizer=trainer.make_optimizer(config),
    batches=Batches(0, 1000, DEVICES * PER_DEVICE, "none", 28, 1, hflip=False),
    weight_ema=DECAY,
  )
  rng = np.random.default_rng(0)
  ema_params = jax.tree.map(np.float64, initial.params)
  ema_stats = _pooled64(initial.batch_stats, rows=False)
  for _ in range(STEPS):
    images = rng.integers(0, 256, (DEVICES * PER_DEVICE, 28, 28, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, DEVICES * PER_DEVICE).astype(np.int32)
    state, _ = program(state, parallel.put_batch(images), parallel.put_batch(labels))
    live_stats = parallel.row_stats(state) if rows else parallel.portable_state(state).batch_stats
    live_params = parallel.portable_state(parallel.synchronize(state)).params
    ema_params = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * np.float64(p), ema_params, live_params)
    ema_stats = jax.tree.map(lambda e, s: DECAY * e + (1 - DECAY) * s, ema_stats, _pooled64(live_stats, rows))
  got = parallel.portable_state(parallel.synchronize(state))
  check = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  jax.tree.map(check, got.ema_params, ema_params)
  jax.tree.map(check, got.ema_batch_stats, ema_stats)
  assert not np.allclose(got.ema_params["Dense_0"]["kernel"], got.params["Dense_0"]["kernel"])


def test_with_a_decay_near_zero_the_averaged_model_scores_as_the_live_one(tmp_path):
  """Decay 1e-7: the averaged weights and statistics are the live ones (to float32), so the
  averaged scores equal the live model's, with the averaged statistics and with recomputed ones."""
  assert jax.device_count() == DEVICES
  idx = write_dataset(tmp_path / "idx", make_dataset(n_train=240, n_test=30))
  config = trainer.Config(
    dataset="mnist", idx_dir=str(idx), data_dir=str(tmp_path / "tfds"), out=str(tmp_path / "run"), model="mlp",
    bn="per-device", batch_size=6, steps=20, eval_every=10, lr=0.2, init_std=0.3, population_batches=8,
    weight_ema=1e-7, weight_ema_bn="both", progress=False,
  )  # fmt: skip
  train_and_evaluate(config, devices=jax.devices()[:2])
  for record in metrics(tmp_path / "run"):
    assert record["test_loss_weight_ema"] == pytest.approx(record["test_loss"], rel=1e-5)
    assert record["test_loss_weight_ema_recomputed"] == pytest.approx(record["test_loss_population"], rel=1e-5)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("idx"), make_dataset(n_train=240, n_test=30))


ARGS = (
  "--devices", "2", "--batch-size", "6", "--steps", "300", "--eval-every", "20", "--checkpoint-every", "100",
  "--bn", "per-device", "--accumulate-steps", "3", "--weight-ema", "0.9", "--weight-ema-bn", "both",
  "--population-batches", "4",
)  # fmt: skip
SCORES = ("train_loss", "test_loss", "test_accuracy", "test_loss_weight_ema", "test_loss_weight_ema_recomputed")


@pytest.fixture(scope="module")
def uninterrupted(idx_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("full") / "run"
  done = run(train_command(idx_dir, out, *ARGS))
  assert done.returncode == 0, done.stderr[-3000:]
  return metrics(out)


def _same(a, b):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(a, b, strict=True):
    assert {k: x[k] for k in SCORES} == {k: y[k] for k in SCORES}, x["step"]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact_with_accumulation_and_averaged_weights(tmp_path, idx_dir, uninterrupted):
  out = tmp_path / "killed"
  kill_at_checkpoint(train_command(idx_dir, out, *ARGS), out, 100)
  assert metrics(out)[-1]["step"] < 300, "the run finished before it could be killed"
  resumed = run(train_command(idx_dir, out, *ARGS, "--resume"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _same(uninterrupted, metrics(out))


@pytest.mark.slow
def test_resume_after_sigterm_is_exact_with_accumulation_and_averaged_weights(tmp_path, idx_dir, uninterrupted):
  out = tmp_path / "stopped"
  proc = subprocess.Popen(train_command(idx_dir, out, *ARGS), cwd=ROOT, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().count("\n") >= 6:
    assert time.time() < deadline and proc.poll() is None, "the run did not reach step 120"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # mid-period: per-device rows and the losses so far are kept
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "stopped at step" in stderr, stderr[-3000:]
  resumed = run(train_command(idx_dir, out, *ARGS, "--resume"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _same(uninterrupted, metrics(out))


def test_accumulation_that_does_not_split_the_per_device_batch_is_one_line(tmp_path, idx_dir):
  done = run(train_command(idx_dir, tmp_path / "run", "--devices", "2", "--batch-size", "6", "--accumulate-steps", "4"))
  assert done.returncode == 2
  line = done.stderr.strip()
  assert "\n" not in line and "--accumulate-steps: 4 micro-batches must split the per-device batch of 6" in line


@pytest.mark.parametrize(
  "flags, message",
  [
    (("--weight-ema", "1"), "--weight-ema: expected a decay in [0, 1)"),
    (("--weight-ema-bn", "both"), "--weight-ema-bn: needs --weight-ema"),
    (("--weight-ema", "0.9", "--weight-ema-bn", "recompute"), "--weight-ema-bn: recompute recomputes statistics"),
  ],
)
def test_bad_weight_ema_flags_are_one_line(flags, message, capsys):
  with pytest.raises(SystemExit) as exited:
    train.parse_args(["--out", "unused", *flags])  # train.py's own check, before any work
  err = capsys.readouterr().err.strip()
  assert exited.value.code == 2 and "\n" not in err and message in err, err


@pytest.mark.slow
def test_the_options_reach_config_json(tmp_path, idx_dir):
  done = run(train_command(idx_dir, tmp_path / "run", "--devices", "2", "--batch-size", "6", "--steps", "4",
                           "--eval-every", "2", "--accumulate-steps", "2", "--weight-ema", "0.5"))  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["accumulate_steps"] == 2 and config["weight_ema"] == 0.5 and config["weight_ema_bn"] == "ema"
  assert dataclasses.asdict(trainer.Config(**config))["weight_ema"] == 0.5


@pytest.mark.slow
def test_every_input_path_gives_the_same_run_with_renorm_frozen_bn_accumulation_and_averaging(tmp_path, idx_dir):
  """Batch Renorm (its per-step limits), a FrozenBN final phase, 2 micro-batches and averaged
  weights together: the device-resident and the streamed input train the same run."""
  args = ("--devices", "2", "--batch-size", "6", "--steps", "30", "--eval-every", "10", "--bn", "renorm",
          "--frozen-bn-steps", "10", "--accumulate-steps", "2", "--weight-ema", "0.8")  # fmt: skip
  records = {}
  for path in ("device", "stream"):
    done = run(train_command(idx_dir, tmp_path / path, *args, "--input", path, "--input-workers", "0"))
    assert done.returncode == 0, done.stderr[-3000:]
    records[path] = metrics(tmp_path / path)
  assert [r["step"] for r in records["device"]] == [10, 20, 30]
  keys = ("train_loss", "test_loss", "test_accuracy", "test_loss_weight_ema", "test_accuracy_weight_ema")
  for a, b in zip(records["device"], records["stream"], strict=True):
    assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-6)
