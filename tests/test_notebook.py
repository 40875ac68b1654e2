"""examples/merge_adapters.ipynb runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

import glob
import os
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_executes(monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the plot
    monkeypatch.setenv("PYTHONPATH", os.path.join(ROOT, "python"))
    leftovers = os.path.join(tempfile.gettempdir(), "gomerge-notebook-*")
    before = set(glob.glob(leftovers))
    nb = nbformat.read(os.path.join(ROOT, "examples", "merge_adapters.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.join(ROOT, "examples")}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("gomerge: merged-ties" in o["data"]["text/html"] for o in html)  # the result's rich display
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot
    assert any("torch.Size([1, 4, 128])" in "".join(o.get("text", "")) for o in outputs)
    assert set(glob.glob(leftovers)) == before  # the last cell removes the notebook's temporary folder
    assert any("removed" in "".join(o.get("text", "")) for o in outputs)


def test_notebook_names_its_requirements_and_they_are_an_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["notebook"]
    nb = nbformat.read(os.path.join(ROOT, "examples", "merge_adapters.ipynb"), as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for module, package in (("matplotlib", "matplotlib"), ("peft", "peft"), ("torch", "torch")):
        assert f"import {module}" in code or f"from {module}" in code
        assert package in extra
    assert "[notebook]" in nb.cells[0].source
