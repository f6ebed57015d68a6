"""compare.py: the placement of each normalization batch, its refusals, the verdicts on hand-made
records, and a sweep end to end (skipped runs, resume, its synced run equal to train.py alone)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import compare  # noqa: E402
from tests.idx_files import make_dataset, write_dataset  # noqa: E402
from tests.train_runs import metrics, run, train_command  # noqa: E402
from trainer.compare import plan, report  # noqa: E402


def test_each_size_is_placed_as_e4_does():
  # global batch 128 on 8 devices: 16 per device
  assert plan.placement(2, 128, 8) == {"bn": "per-device", "devices": 8, "bn_group_size": 2}
  assert plan.placement(16, 128, 8) == {"bn": "per-device", "devices": 8}
  assert plan.placement(32, 128, 8) == {"bn": "per-device", "devices": 1, "bn_group_size": 32}
  assert plan.placement(128, 128, 8) == {"bn": "per-device", "devices": 1}
  assert plan.placement("sync", 128, 8) == {"bn": "sync", "devices": 8}
  sweep = plan.Sweep([2, 32, "sync"], [0, 1], ["renorm", "frozen"], [2], population_samples=10_000)
  runs = {r.name: r for r in sweep.runs(128, 8, steps=600)}
  assert sorted(runs) == sorted(
    f"{slug}-{n}-seed{s}"
    for s in (0, 1)
    for slug, n in [("bn", "n2"), ("renorm", "n2"), ("frozen", "n2"), ("bn", "n32"), ("bn", "sync")]
  )
  assert runs["bn-n2-seed0"].flags["population_batches"] == 5000  # 10^4 samples in batches of 2
  assert runs["bn-sync-seed1"].flags["population_batches"] == 78  # ... of the global 128
  assert runs["frozen-n2-seed0"].flags["frozen_bn_steps"] == 120  # the last fifth
  assert runs["renorm-n2-seed0"].flags["bn"] == "renorm" and "population_batches" not in runs["renorm-n2-seed0"].flags


@pytest.mark.parametrize(
  "flags,flag",
  [
    (["--normalization-batch", "3,sync"], "--normalization-batch: 3 does not divide the per-device batch of 16"),
    (["--normalization-batch", "48"], "--normalization-batch: 48 does not divide the global batch of 128"),
    (["--normalization-batch", "256"], "--normalization-batch: 256 does not divide the global batch"),
    (["--normalization-batch", ""], "--normalization-batch: expected a list"),
    (["--normalization-batch", "2,x"], "--normalization-batch: expected positive integers or sync, got 'x'"),
    (["--normalization-batch", "2", "--repairs", "bn"], "--repairs: expected some of renorm, frozen, got bn"),
    (["--normalization-batch", "2", "--repairs", "frozen", "--repair-sizes", "4"], "--repair-sizes: 4 not in"),
    (["--normalization-batch", "2", "--repairs", "frozen"], "--repair-sizes: give the sizes"),
    (["--normalization-batch", "2", "--seeds", ""], "--seeds: expected a list"),
    (["--normalization-batch", "2", "--jobs", "0"], "--jobs: expected a positive integer"),
    (["--normalization-batch", "2", "--shard", "2/2"], "--shard: expected K/N"),
    (["--normalization-batch", "2", "--bn", "sync"], "unrecognized arguments: --bn sync"),  # compare sets --bn
    (["--normalization-batch", "2", "--lr", "-1"], "--lr: expected a finite positive number"),
  ],
)
def test_bad_input_is_one_line_before_any_work(flags, flag, capsys):
  with pytest.raises(SystemExit) as exit_info:
    compare.parse_args(["--model", "resnet20", "--devices", "8", "--out", "x", *flags])
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("compare.py: error: ") and flag in lines[0], lines


def _records(table):
  """{(mode, size): [ema per seed]} with the other evaluations given as offsets from EMA."""
  out = []
  for (mode, size), values in table.items():
    for seed, (ema, pooled, paper, batch) in enumerate(values):
      out.append(
        {
          "normalization_batch": size,
          "mode": mode,
          "seed": seed,
          "test_accuracy": {"ema": ema, "precise_pooled": pooled, "precise_paper": paper, "batch_stats": batch},
        }
      )
  return out


def test_verdicts_from_hand_made_records():
  records = _records(
    {
      ("BN", 2): [(0.70, 0.72, 0.71, 0.74), (0.71, 0.73, 0.72, 0.75)],  # small batches hurt; PreciseBN +0.02
      ("BN", 16): [(0.80, 0.80, 0.80, 0.78), (0.81, 0.81, 0.81, 0.79)],
      ("BN", 32): [(0.83, 0.83, 0.83, 0.82), (0.84, 0.84, 0.84, 0.83)],  # beats synced BN by 0.02
      ("BN", "sync"): [(0.81, 0.81, 0.81, 0.80), (0.82, 0.82, 0.82, 0.81)],
      ("FrozenBN final phase", 2): [(0.75, 0.75, 0.75, 0.75), (0.76, 0.76, 0.76, 0.76)],
    }
  )
  text = report.verdicts(records)
  assert len(text) == 5
  # seed spread 0.005 everywhere: the noise is 2 x 0.005 = 0.01
  assert text[0].startswith("**Small normalization batches hurt** — holds: 0.7050 at 2, 0.8050 at 16")
  # 16 is 0.03 below the best (32)
  assert "the next smaller size (0.8050 at 16) is more than 0.0100 (twice the median seed spread, at least" in text[0]
  assert "— holds: the best of 16, 32 (0.8350 at 32) beats synced BN (0.8150; difference 0.0200)" in text[1]
  assert "— holds at 2: pooled PreciseBN minus EMA 0.0200 at 2, 0.0000 at 16" in text[2]
  assert "Pooled minus the paper's estimator: 0.0100 at 2" in text[2]
  assert "— holds at 2: test-batch statistics minus EMA 0.0400 at 2, -0.0200 at 16" in text[3]
  assert "— helps at 2: at 2: 0.7550 vs BN's 0.7050 (0.0500); synced BN: 0.8150" in text[4]
  table = report.accuracy_table(records)
  assert "| BN, sync | 0.8150 ± 0.0050 | 0.8150 ± 0.0050 | 0.8150 ± 0.0050 | 0.8050 ± 0.0050 |" in table
  assert "| FrozenBN final phase, 2 | 0.7550 ± 0.0050 |" in table


def test_verdicts_say_does_not_hold_and_within_the_noise():
  flat = _records({("BN", n): [(0.8, 0.79, 0.79, 0.7), (0.8, 0.79, 0.79, 0.7)] for n in (2, 16, "sync")})
  text = report.verdicts(flat)
  assert "— within the seed noise: 0.8000 at 2" in text[0]  # noise: the 0.005 floor
  assert "— holds: the best of 16 (0.8000 at 16) matches synced BN" in text[1]
  assert "— within the noise: pooled PreciseBN minus EMA -0.0100" not in text[2]
  assert "— does not hold: pooled PreciseBN minus EMA -0.0100 at 2" in text[2]
  assert "— does not hold at 2: test-batch statistics minus EMA -0.1000 at 2" in text[3]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("idx"), make_dataset(n_train=240, n_test=30))


def _compare(idx_dir, out, *extra, data_dir):
  args = ["--dataset", "mnist", "--idx-dir", str(idx_dir), "--data-dir", str(data_dir), "--init-std", "0.3"]
  args += ["--devices", "2", "--global-batch-size", "8", "--steps", "30", "--eval-every", "10", "--out", str(out)]
  return [sys.executable, str(ROOT / "compare.py"), *args, *extra]


@pytest.mark.slow
def test_a_sweep_end_to_end(tmp_path, idx_dir):
  """Runs, skips, adds, refuses, resumes after a kill; its synced run equals train.py alone."""
  out, data = tmp_path / "sweep", tmp_path / "tfds"
  sweep = ("--normalization-batch", "2,sync", "--seeds", "0", "--population-samples", "16")
  first = run(_compare(idx_dir, out, *sweep, data_dir=data))
  assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-2000:]
  assert "normalization batch 2: per-device BN on 2 devices, groups of 2 in each device's 4" in first.stdout
  assert "normalization batch sync: synced BN: the global batch of 8 over 2 device(s)" in first.stdout
  assert "done   bn-sync-seed0 in" in first.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["flags"]["normalization_batch"] == [2, "sync"] and summary["flags"]["steps"] == 30
  assert [(r["normalization_batch"], r["seed"]) for r in summary["results"]] == [(2, 0), ("sync", 0)]
  for r in summary["results"]:
    ema = metrics(out / "runs" / f"bn-{'sync' if r['normalization_batch'] == 'sync' else 'n2'}-seed0")[-1]
    assert r["test_accuracy"]["ema"] == ema["test_accuracy"]
    assert r["test_accuracy"]["precise_pooled"] == ema["test_accuracy_population_pooled"]
  assert "## Verdicts" in (out / "report.md").read_text() and (out / "accuracy.png").stat().st_size > 10_000

  # synced seed 0 is exactly train.py run alone with the same flags
  alone = tmp_path / "alone"
  flags = ("--devices", "2", "--global-batch-size", "8", "--steps", "30", "--eval-every", "10", "--bn", "sync")
  single = run(train_command(idx_dir, alone, *flags, data_dir=data))
  assert single.returncode == 0, single.stderr[-3000:]
  assert metrics(alone)[-1]["test_accuracy"] == summary["results"][-1]["test_accuracy"]["ema"]
  assert metrics(alone)[-1]["train_loss"] == metrics(out / "runs" / "bn-sync-seed0")[-1]["train_loss"]

  before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.jsonl")}
  again = run(_compare(idx_dir, out, *sweep, data_dir=data))
  assert again.returncode == 0 and "2 of this process's 2 runs finished already; training 0" in again.stdout
  assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.jsonl")} == before

  changed = run(_compare(idx_dir, out, *sweep, "--lr", "0.3", data_dir=data))
  assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
    f"compare.py: error: --lr: the sweep in {out} was trained with no --lr, this command has --lr 0.3; "
    "use another --out for other training settings (see compare.py --help)"
  ]

  # one more seed: two runs more; stopped (SIGTERM, as a scheduler does) while the second trains, the next
  # command keeps the finished runs and resumes the stopped one from its checkpoint
  more = ("--normalization-batch", "2,sync", "--seeds", "0,1", "--population-samples", "16")
  proc = subprocess.Popen(
    _compare(idx_dir, out, *more, data_dir=data), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  stopped = out / "runs" / "bn-sync-seed1"
  deadline = time.time() + 240
  # its first evaluation (step 10) written: 20 steps (about a second here) are left to stop it in; a fixed sleep
  # from its start was not enough where compiled programs come from the cache
  while not (stopped / "metrics.jsonl").exists() or "\n" not in (stopped / "metrics.jsonl").read_text():
    assert time.time() < deadline and proc.poll() is None, "the sweep did not reach bn-sync-seed1's step 10"
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and err.strip().splitlines()[-1].startswith("stopped: the runs in progress saved"), err
  assert metrics(stopped)[-1]["step"] < 30, "the run finished before it could be stopped"
  resumed = run(_compare(idx_dir, out, *more, data_dir=data))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "3 of this process's 4 runs finished already; training 1" in resumed.stdout, resumed.stdout
  assert {p: p.stat().st_mtime_ns for p in before} == before
  assert len(json.loads((out / "summary.json").read_text())["results"]) == 4
