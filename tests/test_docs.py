"""The README and the docs as a new user reads them: every ```python block runs as pasted, and
every flag they name for train.py / compare.py exists.

A block runs on its own in a fresh Python (the project installed, 8 host CPU devices, a scratch
working directory), so it must carry its imports and data. A sketch of a call that is not meant
to run uses the fence ```py instead (CONTRIBUTING.md).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
  for page in PAGES:
    text = page.read_text()
    for match in BLOCK.finditer(text):
      line = text[: match.start()].count("\n") + 1
      yield pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}")


def test_the_docs_have_runnable_examples():
  assert len(list(_blocks())) >= 10


@pytest.mark.parametrize("code", list(_blocks()))
def test_python_block_runs_as_pasted(code, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]


def _options(script: str) -> set[str]:
  sys.path.insert(0, str(ROOT))
  module = __import__(script)
  return {flag for action in module.make_parser()._actions for flag in action.option_strings}


def _commands(text: str, script: str) -> list[str]:
  """Each command line of `script` in the shell blocks of `text` (continuation lines joined)."""
  commands = []
  for block in re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", text, re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      if re.search(rf"(^|\s){re.escape(script)}\.py\s", line + " "):
        commands.append(line.split("#", 1)[0])
  return commands


@pytest.mark.parametrize("script", ["train", "compare"])
def test_every_flag_named_exists(script):
  if not (ROOT / f"{script}.py").exists():
    pytest.skip(f"{script}.py is not there yet")
  known = _options(script)
  # the compare page also names the train.py flags each run gets
  page_known = known | (_options("train") if script == "compare" else set())
  named, on_page = set(), set()
  for page in PAGES:
    text = page.read_text()
    for command in _commands(text, script):
      named |= {(page.name, f) for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command)}
    if page.name == f"{'training' if script == 'train' else 'compare'}.md":  # the page about the command
      on_page |= {(page.name, f) for f in re.findall(r"`(--[a-z][a-z0-9-]*)", text)}
  unknown = sorted((page, flag) for page, flag in named if flag not in known)
  unknown += sorted((page, flag) for page, flag in on_page if flag not in page_known)
  assert not unknown, unknown
  assert len(named) > 10
