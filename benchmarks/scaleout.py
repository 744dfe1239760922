"""
Scale-out on this machine: ingest with 1 and 2 service processes (8
connections split between them, each process with default options and its
own pool), and worker drain with 1 and 3 worker processes.  Runs alternate
(1, 2, 1, 2, ...) and each ratio is taken within a run.

With 2 cores, the services, their PostgreSQL backends and the clients share
the same CPUs: the notes give how busy the machine was, which says whether
more processes could help at all.
"""

from __future__ import annotations

from typing import Any

from benchmarks.database import freshDatabase
from benchmarks.drain import txDrain
from benchmarks.figures import Figure
from benchmarks.processes import Client, CpuMeter, Twistd
from benchmarks.scenario import Settings, storedJobs, workerUnavailable

#: The name of this scenario for C{--only}.
NAME = "scaleout"


def ingestWith(processes: int, count: int, connections: int = 8) -> dict[str, Any]:
    """
    One run of ingest through C{processes} services on one database.

    @return: The client's result with C{rate}, C{stored} and C{cpu}.
    """
    with freshDatabase() as dsn:
        services = [Twistd(dsn, "--ack") for _ in range(processes)]
        try:
            for service in services:
                service.start()
            for service in services:
                service.waitReady()
            client = Client(
                "tx-send",
                {
                    "ports": [s.port for s in services],
                    "connections": connections,
                    "count": count,
                },
            )
            try:
                client.start()
                meter = CpuMeter({f"service{i}": s.pid for i, s in enumerate(services)})
                client.go()
                result = client.result()
                result["cpu"] = meter.read()
            finally:
                client.kill()
            result["stored"] = storedJobs(dsn)
        finally:
            for service in services:
                service.stop()
    result["rate"] = result["acked"] / result["seconds"]
    return result


def _busy(runs: list[dict[str, Any]]) -> str:
    cpu = runs[-1]["cpu"]
    processes = ", ".join(
        f"{label} {share:.0%}" for label, share in cpu.items() if label != "machine"
    )
    return f"machine {cpu['machine']:.0%} busy ({processes} of a core)"


def run(settings: Settings) -> list[Figure]:
    """
    Measure both, alternating process counts.

    @return: The figures.
    """
    count = settings.size(200_000, 20_000)
    jobs = settings.size(50_000, 5_000)
    ingestOne = Figure(NAME, "ingest, 1 service process", "lines/s")
    ingestTwo = Figure(
        NAME, "ingest, 2 service processes", "lines/s", baseline="1 process"
    )
    drainOne = Figure(NAME, "drain, 1 worker process", "jobs/s")
    drainThree = Figure(
        NAME, "drain, 3 worker processes", "jobs/s", baseline="1 process"
    )
    unavailable = workerUnavailable()
    if unavailable:
        drainOne.skipped = drainThree.skipped = f"skipped: {unavailable}"

    for _ in range(settings.runs):
        one = ingestWith(1, count)
        two = ingestWith(2, count)
        ingestOne.samples.append(one["rate"])
        ingestTwo.samples.append(two["rate"])
        ingestTwo.ratios.append(two["rate"] / one["rate"])
        ingestOne.extra.setdefault("runs", []).append(one)
        ingestTwo.extra.setdefault("runs", []).append(two)
        if not unavailable:
            single = txDrain(jobs, workers=1)
            triple = txDrain(jobs, workers=3)
            drainOne.samples.append(single["rate"])
            drainThree.samples.append(triple["rate"])
            drainThree.ratios.append(triple["rate"] / single["rate"])
            drainOne.extra.setdefault("runs", []).append(single)
            drainThree.extra.setdefault("runs", []).append(triple)

    ingestOne.notes = f"{count:,} lines over 8 connections, --ack; " + _busy(
        ingestOne.extra["runs"]
    )
    ingestTwo.notes = "4 connections to each process; " + _busy(ingestTwo.extra["runs"])
    if not unavailable:
        drainOne.notes = f"{jobs:,} jobs; " + _busy(drainOne.extra["runs"])
        drainThree.notes = (
            "same settings as the drain scenario in each process; "
            + _busy(drainThree.extra["runs"])
        )
    return [ingestOne, ingestTwo, drainOne, drainThree]
