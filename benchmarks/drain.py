"""
Worker throughput: draining pending jobs with a no-op handler, against
pgqueuer's worker draining as many with a no-op entrypoint.

Each run loads the jobs first (untimed: tx_ingest's with C{COPY}, pgqueuer's
with its batched enqueue), runs C{ANALYZE} on both so that neither claim
query is planned on an unanalysed table, then starts the worker.  The drain
is timed from the first handler call (noted by the handler) to the moment
the orchestrator, polling every 20 ms, sees no job left pending or running
(tx_ingest) or no row left in the queue table (pgqueuer).  Process start-up
and imports are excluded for both.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.clients import PGQUEUER_ENTRYPOINT
from benchmarks.database import analyze, copyJobs, freshDatabase, scalar
from benchmarks.figures import Figure, Target
from benchmarks.nooptasks import MARK_FILE_VARIABLE
from benchmarks.payloads import payloadLines
from benchmarks.processes import Client, CpuMeter, Twistd, runClients, stopClient
from benchmarks.scenario import (
    Settings,
    migrate,
    readMark,
    temporaryPath,
    unfinishedJobs,
    waitUntil,
    workerUnavailable,
)

#: The name of this scenario for C{--only}.
NAME = "drain"

#: tx_ingest worker: jobs claimed at once per process (also its claim
#: batch).  A sweep of 50,000 jobs here gave 8.3k jobs/s at 100, 14.6k at
#: 500 and 14.9k at 1000 (the default, 10, is meant for real handlers).
TX_CONCURRENCY = 500

#: pgqueuer worker: jobs per dequeue (C{QueueManager.run(batch_size=...)}).
#: A sweep of 50,000 jobs here gave 2.2k jobs/s at 10 (its default), 5.2k at
#: 100 and 5.0k at 500.
PGQUEUER_BATCH = 100

#: The most seconds a drain may take before the run is abandoned.
DRAIN_TIMEOUT = 300.0


def txWorkerOptions(concurrency: int = TX_CONCURRENCY) -> list[str]:
    """
    @return: The C{twistd ingest} options of a benchmark worker process.
    """
    return [
        "--no-ingest",
        "--tasks",
        "benchmarks.nooptasks",
        f"--concurrency={concurrency}",
    ]


def txDrain(
    count: int, workers: int = 1, concurrency: int = TX_CONCURRENCY
) -> dict[str, Any]:
    """
    One run of tx_ingest's worker: load C{count} jobs, start C{workers}
    worker processes, time the drain.

    @return: C{seconds}, C{rate}, C{done} (jobs marked done), C{cpu}.
    """
    marks = [temporaryPath(".mark") for _ in range(workers)]
    with freshDatabase() as dsn:
        migrate(dsn)
        copyJobs(dsn, payloadLines(count))
        analyze(dsn)
        processes = [
            Twistd(
                dsn,
                *txWorkerOptions(concurrency),
                listen=False,
                environment={MARK_FILE_VARIABLE: mark},
            )
            for mark in marks
        ]
        try:
            for process in processes:
                process.start()
            meter = CpuMeter({f"worker{i}": p.pid for i, p in enumerate(processes)})
            finished = waitUntil(lambda: unfinishedJobs(dsn) == 0, DRAIN_TIMEOUT)
            cpu = meter.read()
            done = int(
                scalar(
                    dsn,
                    "SELECT count(*) FROM tx_ingest.jobs WHERE status = 'done'",
                )
            )
        finally:
            for process in processes:
                process.stop()
    firsts = [t for t in (readMark(m) for m in marks) if t is not None]
    for mark in marks:
        if os.path.exists(mark):
            os.unlink(mark)
    seconds = finished - min(firsts)
    return {"seconds": seconds, "rate": count / seconds, "done": done, "cpu": cpu}


def pgqueuerDrain(count: int, workers: int = 1) -> dict[str, Any]:
    """
    One run of pgqueuer's worker: install, enqueue C{count} jobs, start
    C{workers} worker processes, time the drain.

    @return: C{seconds}, C{rate}, C{logged} (jobs in pgqueuer's log as
        successful).
    """
    marks = [temporaryPath(".mark") for _ in range(workers)]
    with freshDatabase() as dsn:
        runClients([Client("pgqueuer-install", {"dsn": dsn})])
        runClients(
            [Client("pgqueuer-enqueue", {"dsn": dsn, "count": count, "batch": 1000})]
        )
        analyze(dsn)
        clients = [
            Client(
                "pgqueuer-worker",
                {"dsn": dsn, "batchSize": PGQUEUER_BATCH, "markFile": mark},
            )
            for mark in marks
        ]
        try:
            for client in clients:
                client.start()
            meter = CpuMeter({f"worker{i}": c.pid for i, c in enumerate(clients)})
            for client in clients:
                client.go()
            finished = waitUntil(
                lambda: int(scalar(dsn, "SELECT count(*) FROM pgqueuer")) == 0,
                DRAIN_TIMEOUT,
            )
            cpu = meter.read()
        finally:
            for client in clients:
                stopClient(client)
        logged = int(
            scalar(
                dsn,
                "SELECT count(*) FROM pgqueuer_log"
                " WHERE status = 'successful' AND entrypoint = %s",
                (PGQUEUER_ENTRYPOINT,),
            )
        )
    firsts = [t for t in (readMark(m) for m in marks) if t is not None]
    for mark in marks:
        if os.path.exists(mark):
            os.unlink(mark)
    seconds = finished - min(firsts)
    return {"seconds": seconds, "rate": count / seconds, "logged": logged, "cpu": cpu}


def run(settings: Settings) -> list[Figure]:
    """
    Measure, interleaving the two workers run after run.

    @return: The figures.
    """
    count = settings.size(50_000, 5_000)
    tx = Figure(NAME, "tx_ingest worker", "jobs/s", baseline="pgqueuer")
    tx.target = Target("ratio", True, 3.0)
    peer = Figure(NAME, "pgqueuer worker", "jobs/s")
    unavailable = workerUnavailable()
    if unavailable:
        tx.skipped = f"skipped: {unavailable}"

    for _ in range(settings.runs):
        resultTx = None if unavailable else txDrain(count)
        resultPeer = pgqueuerDrain(count)
        peer.samples.append(resultPeer["rate"])
        peer.extra.setdefault("runs", []).append(resultPeer)
        if resultTx is not None:
            tx.samples.append(resultTx["rate"])
            tx.ratios.append(resultTx["rate"] / resultPeer["rate"])
            tx.extra.setdefault("runs", []).append(resultTx)

    tx.notes = (
        f"{count:,} pending jobs (loaded by COPY, then ANALYZE); one worker"
        f" process, --concurrency {TX_CONCURRENCY}, an async no-op handler (runs"
        " on the reactor thread), NOTIFY on, default poll interval; first"
        " handler call to no job pending or running; concurrency chosen by a"
        " sweep (100: 8.3k/s, 500: 14.6k/s, 1000: 14.9k/s)"
    )
    if tx.extra.get("runs"):
        done = [r["done"] for r in tx.extra["runs"]]
        tx.notes += f"; jobs marked done per run: {done}"
    peer.notes = (
        f"{count:,} jobs (enqueued in batches of 1000, then ANALYZE); one"
        f" QueueManager on one asyncpg connection, run(batch_size="
        f"{PGQUEUER_BATCH}, mode=continuous), async no-op entrypoint,"
        " durability 'durable'; first entrypoint call to an empty queue table;"
        " batch_size chosen by a sweep (10, the default: 2.2k/s, 100: 5.2k/s,"
        " 500: 5.0k/s)"
    )
    return [tx, peer]
