"""train.py as a new user meets it: usage errors, run directories, failures."""

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from tests.idx_files import make_dataset, write_dataset  # noqa: E402
from tests.train_runs import free_port, metrics, run, train_command  # noqa: E402


@pytest.mark.parametrize(
  "flags,flag",
  [
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--eval-every", "100", "--checkpoint-every", "150"], "--checkpoint-every"),
    (["--devices", "0"], "--devices"),
    (["--batch-size", "8", "--global-batch-size", "64"], "--global-batch-size"),
    (["--model", "resnet99"], "--model"),
    (["--dtype", "float16"], "--dtype"),
    (["--schedule", "step", "--lr-decay-steps", "100"], "--lr-decay-steps"),
    (["--warmup-steps", "500", "--steps", "500"], "--warmup-steps"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--image-folder", "x", "--idx-dir", "y"], "--idx-dir"),
    (["--input", "disk"], "--input"),
    (["--dropout", "1.5"], "--dropout"),
    (["--bn-momentum", "2"], "--bn-momentum"),
    (["--steps", "0"], "--steps"),
    (["--bn", "global"], "--bn"),
    (["--process-id", "1"], "--coordinator"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--init-std", "inf"], "--init-std"),
    (["--population-batches", "-1", "--bn", "sync"], "--population-batches"),
    (["--population-batches", "10", "--bn", "none"], "--population-batches"),  # no statistics
    (["--population-batches", "10", "--bn", "renorm"], "--population-batches"),
    # another model's own flag is refused, not ignored (ModelSpec.options)
    (["--model", "resnet20", "--width", "8"], "--width: is an option of --model inception, not of --model resnet20"),
    (["--model", "resnet50", "--activation", "relu"], "--activation: is an option of --model mlp/inception"),
    (["--model", "inception", "--init-std", "0.3"], "--init-std: is an option of --model mlp"),
  ],
)
def test_bad_flags_are_one_line_usage_errors(flags, flag, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.parse_args(flags)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines  # the one line that matters, not the usage text before it
  assert lines[0].startswith("train.py: error:") and flag in lines[0] and lines[0].endswith("(see train.py --help)")


@pytest.mark.parametrize("model", ["mlp", "inception", "resnet20", "resnet50"])
def test_every_model_trains_with_synced_bn_unless_told(model):
  assert train.parse_args(["--model", model])[0].bn == "sync"
  assert train.parse_args(["--model", model, "--bn", "none"])[0].bn == "none"
  assert "(default: the model's recipe, else sync)" in " ".join(train.make_parser().format_help().split())


def test_help_shows_one_default_per_flag():
  for action in train.make_parser()._actions:
    assert (action.help or "").count("(default:") <= 1, action.option_strings


def test_defaults_adapt_and_help_shows_every_default():
  config, _, _ = train.parse_args(["--eval-every", "3000", "--steps", "200"])
  assert config.checkpoint_every == 12_000  # 10,000 rounded up to a multiple of --eval-every
  text = train.make_parser().format_help()
  for expected in (
    "--lr LR",
    "(default: the model's recipe",
    "--parallel {jit,shard_map,pmap}",
    "(default: jit)",
    "--connect-timeout",
    "--no-zero-init-residual",
  ):
    assert expected in text, expected
  # Every model's recipe is listed, from the registry.
  from trainer.models import MODELS

  for name, spec in MODELS.items():
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(name + " "))
    recipe = lines[at + 1]
    for key, value in spec.recipe.items():
      assert train._as_flag(key, value) in recipe, (name, key)
  for action in train.make_parser()._actions:
    assert action.help, action.option_strings


# ---- end to end (subprocess, short runs) -----------------------------------------


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("idx"), make_dataset(n_train=240, n_test=30))


def _run(idx_dir, out, *extra, data_dir=None):
  """A short run on 2 devices, 6 examples each, evaluated every 10 steps."""
  args = ("--devices", "2", "--batch-size", "6", "--eval-every", "10", *extra)
  return run(train_command(idx_dir, out, *args, data_dir=data_dir))


def _snapshot(out: Path) -> dict:
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_run_directory_is_never_overwritten_or_mixed(tmp_path, idx_dir):
  out = tmp_path / "run"
  first = _run(idx_dir, out, "--steps", "20")
  assert first.returncode == 0, first.stderr[-3000:]
  # Without a terminal: no progress bar, no TFDS output, just the final line.
  assert first.stdout.strip().splitlines() == [first.stdout.strip()] and first.stdout.startswith("step 20:")
  assert "%|" not in first.stderr and "Generating" not in first.stderr
  before = _snapshot(out)

  again = _run(idx_dir, out, "--steps", "20")  # no --resume
  assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
  assert _snapshot(out) == before

  changed = _run(idx_dir, out, "--steps", "20", "--lr", "0.1", "--bn", "none", "--resume")
  assert changed.returncode == 2
  assert "--lr 0.1 (the run has 0.5)" in changed.stderr and "--bn none (the run has sync)" in changed.stderr
  assert _snapshot(out) == before

  finished = _run(idx_dir, out, "--steps", "20", "--resume")  # prints its final metrics
  assert finished.returncode == 0, finished.stderr[-3000:]
  last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
  assert f"step 20: test accuracy {last['test_accuracy']:.4f}" in finished.stdout
  assert _snapshot(out) == before

  longer = _run(idx_dir, out, "--steps", "40", "--resume")  # the one change allowed
  assert longer.returncode == 0, longer.stderr[-3000:]
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20, 30, 40]
  assert records[2]["wall_time"] > records[1]["wall_time"]  # seconds since the run began, across resumes
  assert json.loads((out / "config.json").read_text())["steps"] == 40

  fresh = _run(idx_dir, out, "--steps", "10", "--overwrite")
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(kept) == 1 and (kept[0] / "metrics.jsonl").read_text().count("\n") == 4


