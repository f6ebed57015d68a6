"""Every planned experiment run is a valid train.py command line."""

import pytest

import train
from experiments.plan import E1_SETTINGS, E3_BATCHES, E3_MODES, SIZES, STYLES, runs
from experiments.run import select


@pytest.mark.parametrize("size", ["default", "full"])
def test_every_planned_run_parses(size):
  plan = runs(size)
  assert {r.experiment for r in plan} == {"e1", "e1_sweep", "e2", "e3", "e4"}
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


def test_the_full_e4_plan_is_what_issue_20_asks_for():
  """ResNet-20, global batch 128, the normalization batch 2..128 with 3 seeds; the size
  equal to the per-device batch as per-device BN on 8 devices; four evaluations; Batch
  Renorm and a FrozenBN final phase at the two smallest sizes."""
  e4 = [r for r in runs("full") if r.experiment == "e4"]
  configs = {r.name: (r, train.parse_args([*r.args, "--out", "unused"])[0]) for r in e4}
  assert {r.labels["size"] for r in e4} == {2, 4, 8, 16, 32, 64, 128}
  for run, config in configs.values():
    assert (config.model, config.dataset, config.global_batch_size) == ("resnet20", "fashion_mnist", 128)
    devices = config.devices
    size = config.bn_group_size or (128 if config.bn == "sync" else 128 // devices)
    assert size == run.labels["size"], run.name
    assert config.eval_batch_stats
    if run.labels["mode"] != "Batch Renorm":
      assert config.population_estimator == "both" and config.population_batches * size >= 9_000
  for mode in ("BN", "Batch Renorm", "FrozenBN final phase"):
    seeds = {(r.labels["size"], r.labels["seed"]) for r in e4 if r.labels["mode"] == mode}
    sizes = {2, 4, 8, 16, 32, 64, 128} if mode == "BN" else {2, 4}
    assert seeds == {(n, s) for n in sizes for s in (0, 1, 2)}, mode
  per_device = configs["bn-n16-seed0"][1]
  assert (per_device.bn, per_device.devices, per_device.bn_group_size) == ("per-device", 8, None)
  frozen = configs["frozen-n2-seed0"][1]
  assert 0.1 * frozen.steps <= frozen.frozen_bn_steps <= 0.2 * frozen.steps


def test_shards_of_the_e4_plan_split_it_into_disjoint_halves_that_pair_one_device_runs():
  e4 = select(runs("full"), only={"e4"})
  halves = [select(runs("full"), only={"e4"}, shard=f"{k}/2") for k in (0, 1)]
  names = [[r.name for r in half] for half in halves]
  assert sorted(names[0] + names[1]) == sorted(r.name for r in e4) and not set(names[0]) & set(names[1])
  assert abs(len(names[0]) - len(names[1])) <= 1
  # the one-device runs (32 and 64 of a seed) are neighbours in the plan: one in each stream
  for seed in (0, 1, 2):
    assert [f"bn-n32-seed{seed}" in n for n in names] != [f"bn-n64-seed{seed}" in n for n in names]
  assert [r.name for r in select(runs("full"), only={"e4"}, match="seed1")] == [r.name for r in e4 if "seed1" in r.name]


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/2"])
def test_a_bad_shard_is_one_line(shard):
  with pytest.raises(SystemExit, match="--shard: expected K/N"):
    select(runs("default"), shard=shard)
