"""The output: the rows as a plain-text or Markdown table, and the machine's load."""
from __future__ import annotations

import os

from .common import Row


HEADER = ("benchmark", "result", "goal", "met?")


def cells(row: Row) -> tuple[str, str, str, str]:
    return row.benchmark, row.result, row.goal, row.met


def plain_table(rows: list[Row]) -> str:
    table = [HEADER] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*table[0]), "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt.format(*line) for line in table[1:]])


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows])


def machine() -> str:
    """The load averages (1, 5, 15 min): another job on the machine shows here."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
