"""Shared fixtures: the gomerge package from the source tree and a report of parity figures."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PARITY: list[tuple[str, float]] = []


@pytest.fixture
def record_parity():
    """Records (label, largest relative difference) for the summary printed at the end of the run."""

    def record(label: str, value: float) -> None:
        PARITY.append((label, value))

    return record


def pytest_terminal_summary(terminalreporter):
    if not PARITY:
        return
    terminalreporter.section("gomerge vs PEFT: largest relative difference of B'A' per case")
    for label, value in sorted(PARITY):
        terminalreporter.write_line(f"{label:60s} {value:.3e}")
    terminalreporter.write_line(f"{'overall max (float32 cases)':60s} "
                                f"{max(v for l, v in PARITY if 'bf16' not in l and 'f16' not in l):.3e}")
