"""The one markdown table writer of reports, `ayt eval`, `ayt tangents`, the demo and the benchmarks
(stdlib only, so light entry points may import it)."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table: `header` [columns], `rows` [[cell per column]] (cells via str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
