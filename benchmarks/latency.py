"""
Latency at a steady 1,000 lines/s: line sent to ack received (at the
client), and row inserted to handler started (in a worker process).

One client sends lines on one connection on a fixed schedule to a service
with C{--ack}; a separate worker process (C{--no-ingest}, NOTIFY on) runs a
no-op handler that notes when each job starts.  "Inserted" is the row's
C{created_at}, the start of the transaction that inserted it (PostgreSQL's
C{now()}, on the same clock as the handler's C{time.time()}), so the second
figure also covers the INSERT itself and its commit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from benchmarks.database import SCHEMA, connect, freshDatabase
from benchmarks.drain import txWorkerOptions
from benchmarks.figures import Figure, Target
from benchmarks.nooptasks import LATENCY_FILE_VARIABLE
from benchmarks.processes import Client, Twistd, runClients
from benchmarks.scenario import (
    Settings,
    running,
    temporaryPath,
    unfinishedJobs,
    waitUntil,
    workerUnavailable,
)

#: The name of this scenario for C{--only}.
NAME = "latency"

#: Lines per second.
RATE = 1000.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """
    The nearest-rank percentile.

    @param values: Not empty.
    @param fraction: 0.5 for the median, 0.99 for p99, 1.0 for the maximum.
    @return: The smallest value with at least C{fraction} of all values at
        or below it.
    """
    ordered = sorted(values)
    rank = max(1, -(-int(round(fraction * len(ordered) * 1000)) // 1000))
    return ordered[min(rank, len(ordered)) - 1]


def handlerStarts(dsn: str, path: str) -> list[float]:
    """
    Pair each handler start noted in C{path} with its row's C{created_at}.

    @return: Seconds from insert to handler start, one per job (the first
        start of each job).
    """
    starts: dict[int, float] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            jobId, when = line.split()
            starts.setdefault(int(jobId), float(when))
    connection = connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, extract(epoch FROM created_at)::float8 FROM {SCHEMA}.jobs"
            )
            created = dict(cursor.fetchall())
    finally:
        connection.close()
    return [
        start - created[jobId] for jobId, start in starts.items() if jobId in created
    ]


def measure(count: int, withWorker: bool) -> dict[str, Any]:
    """
    One run: a service, a worker if available, and the paced client.

    @return: The client's result (C{latencies} in seconds, counts) and
        C{handlerLatencies} (seconds; empty without a worker).
    """
    path = temporaryPath(".starts")
    try:
        with freshDatabase() as dsn, running(Twistd(dsn, "--ack")) as service:
            worker = Twistd(
                dsn,
                *txWorkerOptions(),
                listen=False,
                environment={LATENCY_FILE_VARIABLE: path},
            )
            with (
                running(worker, "listening for new jobs")
                if withWorker
                else nullcontext()
            ):
                (result,) = runClients(
                    [
                        Client(
                            "paced",
                            {"port": service.port, "rate": RATE, "count": count},
                        )
                    ]
                )
                if withWorker:
                    waitUntil(lambda: unfinishedJobs(dsn) == 0, 60)
            result["handlerLatencies"] = handlerStarts(dsn, path) if withWorker else []
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return result


def run(settings: Settings) -> list[Figure]:
    """
    Measure, C{runs} times.

    @return: The figures: p50, p99 and max of both latencies, in ms.
    """
    count = settings.size(10_000, 2_000)
    unavailable = workerUnavailable()
    names = [("p50", 0.5), ("p99", 0.99), ("max", 1.0)]
    ack = {n: Figure(NAME, f"line sent -> ack, {n}", "ms") for n, _ in names}
    ack["p99"].target = Target("value", False, 10.0)
    handler = {n: Figure(NAME, f"insert -> handler start, {n}", "ms") for n, _ in names}
    handler["p50"].target = Target("value", False, 3.0)
    if unavailable:
        for figure in handler.values():
            figure.skipped = f"skipped: {unavailable}"

    lost = 0
    for _ in range(settings.runs):
        result = measure(count, withWorker=not unavailable)
        lost += count - result["acked"]
        for name, fraction in names:
            ack[name].samples.append(1000 * percentile(result["latencies"], fraction))
            if result["handlerLatencies"]:
                handler[name].samples.append(
                    1000 * percentile(result["handlerLatencies"], fraction)
                )
        ack["p50"].extra.setdefault("runs", []).append(
            {k: v for k, v in result.items() if not k.endswith("atencies")}
            | {"handled": len(result["handlerLatencies"])}
        )

    ack["p50"].notes = (
        f"{count:,} lines at {RATE:,.0f}/s on one connection, --ack, default"
        f" options; ack received minus the line's send; {lost} lines unacked"
    )
    handler["p50"].notes = (
        "worker in its own process (--no-ingest, NOTIFY on,"
        f" --concurrency {txWorkerOptions()[-1].split('=')[1]}, async no-op handler);"
        " handler start minus the row's created_at (the inserting transaction's"
        " start)"
    )
    return [*ack.values(), *handler.values()]
