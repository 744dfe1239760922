"""
The tasks module the benchmark workers run: C{twistd -n ingest --no-ingest
--tasks benchmarks.nooptasks}.

One no-op handler for the job type C{default}.  It notes the wall-clock time
it first ran in the file named by C{TX_INGEST_BENCH_MARK_FILE}, and, when
C{TX_INGEST_BENCH_LATENCY_FILE} is set, appends C{"<job id> <time>"} for
every job it starts (for the insert-to-handler latency).
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

from tx_ingest import task

#: The environment variable naming the first-start file.
MARK_FILE_VARIABLE = "TX_INGEST_BENCH_MARK_FILE"

#: The environment variable naming the per-job start file.
LATENCY_FILE_VARIABLE = "TX_INGEST_BENCH_LATENCY_FILE"

_markFile = os.environ.get(MARK_FILE_VARIABLE)
_latencyPath = os.environ.get(LATENCY_FILE_VARIABLE)
_latencyFile: IO[str] | None = (
    open(_latencyPath, "a", encoding="ascii") if _latencyPath else None
)


def jobId(job: Any) -> object:
    """
    @param job: The L{tx_ingest.tasks.JobContext} a handler was given.
    @return: The job's id.
    """
    return getattr(job, "jobId", None)


@task("default")
async def noop(payload: Any, job: Any) -> None:
    """
    Do nothing, noting when.  An C{async def}, so that the worker runs it on
    the reactor thread instead of handing it to its thread pool.

    @param payload: The job's payload.
    @param job: The job.
    """
    global _markFile
    if _latencyFile is not None:
        _latencyFile.write(f"{jobId(job)} {time.time()!r}\n")
        _latencyFile.flush()
    if _markFile is not None:
        with open(_markFile, "w", encoding="ascii") as f:
            f.write(repr(time.time()))
        _markFile = None
