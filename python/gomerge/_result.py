"""What the engine's results share: built from its reply, printed on one line, shown as a table in Jupyter."""

from __future__ import annotations

import html
from dataclasses import fields
from typing import Any


class EngineResult:
    """Base of the dataclasses that hold a job's result (`MergeResult`, `FuseResult`, `ExtractResult`)."""

    def __repr__(self) -> str:
        """The fields on one line, with each list or dict too long to read at a glance shown as its length
        (``module_ranks=<28 items>``); the items stay in the attribute."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            text = repr(value)
            if isinstance(value, (list, dict)) and len(text) > 60:
                text = f"<{len(value)} item{'s' if len(value) != 1 else ''}>"
            parts.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @classmethod
    def _from_engine(cls, result: dict[str, Any]) -> Any:
        """Builds the result from the engine's reply; keys this version does not know are left out (a test keeps
        the two in step)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in result.items() if k in known})

    def _html_rows(self) -> tuple[str, list[tuple[str, Any]]]:
        """The caption and the (label, value) rows of the Jupyter table; results without one have none."""
        raise NotImplementedError

    def _repr_html_(self) -> str | None:
        try:
            caption, items = self._html_rows()
        except NotImplementedError:
            return None
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in items
        )
        return f"<table><caption>{html.escape(caption)}</caption>{rows}</table>"
