"""
Ingest throughput: NDJSON lines over 1 and over 8 connections with C{--ack},
from the first byte sent to the last ack received, against the ceiling (the
same rows loaded with one C{COPY} stream into the same migrated table) and
against pgqueuer's batched enqueue of the same payloads.

One run is C{tx 1 connection, tx 8 connections, COPY, pgqueuer}, each in a
fresh database; runs repeat that sequence, so every ratio is taken between
measurements made minutes apart at most.
"""

from __future__ import annotations

from typing import Any

from benchmarks.database import freshDatabase
from benchmarks.figures import Figure, Target
from benchmarks.processes import Client, CpuMeter, Twistd, runClients
from benchmarks.scenario import Settings, migrate, running, storedJobs

#: The name of this scenario for C{--only}.
NAME = "ingest"

#: The batch size of pgqueuer's enqueue.
PGQUEUER_BATCH = 1000


def txIngest(count: int, connections: int) -> dict[str, Any]:
    """
    One run of tx_ingest: a fresh database, a service with default options
    and C{--ack}, one client process sending C{count} lines.

    @return: The client's result, with C{rate}, C{stored} and C{cpu}.
    """
    with freshDatabase() as dsn, running(Twistd(dsn, "--ack")) as service:
        client = Client(
            "tx-send",
            {"ports": [service.port], "connections": connections, "count": count},
        )
        client.start()
        meter = CpuMeter({"service": service.pid})
        client.go()
        result = client.result()
        result["cpu"] = meter.read()
        result["stored"] = storedJobs(dsn)
    result["rate"] = result["acked"] / result["seconds"]
    return result


def copyCeiling(count: int) -> dict[str, Any]:
    """
    One run of the ceiling: C{COPY} into a freshly migrated jobs table.

    @return: The client's result, with C{rate} and C{stored}.
    """
    with freshDatabase() as dsn:
        migrate(dsn)
        (result,) = runClients([Client("copy", {"dsn": dsn, "count": count})])
        result["stored"] = storedJobs(dsn)
    result["rate"] = result["lines"] / result["seconds"]
    return result


def pgqueuerEnqueue(count: int) -> dict[str, Any]:
    """
    One run of pgqueuer's batched enqueue into a fresh installation.

    @return: The client's result, with C{rate}.
    """
    with freshDatabase() as dsn:
        runClients([Client("pgqueuer-install", {"dsn": dsn})])
        (result,) = runClients(
            [
                Client(
                    "pgqueuer-enqueue",
                    {"dsn": dsn, "count": count, "batch": PGQUEUER_BATCH},
                )
            ]
        )
    result["rate"] = result["lines"] / result["seconds"]
    return result


def run(settings: Settings) -> list[Figure]:
    """
    Measure, interleaving the four systems run after run.

    @return: The figures.
    """
    count = settings.size(200_000, 20_000)
    one = Figure(NAME, "tx_ingest, 1 connection", "lines/s", baseline="COPY")
    one.target = Target("ratio", True, 0.5)
    eight = Figure(NAME, "tx_ingest, 8 connections", "lines/s", baseline="COPY")
    eight.target = Target("ratio", True, 1.0)
    eightPeer = Figure(NAME, "tx_ingest, 8 connections", "lines/s", baseline="pgqueuer")
    eightPeer.target = Target("ratio", True, 4.0)
    onePeer = Figure(NAME, "tx_ingest, 1 connection", "lines/s", baseline="pgqueuer")
    ceiling = Figure(NAME, "COPY ceiling (1 stream)", "rows/s")
    peer = Figure(NAME, f"pgqueuer enqueue (batches of {PGQUEUER_BATCH})", "jobs/s")
    lost = 0

    for _ in range(settings.runs):
        resultOne = txIngest(count, 1)
        resultEight = txIngest(count, 8)
        resultCopy = copyCeiling(count)
        resultPeer = pgqueuerEnqueue(count)
        for figure, result in (
            (one, resultOne),
            (eight, resultEight),
            (ceiling, resultCopy),
            (peer, resultPeer),
        ):
            figure.samples.append(result["rate"])
            figure.extra.setdefault("runs", []).append(result)
        for result in (resultOne, resultEight):
            lost += count - min(result["acked"], result["stored"])
        one.ratios.append(resultOne["rate"] / resultCopy["rate"])
        eight.ratios.append(resultEight["rate"] / resultCopy["rate"])
        eightPeer.samples.append(resultEight["rate"])
        eightPeer.ratios.append(resultEight["rate"] / resultPeer["rate"])
        onePeer.samples.append(resultOne["rate"])
        onePeer.ratios.append(resultOne["rate"] / resultPeer["rate"])

    cpu = eight.extra["runs"][-1]["cpu"]
    eight.notes = (
        f"{count:,} lines of ~105 bytes, default options (batch 1000, pool 4),"
        f" --ack; first byte sent to last ack; {lost} lines lost over all runs;"
        f" last run: machine {cpu['machine']:.0%} busy, service"
        f" {cpu['service']:.0%} of a core, client"
        f" {eight.extra['runs'][-1]['clientCpu']:.0%}"
    )
    peer.notes = (
        "Queries.enqueue with lists, one asyncpg connection, batches sent one"
        " after another, durability 'durable' (logged tables, the default)"
    )
    ceiling.notes = (
        "psycopg2 copy_expert, COPY jobs (job_type, payload) FROM STDIN, one"
        " stream and one transaction, same indexes as tx_ingest's table"
    )
    return [one, eight, eightPeer, onePeer, ceiling, peer]
