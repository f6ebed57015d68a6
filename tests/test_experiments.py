"""Every planned experiment run is a valid train.py command line."""

import pytest

import train
from experiments.plan import E1_SETTINGS, E3_BATCHES, E3_MODES, SIZES, STYLES, runs


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
  assert {r.labels["per_device_batch"] for r in e3} == set(SIZES[size]["e3_batches"])
  assert {r.labels["setting"] for r in plan if r.experiment == "e1"} == {s.name for s in E1_SETTINGS}


def test_the_full_plan_is_what_issue_12_asks_for():
  plan = runs("full")
  e1 = [r for r in plan if r.experiment == "e1"]
  assert len(E1_SETTINGS) >= 4 and len(e1) == len(E1_SETTINGS) * 2 * 3  # both arms, 3 seeds
  for run in e1:
    config, _, _ = train.parse_args([*run.args, "--out", "unused"])
    assert (config.steps, config.batch_size) == (50_000, 60)
  assert len({r.labels["seed"] for r in plan if r.experiment == "e2"}) >= 2
  e3 = [r for r in plan if r.experiment == "e3"]
  assert {r.labels["per_device_batch"] for r in e3} == set(E3_BATCHES) == {2, 4, 8, 16, 32}
  for mode, _bn, devices in E3_MODES:
    styles = {r.labels["style"] for r in e3 if r.labels["mode"] == mode}
    assert styles == (set(STYLES) if devices > 1 else {"jit"}), mode
  per_device = [r for r in e3 if r.labels["mode"] == "per-device BN"]
  assert all("--population-batches" in r.args for r in per_device)
