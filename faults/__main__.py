"""
Run the long fault scenarios against real C{twistd -n ingest} processes and
print one row per scenario, then a summary table.

    $ python -m faults            # 100,000 lines per streaming scenario
    $ python -m faults --quick    # smaller, a couple of minutes
    $ python -m faults --only restart-dedupe --only kill

Run it from the repository's top directory (it uses the helpers in
C{tests/}).  The exit status is 1 if any acked line was lost, 2 if another
check of a scenario failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from faults import FULL, QUICK, SCENARIOS, Outcome, workerAvailable

_COLUMNS = ("scenario", "sent", "acked", "stored", "lost", "duplicates", "seconds")


def formatRow(outcome: Outcome) -> str:
    """
    One table row for an outcome.
    """
    status = "ok" if not outcome.problems and not outcome.lost else "FAIL"
    return (
        f"{outcome.scenario:<32} {outcome.sent:>8} {outcome.acked:>8} "
        f"{outcome.stored:>8} {outcome.lost:>6} {outcome.duplicates:>10} "
        f"{outcome.seconds:>8.1f}  {status}"
    )


def header() -> str:
    """
    The table's header line.
    """
    name, *numbers = _COLUMNS
    widths = (8, 8, 8, 6, 10, 8)
    return f"{name:<32} " + " ".join(
        f"{column:>{width}}" for column, width in zip(numbers, widths, strict=True)
    )


async def runAll(names: list[str], quick: bool) -> int:
    """
    Run the named scenarios one after another.

    @return: The exit status.
    """
    scale = QUICK if quick else FULL
    outcomes: list[Outcome] = []
    print(header(), flush=True)
    for name in names:
        outcome = await SCENARIOS[name](scale)
        outcomes.append(outcome)
        print(formatRow(outcome), flush=True)
        for problem in outcome.problems:
            print(f"    problem: {problem}", flush=True)
        if outcome.details:
            details = ", ".join(f"{k}={v}" for k, v in outcome.details.items())
            print(f"    {details}", flush=True)
    whyNoWorker = workerAvailable()
    print()
    print("summary" + (" (--quick)" if quick else ""))
    print(header())
    for outcome in outcomes:
        print(formatRow(outcome))
    if whyNoWorker is not None and "worker-kill" not in SCENARIOS:
        print(f"{'worker SIGKILLed mid-drain':<32} skipped: {whyNoWorker}")
    if any(outcome.lost for outcome in outcomes):
        return 1
    if any(outcome.problems for outcome in outcomes):
        return 2
    return 0


def main(reactor: Any, argv: list[str]) -> Deferred[None]:
    """
    Parse the arguments and run; exit with the status of L{runAll}.
    """
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller scenarios")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable)",
    )
    arguments = parser.parse_args(argv)
    names = arguments.only or list(SCENARIOS)

    async def run() -> None:
        status = await runAll(names, arguments.quick)
        if status:
            raise SystemExit(status)

    return Deferred.fromCoroutine(run())


if __name__ == "__main__":
    react(main, [sys.argv[1:]])
