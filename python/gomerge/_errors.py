"""Turns the engine's error reports into Python exceptions."""

from __future__ import annotations

_KINDS: dict[str, type[BaseException]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "FileNotFoundError": FileNotFoundError,
    "FileExistsError": FileExistsError,
    "OSError": OSError,
    "KeyboardInterrupt": KeyboardInterrupt,
    "RuntimeError": RuntimeError,
}


def raise_engine_error(error: dict) -> None:
    """Raises the exception described by an engine error ``{"kind": ..., "message": ...}``."""
    cls = _KINDS.get(error.get("kind", ""), RuntimeError)
    message = error.get("message", "unknown error")
    if cls is RuntimeError:
        message = f"gomerge internal error (please report it): {message}"
    raise cls(message)
