"""
A tasks module for the worker's tests: C{--tasks tests.tasksample} registers
these handlers in L{tx_ingest.tasks.defaultRegistry}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import deferLater

from tx_ingest import JobContext, task


@task("noop")
async def noop(payload: Any, job: JobContext) -> None:
    """
    Do nothing: a job that ends at once.
    """


@task("slow", maxAttempts=10)
async def slow(payload: Any, job: JobContext) -> None:
    """
    Take C{payload["seconds"]} seconds (default 5 ms) on the reactor.
    """
    from twisted.internet import reactor

    await deferLater(reactor, float(payload.get("seconds", 0.005)), lambda: None)


@task("broken", maxAttempts=2)
def broken(payload: Any, job: JobContext) -> None:
    """
    Fail every time, in a thread.
    """
    raise RuntimeError(f"job {job.jobId} is broken")
