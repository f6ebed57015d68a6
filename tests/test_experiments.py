"""Every planned experiment run is a valid train.py command line."""

import pytest

import train
from experiments.plan import COMPARISONS, E1_SETTINGS, E3_BATCHES, E3_MODES, SIZES, STYLES, runs
from experiments.run import select


@pytest.mark.parametrize("size", ["default", "full"])
def test_every_planned_run_parses(size):
  plan = runs(size)
  assert {r.experiment for r in plan} == {"e1", "e1_sweep", "e2", "e3"} | ({"e5"} if size == "full" else set())
  names = [(r.experiment, r.name) for r in plan]
  assert len(names) == len(set(names))  # each run has its own output directory
  for run in plan:
    config, _, _ = train.parse_args([*run.args, "--out", "unused"])
    assert config.steps % config.eval_every == 0
  e3 = [r for r in plan if r.experiment == "e3"]
  assert {r.labels["per_device_batch"] for r in e3} == set(SIZES[size]["e3_batches"])
  assert {r.labels["setting"] for r in plan if r.experiment == "e1"} == {s.name for s in E1_SETTINGS}
  import compare

  assert "e4" in COMPARISONS[size]
  for flags in COMPARISONS[size].values():  # every comparison is a valid compare.py command line
    compare.parse_args([*flags, "--out", "unused"])


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


@pytest.mark.parametrize("name", ["e4", "e4_long"])
def test_e4_and_e4_long_are_compare_py_with_the_settings_the_issues_ask_for(name):
  """ResNet-20 on Fashion-MNIST, global batch 128 on 8 devices; E4: the normalization batch 2..64 and
  synced, 3 seeds, Batch Renorm and a FrozenBN final phase at 2 and 4 (issue 20); E4-long: 2, 8, 32 and
  synced, 2 seeds, 4x the steps, a FrozenBN final phase at 2 (issue 25). Four evaluations each."""
  import compare
  from trainer.compare.sweep import as_argv

  _, sweep, given, config, devices, global_batch, _ = compare.parse_args([*COMPARISONS["full"][name], "--out", "x"])
  assert (config.model, config.dataset, global_batch, devices) == ("resnet20", "fashion_mnist", 128, 8)
  specs = sweep.runs(global_batch, devices, config.steps)
  if name == "e4":
    assert config.steps == 600 and sweep.sizes == [2, 4, 8, 16, 32, 64, "sync"] and sweep.seeds == [0, 1, 2]
    assert sweep.repairs == ["renorm", "frozen"] and sweep.repair_sizes == [2, 4] and len(specs) == 33
  else:
    assert config.steps == 4 * 600 and sweep.sizes == [2, 8, 32, "sync"] and sweep.seeds == [0, 1]
    assert sweep.repairs == ["frozen"] and sweep.repair_sizes == [2] and len(specs) == 10
  for spec in specs:
    run_config = train.parse_args([*as_argv({**given, "devices": devices, **spec.flags}), "--out", "unused"])[0]
    normalized = run_config.bn_group_size or (128 if run_config.bn == "sync" else 128 // run_config.devices)
    assert normalized == (128 if spec.size == "sync" else spec.size), spec.name
    assert run_config.eval_batch_stats
    if spec.mode != "Batch Renorm":
      assert run_config.population_estimator == "both" and run_config.population_batches * normalized >= 9_000
    if spec.mode == "FrozenBN final phase":
      assert run_config.frozen_bn_steps == run_config.steps // 5


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/2"])
def test_a_bad_shard_is_one_line(shard):
  with pytest.raises(SystemExit, match="--shard: expected K/N"):
    select(runs("default"), shard=shard)
