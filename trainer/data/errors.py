"""What goes wrong with data, as one line that names the dataset, file or flag."""

from __future__ import annotations

import socket
import urllib.parse


class DatasetError(ValueError):
  """The data cannot be had or read; the message names the file or flag."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """Not prepared and not downloadable: the message says how to get it."""


def reachable(url: str, timeout: float = 5.0) -> None:
  """Raises OSError within `timeout` seconds when `url`'s host cannot be reached
  (offline, TFDS would retry for minutes)."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  socket.create_connection((parts.hostname, port), timeout=timeout).close()
