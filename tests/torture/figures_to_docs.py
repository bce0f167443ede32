"""Write the figures of a long-tier run into ``docs/reliability.md``.

Usage (after ``MAPPINGSTORE_TORTURE_REPORT=torture.json python -m pytest -m torture``)::

    python tests/torture/figures_to_docs.py torture.json docs/reliability.md

Every ``<!-- figures: TEST_FUNCTION -->`` ... ``<!-- /figures -->`` block of the page is
replaced by a table of the figures that test recorded: one row per backend (and variant
or mode), one column per figure, in the order the test recorded them. Figures split by
mechanism are shown as the test's total (``mechanism="both"``).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

_BLOCK = re.compile(r"(<!-- figures: (\w+) -->\n).*?(<!-- /figures -->)", re.S)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def tables(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Markdown table per test function name."""
    grouped: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("mechanism") not in (None, "both"):
            continue
        function = row["test"].partition("::")[2].split("[")[0]
        label = str(row.get("backend") or "")
        if "variant" in row:
            label += f" ({row['variant']})"
        if "mode" in row:
            label += f" ({row['mode']})"
        cells = grouped.setdefault(function, {}).setdefault(label or "all", {})
        cells[row["what"]] = row["value"]
    out: dict[str, str] = {}
    for function, by_label in grouped.items():
        columns: list[str] = []
        for cells in by_label.values():
            columns += [w for w in cells if w not in columns]
        lines = [
            "| " + " | ".join(["backend", *columns]) + " |",
            "|" + "---|" * (len(columns) + 1),
        ]
        for label, cells in by_label.items():
            values = [_fmt(cells[c]) if c in cells else "" for c in columns]
            lines.append("| " + " | ".join([label, *values]) + " |")
        out[function] = "\n".join(lines) + "\n"
    return out


def main(report: str, page: str) -> None:
    with open(report, encoding="utf-8") as fh:
        made = tables(json.load(fh))
    with open(page, encoding="utf-8") as fh:
        text = fh.read()
    missing: list[str] = []

    def fill(match: re.Match[str]) -> str:
        table = made.get(match.group(2))
        if table is None:
            missing.append(match.group(2))
            return match.group(0)
        return f"{match.group(1)}\n{table}\n{match.group(3)}"

    text = _BLOCK.sub(fill, text)
    with open(page, "w", encoding="utf-8") as fh:
        fh.write(text)
    if missing:
        sys.exit(f"no figures in {report} for: {', '.join(missing)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
