"""The benchmarks on an accelerator, in one prepared run (`make bench-device`, under ~8 minutes).

    python benchmarks/device.py

Runs the BN layer (jaxbn vs flax vs the memory-traffic floor), synced BN over
the machine's devices, the training steps of the paper's models and the ResNet
steps (jaxbn vs flax BN, float32 and bfloat16) and gradient accumulation's memory and time
per K, each writing
benchmarks/results/NAME.PLATFORM.json with the device named in it. Needs jax,
flax and optax only (no data, no training stack): an accelerator image's own
Python serves. Refuses to run on a CPU, whose results are `make bench`'s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import accumulation, bn_layer, resnet_steps, synced, train_steps

# Fewer rounds than on a CPU: an accelerator's timings vary less, and the lease is short.
# The ResNet steps first after the BN layer: their compilations are the longest part.
RUNS = [
  (bn_layer, ["--rounds", "20"]),
  (resnet_steps, ["--rounds", "5"]),
  (train_steps, ["--rounds", "5"]),
  (synced, ["--rounds", "20"]),
  (accumulation, ["--rounds", "3"]),  # last: new, and what an overrun may cut
]


def main():
  device = jax.devices()[0]
  if device.platform == "cpu":
    sys.exit("benchmarks/device.py: no accelerator here (jax sees only the CPU); on a CPU run `make bench`.")
  print(f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
  for module, argv in RUNS:
    start = time.time()
    module.main(argv)
    print(f"{module.__name__}: {time.time() - start:.0f} s\n", flush=True)


if __name__ == "__main__":
  main()
