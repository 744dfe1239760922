"""
Memory under overload: the service's peak resident memory while 50 clients
flood it and the jobs table is locked (so nothing can be written), against
the README's bound; then the time to drain once the lock is released, and a
check that every line sent was acked and stored.

The service runs with its default options (plus C{--ack}).  Its C{VmRSS} is
sampled from C{/proc} every 50 ms before the flood (the baseline) and until
every client is done; C{VmHWM} (the kernel's high-water mark) is read at the
end.  Growth is the peak minus the baseline.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.database import SCHEMA, connect, freshDatabase
from benchmarks.figures import Figure, Target
from benchmarks.payloads import payloadLines, splitEvenly
from benchmarks.processes import Client, Twistd, memoryOf
from benchmarks.scenario import Settings, running, storedJobs

#: The name of this scenario for C{--only}.
NAME = "overload"

#: Connections flooding the service, and the processes they are spread over.
CONNECTIONS = 50
CLIENT_PROCESSES = 5

#: The service's defaults (see the README's options table).
QUEUE_SIZE = 1024
BATCH_SIZE = 1000
POOL_SIZE = 4
MAX_LINE_BYTES = 8192
MAX_CONNECTIONS = 100


def readmeBound(lineBytes: float, connections: int) -> float:
    """
    The README's memory bound for messages::

        (Q + 3 x P x min(B, Q)) x (L + 100) + C x (128 KiB + 2 x L)

    @param lineBytes: L: the longest line (C{--max-line-bytes}), or the
        size of the lines actually sent.
    @param connections: C: the clients connected.
    @return: Bytes.
    """
    lines = QUEUE_SIZE + 3 * POOL_SIZE * min(BATCH_SIZE, QUEUE_SIZE)
    return lines * (lineBytes + 100) + connections * (128 * 1024 + 2 * lineBytes)


def measure(count: int, lockSeconds: float) -> dict[str, Any]:
    """
    One run.

    @return: C{baseline}, C{peak} (bytes), C{drainSeconds}, and the counts
        C{sent}, C{acked}, C{stored}, C{rejected}.
    """
    with freshDatabase() as dsn, running(Twistd(dsn, "--ack")) as service:
        time.sleep(0.5)
        baseline = max(memoryOf(service.pid)["VmRSS"] for _ in range(3))
        clients = [
            Client(
                "tx-send",
                {
                    "ports": [service.port],
                    "connections": CONNECTIONS // CLIENT_PROCESSES,
                    "count": size,
                    "first": first,
                },
            )
            for first, size in splitEvenly(count, CLIENT_PROCESSES)
        ]
        locker = connect(dsn, autocommit=False)
        samples: list[int] = []
        try:
            with locker.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {SCHEMA}.jobs IN ACCESS EXCLUSIVE MODE")
            for client in clients:
                client.start()
            for client in clients:
                client.go()
            until = time.monotonic() + lockSeconds
            while time.monotonic() < until:
                samples.append(memoryOf(service.pid)["VmRSS"])
                time.sleep(0.05)
        finally:
            locker.rollback()
            released = time.time()
            locker.close()
        try:
            while any(
                c.process is not None and c.process.poll() is None for c in clients
            ):
                samples.append(memoryOf(service.pid)["VmRSS"])
                time.sleep(0.05)
            results = [client.result() for client in clients]
        finally:
            for client in clients:
                client.kill()
        memory = memoryOf(service.pid)
        stored = storedJobs(dsn)
    lastAck = max(r["lastAck"] or time.time() for r in results)
    return {
        "baseline": baseline,
        "peakSampled": max(samples),
        "peak": max(max(samples), memory["VmHWM"]),
        "drainSeconds": lastAck - released,
        "lines": count,
        "sent": sum(r["sent"] for r in results),
        "acked": sum(r["acked"] for r in results),
        "rejected": sum(r["rejected"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "stored": stored,
    }


def run(settings: Settings) -> list[Figure]:
    """
    Measure, C{runs} times.

    @return: The figures: RSS growth (MB), peak RSS, time to drain, lost
        lines.
    """
    count = settings.size(200_000, 20_000)
    lockSeconds = 3.0 if settings.quick else 20.0
    lineBytes = sum(len(line) + 1 for line in payloadLines(1000)) / 1000
    bound = readmeBound(lineBytes, CONNECTIONS)
    worst = readmeBound(MAX_LINE_BYTES, MAX_CONNECTIONS)
    limit = min(bound, 32 * 2**20)

    growth = Figure(NAME, "RSS growth under flood + lock", "MB")
    growth.target = Target("value", False, round(limit / 1e6, 1))
    peak = Figure(NAME, "peak RSS (VmHWM)", "MB")
    drain = Figure(NAME, "drain after lock release", "s")
    lost = Figure(NAME, "lines lost (sent - stored)", "lines")
    lost.target = Target("value", False, 0)

    for _ in range(settings.runs):
        result = measure(count, lockSeconds)
        growth.samples.append((result["peak"] - result["baseline"]) / 1e6)
        peak.samples.append(result["peak"] / 1e6)
        drain.samples.append(result["drainSeconds"])
        lost.samples.append(result["lines"] - min(result["acked"], result["stored"]))
        growth.extra.setdefault("runs", []).append(result)

    growth.notes = (
        f"{CONNECTIONS} connections ({CLIENT_PROCESSES} client processes) send"
        f" {count:,} lines of ~{lineBytes:.0f} bytes while another session holds"
        f" LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE for {lockSeconds:g} s;"
        " default options, --ack. README bound with these line sizes and"
        f" {CONNECTIONS} clients: {bound / 1e6:.1f} MB; with the defaults' worst"
        f" case (8 KiB lines, 100 clients): {worst / 1e6:.0f} MB; target: the"
        " smaller of the first bound and 32 MB"
    )
    drain.notes = "lock released (ROLLBACK) to the last ack received by any client"
    return [growth, peak, drain, lost]
