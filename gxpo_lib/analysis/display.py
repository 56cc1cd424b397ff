"""Long tables and long lists folded behind a short summary (notebooks show at most five lines of each).

    fold_table(table, "48 cells: final pass@1 per method and lr")    # summary, the full table behind a click
    fold_lines(lines, "89 runs; 3 shut their gate early")            # the same for printed lines

In JupyterLab and in the HTML export the full table sits in an HTML ``<details>`` element (closed until
clicked); as plain text (a terminal, papermill's log) the summary and the first rows are shown.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

MAX_LINES = 5


class Folded:
    """A summary of at most `MAX_LINES` lines, and the full content in a closed ``<details>`` element."""

    def __init__(self, summary: Any, full_html: str, full_text: str, label: str):
        self.summary, self.full_html, self.full_text, self.label = summary, full_html, full_text, label

    def _summary_html(self) -> str:
        if hasattr(self.summary, "to_html"):
            return self.summary.to_html(index=False)
        lines = self.summary if isinstance(self.summary, (list, tuple)) else [self.summary]
        return "<br>".join(html.escape(str(line)) for line in lines)

    def _repr_html_(self) -> str:
        return (f'<div class="gxpo-folded">{self._summary_html()}'
                f'<details><summary>{html.escape(self.label)}</summary>{self.full_html}</details></div>')

    def __repr__(self) -> str:
        summary = self.summary.to_string(index=False) if hasattr(self.summary, "to_string") else \
            "\n".join(map(str, self.summary if isinstance(self.summary, (list, tuple)) else [self.summary]))
        return f"{summary}\n[{self.label}]"


def fold_table(table, summary: Any = None, label: str | None = None, max_lines: int = MAX_LINES) -> Folded:
    """`table` (a DataFrame) folded: `summary` (a string, up to `max_lines` strings, or a small DataFrame;
    default: the table's first rows) shown, the whole table behind ``<details>``. Display it."""
    rows, cols = table.shape
    if summary is None:
        summary = table.head(max_lines)
    elif isinstance(summary, (list, tuple)) and len(summary) > max_lines:
        raise ValueError(f"summary has {len(summary)} lines: allowed at most {max_lines}")
    elif hasattr(summary, "shape") and len(summary) > max_lines:
        raise ValueError(f"summary has {len(summary)} rows: allowed at most {max_lines}")
    label = label or f"the full table ({rows} rows × {cols} columns)"
    return Folded(summary, table.to_html(index=False, na_rep="-"), table.to_string(index=False), label)


def fold_lines(lines: Sequence[str], summary: Any = None, label: str | None = None,
               max_lines: int = MAX_LINES) -> Folded:
    """Printed lines folded the same way: `summary` (default: the first `max_lines` lines) shown, every
    line behind ``<details>``."""
    lines = [str(line) for line in lines]
    if summary is None:
        summary = lines[:max_lines]
    label = label or f"all {len(lines)} lines"
    body = "<pre>" + html.escape("\n".join(lines)) + "</pre>"
    return Folded(summary, body, "\n".join(lines), label)
