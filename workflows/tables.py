"""Plain-text and Markdown tables for terminal summaries and reports."""
from __future__ import annotations

from collections.abc import Sequence


def _cell(value: object, digits: int) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 2) -> str:
    """A GitHub-flavoured Markdown table; floats with ``digits`` decimals, NaN/None as '-'."""
    cells = [[_cell(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[k]) for r in cells)) if cells else len(h) for k, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
