"""What every part of the report writes its Markdown tables with: numbers as cells (`fmt`, `mean_std`, `median`)
and text as a cell (`table_cell`)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import numpy as np


def fmt(value: float | None, digits: int = 2, scale: float = 1.0, sign: bool = False) -> str:
    """`value` × `scale` with `digits` decimals (and its sign when `sign`); "–" when missing or not finite."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value * scale:{'+' if sign else ''}.{digits}f}"


def mean_std(values: Iterable[float | None], scale: float = 1.0, digits: int = 1, show_n: bool = True) -> str:
    """ "mean ± std" of the values present (× `scale`); one value alone is shown as itself, marked "(n=1)" when
    `show_n`; "–" when none."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}" + (" (n=1)" if show_n else "")
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def table_cell(text: str) -> str:
    """Text as one Markdown table cell: a literal | (e.g. mean|W*G|) would otherwise start a new column."""
    return text.replace("|", "\\|")