@pytest.mark.slow
def test_resume_without_a_run_starts_one_and_says_so(tmp_path, idx_dir):
  out = tmp_path / "requeued"
  result = _run(idx_dir, out, "--steps", "10", "--resume")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"--resume: {out} holds no run yet; starting a new one there" in result.stderr.splitlines()
  assert [m["step"] for m in metrics(out)] == [10]


@pytest.mark.slow
def test_a_diverging_run_stops_with_valid_metrics(tmp_path, idx_dir):
  out = tmp_path / "nan"
  result = _run(idx_dir, out, "--steps", "200", "--lr", "1e30", "--activation", "relu", "--checkpoint-every", "10")
  assert result.returncode == 1
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("error: step ") and "the training loss is" in message and "--lr" in message
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # strict JSON
  assert records[-1]["train_loss"] is None
  saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert records[-1]["step"] not in saved  # no checkpoint of a non-finite state


@pytest.mark.slow
def test_data_errors_name_the_file(tmp_path, idx_dir):
  missing = _run(tmp_path / "nowhere", tmp_path / "a", "--steps", "10")
  assert missing.returncode == 1 and "--idx-dir:" in missing.stderr.strip().splitlines()[-1]

  corrupt = write_dataset(tmp_path / "corrupt", make_dataset(n_train=240, n_test=30))
  (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
  result = _run(corrupt, tmp_path / "b", "--steps", "10")
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "train-images-idx3-ubyte.gz: cannot be read" in last, result.stderr[-2000:]

  bad = make_dataset(n_train=240, n_test=30)
  bad["train"][1][0] = 12
  result = _run(write_dataset(tmp_path / "labels", bad), tmp_path / "c", "--steps", "10")
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "train-labels-idx1-ubyte.gz: labels must be 0..9, found 0..12" in last


def test_idx_dir_is_never_shadowed_by_prepared_data(tmp_path):
  from trainer import data

  first = write_dataset(tmp_path / "first", make_dataset(n_train=50, n_test=10, seed=1))
  second = write_dataset(tmp_path / "second", make_dataset(n_train=70, n_test=10, seed=2))
  assert data.load("mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(first)).train_images.shape[0] == 50
  assert data.load("mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(second)).train_images.shape[0] == 70
  assert data.load("mnist", data_dir=str(tmp_path / "tfds")).train_images.shape[0] == 70  # reused


def test_offline_download_fails_fast_with_the_how_to(tmp_path):
  from trainer import data

  start = time.time()
  with pytest.raises(data.DatasetNotFoundError, match="pass --idx-dir"):
    # A closed port on this machine stands for an unreachable host.
    data.load("mnist", data_dir=str(tmp_path), url_base="http://127.0.0.1:9/mnist/")
  assert time.time() - start < 30


def test_a_failed_checkpoint_save_is_one_line_and_keeps_the_last(tmp_path, idx_dir, monkeypatch):
  import jax
  import orbax.checkpoint as ocp

  import trainer
  from trainer import loop

  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= 20:
      raise OSError(28, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  config = trainer.Config(
    dataset="mnist",
    idx_dir=str(idx_dir),
    data_dir=str(tmp_path / "tfds"),
    out=str(tmp_path / "run"),
    batch_size=6,
    steps=30,
    eval_every=10,
    checkpoint_every=10,
    progress=False,
  )
  with pytest.raises(loop.CheckpointError) as error:
    loop.train_and_evaluate(config, devices=jax.devices()[:2])
  assert "\n" not in str(error.value)
  assert "step 20: the checkpoint could not be saved" in str(error.value)
  assert "No space left on device" in str(error.value) and "step 10 is kept" in str(error.value)
  assert (tmp_path / "run" / "checkpoints" / "10").exists()


@pytest.mark.slow
def test_a_process_alone_gives_up_within_the_timeout(tmp_path, idx_dir):
  port = free_port()  # nothing listens there
  for process_id, expected in (
    (1, f"error: process 1: no coordinator at 127.0.0.1:{port} within 3 s"),
    (0, f"process 0: waiting up to 3 s (--connect-timeout) for 2 processes at 127.0.0.1:{port}"),
  ):
    start = time.time()
    result = _run(
      idx_dir,
      tmp_path / f"p{process_id}",
      "--steps",
      "10",
      "--coordinator",
      f"127.0.0.1:{port}",
      "--num-processes",
      "2",
      "--process-id",
      str(process_id),
      "--connect-timeout",
      "3",
    )
    assert result.returncode != 0 and time.time() - start < 60
    assert expected in result.stderr, result.stderr[-2000:]
    assert "CoordinationServiceAgent" not in result.stderr  # JAX's abort trace went to its log file
