"""
Run the benchmark suite: C{python -m benchmarks [--quick] [--only NAMES]
[--runs N]}.

Prints a table (scenario, median, min-max, ratio to the baseline measured in
the same runs, target, met?) and writes it as C{benchmarks/latest.json} and
as Markdown, with the machine it ran on, to C{benchmarks/latest.md}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from twisted.python import usage

from benchmarks import drain, ingest, latency, overload, scaleout
from benchmarks.database import dropLeftovers
from benchmarks.figures import Figure, markdownTable, notesMarkdown, textTable
from benchmarks.machine import describe
from benchmarks.scenario import Settings

#: Every scenario, in the order they run, by C{--only} name.
SCENARIOS: dict[str, Callable[[Settings], list[Figure]]] = {
    ingest.NAME: ingest.run,
    drain.NAME: drain.run,
    latency.NAME: latency.run,
    overload.NAME: overload.run,
    scaleout.NAME: scaleout.run,
}

#: Where the reports go.
OUTPUT_DIRECTORY = os.path.dirname(os.path.abspath(__file__))

#: The command that reproduces a full run.
COMMAND = "pip install -e '.[bench]' && python -m benchmarks"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r} is not a whole number of at least 1")
    return number


_positive.coerceDoc = "Must be a whole number of at least 1."  # type: ignore[attr-defined]


def _scenarioNames(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise ValueError(
            f"unknown scenario {', '.join(unknown) or value!r};"
            f" choose from {', '.join(SCENARIOS)}"
        )
    return names


_scenarioNames.coerceDoc = f"Comma-separated, from: {', '.join(SCENARIOS)}."  # type: ignore[attr-defined]


class Options(usage.Options):
    """
    The command line of C{python -m benchmarks}.
    """

    synopsis = "Usage: python -m benchmarks [--quick] [--only NAMES] [--runs N]"
    optFlags = [
        ["quick", "q", "Small sizes and one run: a smoke test (under 3 minutes)."],
    ]
    optParameters = [
        ["only", None, list(SCENARIOS), "Run only these scenarios.", _scenarioNames],
        ["runs", None, 3, "Interleaved runs of each system (--quick: 1).", _positive],
    ]

    def opt_runs(self, value: str) -> None:
        """
        Interleaved runs of each system (default 3; --quick makes it 1).
        """
        try:
            self["runs"] = _positive(value)
        except ValueError as e:
            raise usage.UsageError(f"--runs: {e}")
        self["runsGiven"] = True


def writeReports(
    figures: Sequence[Figure],
    machine: dict[str, str],
    settings: Settings,
    seconds: float,
) -> tuple[str, str]:
    """
    Write C{latest.json} and C{latest.md}.

    @return: Their paths.
    """
    command = "python -m benchmarks" + (" --quick" if settings.quick else "")
    jsonPath = os.path.join(OUTPUT_DIRECTORY, "latest.json")
    with open(jsonPath, "w", encoding="utf-8") as f:
        json.dump(
            {
                "machine": machine,
                "command": command,
                "runs": settings.runs,
                "quick": settings.quick,
                "seconds": round(seconds, 1),
                "figures": [figure.asJson() for figure in figures],
            },
            f,
            indent=1,
        )
        f.write("\n")

    markdownPath = os.path.join(OUTPUT_DIRECTORY, "latest.md")
    notes = notesMarkdown(figures)
    with open(markdownPath, "w", encoding="utf-8") as f:
        f.write(
            f"Measured {machine['date']} on {machine['cpu']}, {machine['cores']}"
            f" cores, {machine['ram']} RAM; {machine['postgresql']} (default"
            f" settings); Python {machine['python']}, Twisted {machine['twisted']},"
            f" pgqueuer {machine['pgqueuer']} (asyncpg {machine['asyncpg']})."
            f" Medians of {settings.runs} interleaved run(s), each in a fresh"
            f" database; reproduce with `{COMMAND}`"
            f"{' (this was a --quick run)' if settings.quick else ''}.\n\n"
        )
        f.write(markdownTable(figures) + "\n")
        if notes:
            f.write("\n" + notes + "\n")
    return jsonPath, markdownPath


def main(argv: Sequence[str]) -> int:
    """
    Parse the command line, run the scenarios and report.

    @return: The exit status: 0, or 64 for a usage error, 1 if a scenario
        crashed.
    """
    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"{options.synopsis}\n{e}\n")
        return 64
    runs = options["runs"]
    if options["quick"] and not options.get("runsGiven"):
        runs = 1
    settings = Settings(runs=runs, quick=options["quick"])

    dropped = dropLeftovers()
    if dropped:
        sys.stderr.write(f"dropped {len(dropped)} databases left by an earlier run\n")
    machine = describe()
    started = time.monotonic()
    figures: list[Figure] = []
    crashed = False
    for name in options["only"]:
        sys.stderr.write(f"[{time.monotonic() - started:6.1f}s] {name}...\n")
        try:
            found = SCENARIOS[name](settings)
        except Exception:
            crashed = True
            traceback.print_exc()
            found = [Figure(name, "(scenario)", "", skipped="crashed: see stderr")]
        figures.extend(found)
        sys.stderr.write(textTable(found) + "\n")
    seconds = time.monotonic() - started

    print(textTable(figures))
    jsonPath, markdownPath = writeReports(figures, machine, settings, seconds)
    print(f"\n{seconds:.0f}s; wrote {jsonPath} and {markdownPath}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
