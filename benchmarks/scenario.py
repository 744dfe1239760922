"""
What every scenario shares: its settings, the check that the worker exists,
and the steps of a run (a migrated fresh database, a running service, a
drained queue).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from benchmarks.database import SCHEMA, scalar
from benchmarks.processes import (
    Client,
    Twistd,
    childEnvironment,
    runClients,
    twistdCommand,
)


@dataclass(frozen=True)
class Settings:
    """
    How big and how often.

    @ivar runs: Runs of each compared system, interleaved.
    @ivar quick: Small sizes, for smoke tests.
    """

    runs: int
    quick: bool

    def size(self, full: int, quick: int) -> int:
        """
        @return: C{quick} in quick mode, else C{full}.
        """
        return quick if self.quick else full


@lru_cache(maxsize=None)
def workerUnavailable() -> str | None:
    """
    Whether C{twistd ingest --no-ingest --tasks MODULE} can run here.

    @return: L{None} if it can, else why not.
    """
    try:
        from tx_ingest import task  # noqa: F401
    except ImportError as e:
        return f"worker unavailable (cannot import tx_ingest.task: {e})"
    completed = subprocess.run(
        [*twistdCommand(), "ingest", "--help"],
        capture_output=True,
        text=True,
        env=childEnvironment(),
        timeout=60,
    )
    for option in ("--no-ingest", "--tasks", "--concurrency"):
        if option not in completed.stdout:
            return f"worker unavailable (twistd ingest has no {option})"
    return None


def migrate(dsn: str) -> None:
    """
    Create tx_ingest's tables in a database, with the project's migrations,
    from a process of their own.
    """
    runClients([Client("migrate", {"dsn": dsn})])


@contextmanager
def running(service: Twistd, ready: str | None = "job store ready") -> Iterator[Twistd]:
    """
    Run a C{twistd} process for the duration of a C{with} block.

    @param service: Not yet started.
    @param ready: The log text to wait for, if any.
    @return: A context manager giving C{service}, started.
    """
    try:
        service.start()
        if ready is not None:
            service.waitFor(ready)
        yield service
    finally:
        service.stop()


def unfinishedJobs(dsn: str) -> int:
    """
    @return: The tx_ingest jobs still pending or running.
    """
    return int(
        scalar(
            dsn,
            f"SELECT count(*) FROM {SCHEMA}.jobs"
            " WHERE status IN ('pending', 'running')",
        )
    )


def storedJobs(dsn: str) -> int:
    """
    @return: The number of tx_ingest job rows.
    """
    return int(scalar(dsn, f"SELECT count(*) FROM {SCHEMA}.jobs"))


def waitUntil(
    check: Callable[[], bool], timeout: float, interval: float = 0.02
) -> float:
    """
    Poll until C{check()} is true.

    @return: The wall-clock time (C{time.time()}) it was first seen true.
    @raise TimeoutError: If it never is within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        time.sleep(interval)


def readMark(path: str) -> float | None:
    """
    @return: The time written in a mark file, or L{None} if none was.
    """
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return float(text) if text else None


def temporaryPath(suffix: str) -> str:
    """
    @return: The path of a new empty file, which the caller removes.
    """
    handle, path = tempfile.mkstemp(prefix="tx_ingest-bench-", suffix=suffix)
    os.close(handle)
    os.unlink(path)
    return path
