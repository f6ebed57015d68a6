"""What every command-line tool of the project shares."""

from __future__ import annotations

import argparse
import dataclasses


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser, but a usage error is one line: what is wrong, and where the help is
  (not the whole usage text in front of it); flags are never abbreviated."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)  # --bn must not pass as --bn-momentum
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def option(help: str, default=None, choices=None):
  """A Config field that is a flag: its help, default and choices (`train.py --help` shows them)."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def flag(name: str) -> str:
  """The command-line spelling of a Config field: global_batch_size -> --global-batch-size."""
  return "--" + name.replace("_", "-")


def first_line(error: BaseException, limit: int = 300) -> str:
  """`Type: the first line of the message`, cut to `limit` characters: what a one-line error quotes."""
  text = (str(error).strip().splitlines() or [""])[0][:limit]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def shard(text: str | None) -> tuple[int, int]:
  """--shard K/N: (K, N) with 0 <= K < N; None is (0, 1), the whole. ValueError naming the flag otherwise."""
  if text is None:
    return 0, 1
  try:
    k, n = map(int, text.split("/"))
  except ValueError:
    k, n = -1, 0
  if not 0 <= k < n:
    raise ValueError(f"--shard: expected K/N with 0 <= K < N, got {text!r}")
  return k, n
