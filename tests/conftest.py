"""Shared fixtures: the gomerge package from the source tree, the reference SVD's path, and a report of parity
figures (with the arithmetic the reference ran on)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import svd_checks  # noqa: E402  (after the path setup above)

svd_checks.install_reference_svd()

BA_DIFF = "largest relative difference of B'A' (max |ours - PEFT| / max |PEFT|)"
PARITY: dict[str, list[tuple[str, float]]] = {}
TRUNCATIONS: list[svd_checks.Truncation] = []


@pytest.fixture
def record_parity():
    """Records a figure per case (by default the largest relative difference of B'A' from PEFT's) for the summary
    printed at the end of the run."""

    def record(label: str, value: float, kind: str = BA_DIFF) -> None:
        PARITY.setdefault(kind, []).append((label, value))

    return record


@pytest.fixture
def check_truncation():
    """svd_checks.check_truncation, with its figures kept for the summary's SVD-family table."""

    def check(*args, **kwargs) -> svd_checks.Truncation:
        t = svd_checks.check_truncation(*args, **kwargs)
        TRUNCATIONS.append(t)
        return t

    return check


def pytest_report_header(config):
    return f"numerics: {svd_checks.numerics_description()}"


def pytest_terminal_summary(terminalreporter):
    for kind, rows in PARITY.items():
        terminalreporter.section(f"gomerge vs PEFT: {kind}")
        for label, value in sorted(rows):
            terminalreporter.write_line(f"{label:64s} {value:.3e}")
        f32 = [v for label, v in rows if "bf16" not in label and "f16" not in label]
        if f32:
            terminalreporter.write_line(f"{'max over float32 cases':64s} {max(f32):.3e}")
    if TRUNCATIONS:
        terminalreporter.section("SVD family: spectral gap at the rank and error / optimal (svd_checks.py's rules)")
        terminalreporter.write_line(f"numerics: {svd_checks.numerics_description()}")
        worst: dict[str, svd_checks.Truncation] = {}
        for t in TRUNCATIONS:  # per case, the module closest to its bound
            case = t.label.split(" ")[0]
            if case not in worst or t.closeness > worst[case].closeness:
                worst[case] = t
        for case, t in sorted(worst.items()):
            terminalreporter.write_line(f"{case:52s} {t.summary()}")
        gaps = [t.gap / t.s1 for t in TRUNCATIONS if t.s1]
        terminalreporter.write_line(
            f"{len(TRUNCATIONS)} modules; smallest gap/s1 {min(gaps):.2e}; "
            f"largest err/opt gomerge {max(t.ratio_ours for t in TRUNCATIONS):.6f}"
        )
