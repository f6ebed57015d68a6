"""Every planned experiment run is a valid train.py command line."""

import pytest

import train
from experiments.plan import runs


@pytest.mark.parametrize("size", ["default", "full"])
def test_every_planned_run_parses(size):
  plan = runs(size)
  assert {r.experiment for r in plan} == {"e1", "e1_sweep", "e2", "e3"}
  names = [(r.experiment, r.name) for r in plan]
  assert len(names) == len(set(names))  # each run has its own output directory
  for run in plan:
    config, _, _ = train.parse_args([*run.args, "--out", "unused"])
    assert config.steps % config.eval_every == 0
  e3 = [r for r in plan if r.experiment == "e3"]
  assert {r.labels["per_device_batch"] for r in e3} == {2, 4, 8, 16, 32}
