"""The opt-in part of `make bench`: rows whose peer takes minutes, run only with `--scenarios ...,SLOW`.

The default run must stay within 30 minutes. M1's peers that run dense SVDs of the stacked updates take most of a
full run (last measured: KnOTS's 186-723 s per module, 46 minutes in all; fusion-bench's TSV-M and iso_cts 51-298 s
per module, 10 minutes; iso_c 11-39 s); their rows move here. A run without SLOW keeps their last measured rows from
benchmarks/results/latest.json, and the table prints them as "last measured" with the date of that run.
"""

from __future__ import annotations

import time

# M1 methods whose peer (dense SVDs in torch) takes more than ~10 s per module: opt-in
SLOW_M1 = ("iso_c", "tsv", "iso_cts", "knots_ties", "knots_dare_ties", "knots_linear")


def m1_methods(requested: set[str] | None, all_methods, todo: set[str]) -> set[str]:
    """The M1 methods a run measures: the requested ones (`--m1-methods`); else M1's methods but the slow ones
    (scenario M1) and the slow ones (scenario SLOW), as the scenarios ask."""
    if requested is not None:
        return set(requested)
    return {m for m in all_methods if ("SLOW" if m in SLOW_M1 else "M1") in todo}


def is_slow(row: dict) -> bool:
    """Whether a row belongs to the opt-in SLOW set."""
    return row["scenario"] == "M1" and row["method"] in SLOW_M1


def today() -> str:
    """The date a row was measured (UTC), recorded in each row."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def label(row: dict) -> str:
    """The method cell of a row: a slow row kept from an earlier run says when it was last measured."""
    if not row.get("last_measured") or not is_slow(row):
        return row["method"]
    return f"{row['method']} (last measured {row.get('measured', 'in an earlier run')}; SLOW)"
