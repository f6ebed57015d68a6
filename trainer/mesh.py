"""The device mesh every parallel style runs over, and the name of its one axis."""

from __future__ import annotations

import numpy as np
from jax.sharding import AxisType, Mesh

AXIS = "batch"  # the device axis: the batch is split over it, gradients and synced BN reduce over it


def device_mesh(devices) -> Mesh:
  """A one-axis Explicit mesh over `devices`, in their order."""
  return Mesh(np.array(list(devices)), (AXIS,), axis_types=(AxisType.Explicit,))
