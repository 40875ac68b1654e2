"""examples/merge_adapters.ipynb runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_executes(monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the plot
    monkeypatch.setenv("PYTHONPATH", os.path.join(ROOT, "python"))
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
