"""Fine-tuning from PyTorch-layout weights, end to end on the one real dataset here (issue 28).

    python experiments/finetune.py [--runs runs] [--seeds 0,1]     # make finetune
    python experiments/finetune.py --report-only                   # the report from the committed data

No ImageNet weights can be had offline, so the pretrained model is made here:

1. two image folders from Fashion-MNIST (examples/export_image_folder.py): the
   first five classes (10,000 training images), and the other five (500 training
   images, 100 a class, and 2,000 test images): the new task;
2. ResNet-18 pretrained with train.py on the first folder (torchvision's padding);
3. exported to a torchvision-layout safetensors file (examples/export_torchvision.py);
4. fine-tuned on the new task with train.py --init-from, BN frozen, synced or per
   device, and trained from scratch for comparison (the CHOICES below).

Every step is skipped when its output exists and resumes when interrupted. The
metrics and configs go to reports/full/data/finetune/, the table to
reports/full/finetune.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.run import _finished  # noqa: E402
from trainer import cli, provenance  # noqa: E402

DATA = ROOT / "reports" / "full" / "data" / "finetune"
REPORT = ROOT / "reports" / "full" / "finetune.md"
COMMON = ("--model", "resnet18", "--image-size", "32", "--devices", "8", "--no-progress", "--torch-padding")
PRETRAIN = (
  *COMMON,
  *("--bn", "sync", "--global-batch-size", "128", "--steps", "600", "--eval-every", "200"),
  *("--lr", "0.1", "--schedule", "cosine", "--warmup-steps", "30", "--weight-decay", "1e-4"),
)
# 8 devices x 4 examples: per-device BN normalizes over 4, synced BN over 32
FINE_TUNE = (
  *COMMON,
  *("--global-batch-size", "32", "--steps", "300", "--eval-every", "100"),
  *("--schedule", "cosine", "--warmup-steps", "0", "--weight-decay", "1e-4"),
)
CHOICES = {  # name -> (from the pretrained weights, flags)
  "frozen": (True, ("--bn", "frozen", "--lr", "0.01")),
  "sync": (True, ("--bn", "sync", "--lr", "0.01")),
  "per-device": (True, ("--bn", "per-device", "--lr", "0.01")),
  "scratch": (False, ("--bn", "sync", "--lr", "0.01")),
  "scratch-lr0.1": (False, ("--bn", "sync", "--lr", "0.1")),
}
TITLES = {
  "frozen": "pretrained, BN frozen (`--bn frozen`)",
  "sync": "pretrained, synced BN (normalization batch 32)",
  "per-device": "pretrained, per-device BN (normalization batch 4)",
  "scratch": "from scratch, synced BN",
  "scratch-lr0.1": "from scratch, synced BN, lr 0.1",
}


def _run(command: list[str]) -> None:
  print("$ python " + " ".join(command), flush=True)
  subprocess.run([sys.executable, *command], cwd=ROOT, check=True)


def _train(out: Path, flags, log: dict) -> None:
  command = ["train.py", *flags, "--out", str(out)]
  if not _finished(out):
    _run([*command, *(("--resume",) if (out / "config.json").exists() else ())])
  log[out.name] = {"command": "python " + " ".join(command)}


def run_all(runs: Path, seeds: list[int], data_dir: str) -> None:
  folders = {"pretrain": runs / "folders" / "classes0-4", "new": runs / "folders" / "classes5-9"}
  exports = {"pretrain": ("0,1,2,3,4", "10000", "1000"), "new": ("5,6,7,8,9", "500", "2000")}
  for name, folder in folders.items():
    if not folder.exists():
      classes, train, test = exports[name]
      _run(["examples/export_image_folder.py", "--data-dir", data_dir, "--classes", classes, "--train", train,
            "--test", test, "--out", str(folder)])  # fmt: skip
  log: dict = {}
  tfds = ("--data-dir", str(runs / "tfds"))
  _train(runs / "pretrain", (*PRETRAIN, "--image-folder", str(folders["pretrain"]), *tfds), log)
  weights = runs / "pretrained-resnet18.safetensors"
  if not weights.exists():
    _run(["examples/export_torchvision.py", str(runs / "pretrain"), "--out", str(weights)])
  for seed in seeds:
    for name, (pretrained, flags) in CHOICES.items():
      init = ("--init-from", str(weights)) if pretrained else ()
      flags = (*FINE_TUNE, *flags, *init, "--image-folder", str(folders["new"]), *tfds, "--seed", str(seed))
      _train(runs / f"{name}-seed{seed}", flags, log)
  DATA.mkdir(parents=True, exist_ok=True)
  for name in log:
    for file in ("metrics.jsonl", "config.json"):
      (DATA / name).mkdir(exist_ok=True)
      shutil.copy(runs / name / file, DATA / name / file)
  info = {"runs": log, "machine": provenance.machine(), "commit": provenance.commit()}
  (DATA / "runs.json").write_text(json.dumps(info, indent=1) + "\n")


def _metrics(name: str) -> list[dict]:
  return [json.loads(line) for line in (DATA / name / "metrics.jsonl").read_text().splitlines()]


def report() -> str:
  """The table of the committed data: test accuracy on the new task at each evaluation."""
  info = json.loads((DATA / "runs.json").read_text())
  names = sorted({n.rsplit("-seed", 1)[0] for n in info["runs"] if "-seed" in n}, key=list(CHOICES).index)
  seeds = sorted({int(n.rsplit("-seed", 1)[1]) for n in info["runs"] if "-seed" in n})
  steps = [r["step"] for r in _metrics(f"{names[0]}-seed{seeds[0]}")]
  pre = _metrics("pretrain")[-1]
  lines = [
    "# Fine-tuning a pretrained ResNet-18 with frozen, synced and per-device BN",
    "",
    "Generated by `python experiments/finetune.py` (`make finetune`) from `reports/full/data/finetune/`;",
    f"machine: {info['machine']}; commit {info['commit']}.",
    "",
    f"Pretrained on Fashion-MNIST classes 0-4 (10,000 images, 600 steps of 128): test accuracy "
    f"{pre['test_accuracy']:.4f} on those classes. Fine-tuned on classes 5-9 from 500 images (100 a class), "
    "300 steps of 32 on 8 devices (4 a device), cosine schedule, weight decay 1e-4; the pretrained classifier "
    "(five classes too) is kept, as --init-from keeps a head of the data's class count. Test accuracy on 2,000 "
    f"images of classes 5-9, seeds {', '.join(map(str, seeds))}:",
    "",
    "| choice | " + " | ".join(f"step {s}" for s in steps) + " |",
    "|---|" + "---|" * len(steps),
  ]
  for name in names:
    cells = []
    for i in range(len(steps)):
      cells.append(", ".join(f"{_metrics(f'{name}-seed{s}')[i]['test_accuracy']:.4f}" for s in seeds))
    lines.append(f"| {TITLES[name]} | " + " | ".join(cells) + " |")
  lines += ["", "Commands (each run's exact command is in runs.json):", ""]
  lines += [f"    {info['runs'][name]['command']}" for name in ("pretrain", f"frozen-seed{seeds[0]}")]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/finetune", help="where the folders, weights and runs go")
  parser.add_argument("--data-dir", default="data", help="TFDS data dir holding fashion_mnist")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--report-only", action="store_true", help="only write the report from the committed data")
  args = parser.parse_args(argv)
  if not args.report_only:
    run_all(Path(args.runs), [int(s) for s in args.seeds.split(",")], args.data_dir)
  REPORT.write_text(report())
  print(f"wrote {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
  main()
