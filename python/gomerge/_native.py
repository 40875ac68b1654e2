"""The one Go extension of gomerge, built by gopy from ``bindings/``.

Every call into Go goes through this module: it imports the extension once and decodes its JSON replies.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ._errors import raise_engine_error

try:
    from ._engine import bindings as _b
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "gomerge's Go extension is missing: build it with `make build` in a source checkout, "
        "or install gomerge with pip (building from source needs Go >= 1.26)"
    ) from exc

_PID = os.getpid()


def _check_fork() -> None:
    if os.getpid() != _PID:
        raise RuntimeError(
            "gomerge cannot run in a process forked after it was imported (the Go runtime does not survive fork); "
            "use multiprocessing with the 'spawn' start method"
        )


def engine_version() -> str:
    """Returns the version of the Go engine."""
    return _b.engine_version()


def merge_start(request: dict[str, Any]) -> int:
    """Starts a merge job in Go and returns its id."""
    _check_fork()
    return int(_b.merge_start(json.dumps(request)))


def merge_wait(job: int, timeout_ms: int) -> dict[str, Any]:
    """Waits up to ``timeout_ms`` for a job; returns its status (raises on a failed job)."""
    status = json.loads(_b.merge_wait(job, timeout_ms))
    if status.get("state") == "error":
        raise_engine_error(status["error"])
    return status


def merge_cancel(job: int) -> None:
    """Asks a running job to stop."""
    _b.merge_cancel(job)


def inspect_adapter(path: str) -> dict[str, Any]:
    """Returns the engine's summary of an adapter directory."""
    _check_fork()
    info = json.loads(_b.inspect_adapter(path))
    if info.get("state") == "error":
        raise_engine_error(info["error"])
    return info
