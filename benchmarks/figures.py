"""
Figures: the samples of one measured quantity, their summary (median and
range), the ratio to a baseline measured in the same runs, and the target it
is held to; and the table, JSON and Markdown they are reported as.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Target:
    """
    A goal for a figure: its median value, or its median ratio to its
    baseline, compared with a bound.

    @ivar on: C{"value"} or C{"ratio"}.
    @ivar atLeast: C{True} for C{>=}, C{False} for C{<=}.
    @ivar bound: The bound.
    """

    on: str
    atLeast: bool
    bound: float

    def describe(self, unit: str) -> str:
        """
        @param unit: The figure's unit, shown after a value bound.
        @return: The target as text, for instance C{">= 1.0x"}.
        """
        sign = ">=" if self.atLeast else "<="
        if self.on == "ratio":
            return f"{sign} {self.bound:g}x"
        return f"{sign} {self.bound:g} {unit}"

    def met(self, figure: Figure) -> bool | None:
        """
        @return: Whether the figure's median meets the target, L{None} if it
            has no samples.
        """
        samples = figure.ratios if self.on == "ratio" else figure.samples
        if not samples:
            return None
        median = statistics.median(samples)
        return median >= self.bound if self.atLeast else median <= self.bound


@dataclass
class Figure:
    """
    One measured quantity of one scenario.

    @ivar scenario: The scenario's name (the C{--only} name).
    @ivar name: What was measured, for instance C{"tx_ingest, 8 connections"}.
    @ivar unit: Of the samples, for instance C{"lines/s"}.
    @ivar samples: One value per run.
    @ivar baseline: The name of the figure the ratio is taken to, if any.
    @ivar ratios: One ratio per run, each taken within that run.
    @ivar target: The goal, if any.
    @ivar skipped: Why there are no samples, if there are none.
    @ivar notes: Anything a reader needs to interpret the figure.
    @ivar extra: More per-run data for the JSON report.
    """

    scenario: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str | None = None
    ratios: list[float] = field(default_factory=list)
    target: Target | None = None
    skipped: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> tuple[float, float, float] | None:
        """
        @return: The median, minimum and maximum of the samples, or L{None}.
        """
        return _summary(self.samples)

    def ratioSummary(self) -> tuple[float, float, float] | None:
        """
        @return: The median, minimum and maximum of the ratios, or L{None}.
        """
        return _summary(self.ratios)

    def met(self) -> bool | None:
        """
        @return: Whether the target is met; L{None} without target or data.
        """
        return None if self.target is None else self.target.met(self)

    def asJson(self) -> dict[str, Any]:
        """
        @return: Everything, with the summaries, as JSON-ready data.
        """
        data = asdict(self)
        data["target"] = (
            None if self.target is None else self.target.describe(self.unit)
        )
        data["summary"] = self.summary()
        data["ratioSummary"] = self.ratioSummary()
        data["met"] = self.met()
        return data


def _summary(values: Sequence[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def formatNumber(value: float) -> str:
    """
    @return: C{value} with digits suited to its size.
    """
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def rows(figures: Sequence[Figure]) -> list[list[str]]:
    """
    The report's rows: scenario, figure, median, range, ratio, target, met.

    @return: One row of texts per figure.
    """
    table = []
    for figure in figures:
        summary = figure.summary()
        if summary is None:
            median = figure.skipped or "no data"
            spread = ""
        else:
            median = f"{formatNumber(summary[0])} {figure.unit}"
            spread = f"{formatNumber(summary[1])}–{formatNumber(summary[2])}"
        ratio = ""
        ratioSummary = figure.ratioSummary()
        if ratioSummary is not None and figure.baseline:
            ratio = (
                f"{ratioSummary[0]:.2f}x {figure.baseline}"
                f" ({ratioSummary[1]:.2f}–{ratioSummary[2]:.2f})"
            )
        target = "" if figure.target is None else figure.target.describe(figure.unit)
        met = {True: "yes", False: "NO", None: ""}[figure.met()]
        if figure.target is not None and figure.met() is None:
            met = "n/a"
        table.append([figure.scenario, figure.name, median, spread, ratio, target, met])
    return table


HEADERS = [
    "scenario",
    "figure",
    "median",
    "min–max",
    "ratio (min–max)",
    "target",
    "met?",
]


def textTable(figures: Sequence[Figure]) -> str:
    """
    @return: The figures as an aligned plain-text table.
    """
    table = [HEADERS, *rows(figures)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
    lines = []
    for index, row in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdownTable(figures: Sequence[Figure]) -> str:
    """
    @return: The figures as a Markdown table.
    """
    table = [HEADERS, *rows(figures)]
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in table[1:]:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def notesMarkdown(figures: Sequence[Figure]) -> str:
    """
    @return: Each figure's notes as a Markdown list (empty if none has any).
    """
    items = [
        f"- **{figure.scenario} / {figure.name}**: {figure.notes}"
        for figure in figures
        if figure.notes
    ]
    return "\n".join(items)
