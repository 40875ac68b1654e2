"""Shared fixtures: the gomerge package from the source tree and a report of parity figures."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BA_DIFF = "largest relative difference of B'A' (max |ours - PEFT| / max |PEFT|)"
PARITY: dict[str, list[tuple[str, float]]] = {}


@pytest.fixture
def record_parity():
    """Records a figure per case (by default the largest relative difference of B'A' from PEFT's) for the summary
    printed at the end of the run."""

    def record(label: str, value: float, kind: str = BA_DIFF) -> None:
        PARITY.setdefault(kind, []).append((label, value))

    return record


def pytest_terminal_summary(terminalreporter):
    for kind, rows in PARITY.items():
        terminalreporter.section(f"gomerge vs PEFT: {kind}")
        for label, value in sorted(rows):
            terminalreporter.write_line(f"{label:64s} {value:.3e}")
        f32 = [v for label, v in rows if "bf16" not in label and "f16" not in label]
        if f32:
            terminalreporter.write_line(f"{'max over float32 cases':64s} {max(f32):.3e}")
