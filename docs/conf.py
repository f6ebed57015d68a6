"""Sphinx configuration: MyST markdown pages, autodoc for the API reference (make docs)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jaxbn  # noqa: E402

project = "jaxbn"
release = version = jaxbn.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
html_theme = "furo"
html_title = f"jaxbn {release}"


def _plain_text_docstring(app, what, name, obj, options, lines):
  """jaxbn's docstrings are plain text with indented formulas (as the code reads them):
  shown as written, in a literal block, rather than parsed as reStructuredText."""
  if lines:
    lines[:] = ["::", "", *("   " + line for line in lines), ""]


def setup(app):
  app.connect("autodoc-process-docstring", _plain_text_docstring)
