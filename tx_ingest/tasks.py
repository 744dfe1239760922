# -*- test-case-name: tests.test_worker -*-
"""
Job handlers: the code a worker runs for each job type.

A tasks module registers its handlers with the L{task} decorator when it is
imported; C{twistd ingest --tasks myapp.tasks} imports it::

    from tx_ingest import task

    @task("signup", maxAttempts=5, timeout=30)
    def sendWelcome(payload, job):
        ...

A handler is called with the job's payload (decoded JSON) and a L{JobContext}.
Returning normally completes the job; raising (or failing) makes it retried
later or failed for good.  Plain functions run in the worker's thread pool;
C{async def} functions, and functions registered with C{inThread=False} (which
may return a L{Deferred}), run on the reactor thread and must not block.

This module imports nothing heavy, so that tasks modules stay cheap to import.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class JobContext:
    """
    What a handler knows about the job it runs.

    @ivar jobId: The job's id in the jobs table.
    @ivar jobType: The job's type.
    @ivar attempt: Which attempt this is: 1 the first time.
    @ivar maxAttempts: How many attempts the job gets in all.
    @ivar workerName: The name of the worker running it.
    """

    jobId: int
    jobType: str
    attempt: int
    maxAttempts: int
    workerName: str


@dataclass(frozen=True)
class Task:
    """
    A registered handler and its settings.

    @ivar jobType: The job type it handles.
    @ivar function: Called with the payload and a L{JobContext}.
    @ivar maxAttempts: Attempts a job of this type gets, unless the job row
        sets its own; L{None} for the worker's default.
    @ivar timeout: Seconds an attempt may take; L{None} for the worker's
        default, 0 for no limit.
    @ivar inThread: Whether the function runs in the thread pool (else on the
        reactor thread).
    """

    jobType: str
    function: Callable[[Any, JobContext], Any]
    maxAttempts: int | None = None
    timeout: float | None = None
    inThread: bool = True


class TaskRegistry:
    """
    Handlers by job type.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def task(
        self,
        jobType: str,
        *,
        maxAttempts: int | None = None,
        timeout: float | None = None,
        inThread: bool | None = None,
    ) -> Callable[[_F], _F]:
        """
        A decorator registering its function as the handler of C{jobType}.

        @param jobType: The job type handled; one handler per type.
        @param maxAttempts: See L{Task.maxAttempts}; at least 1.
        @param timeout: See L{Task.timeout}; 0 or more.
        @param inThread: Whether to run the function in the thread pool;
            L{None} means yes for plain functions and no for C{async def}
            ones.  Pass C{False} for a plain function returning a
            L{Deferred}.

        @return: The decorator, which returns the function unchanged.

        @raise ValueError: For a bad setting, or when C{jobType} already has
            a different handler.
        """
        if not jobType:
            raise ValueError("a job type cannot be empty")
        if maxAttempts is not None and maxAttempts < 1:
            raise ValueError(f"maxAttempts must be at least 1, not {maxAttempts!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be 0 or more, not {timeout!r}")

        def register(function: _F) -> _F:
            threaded = inThread
            if threaded is None:
                threaded = not inspect.iscoroutinefunction(function)
            self.add(Task(jobType, function, maxAttempts, timeout, threaded))
            return function

        return register

    def add(self, task: Task) -> None:
        """
        Register a handler.

        @raise ValueError: When its job type already has a different handler.
        """
        known = self._tasks.get(task.jobType)
        if known is not None and known != task:
            raise ValueError(
                f"job type {task.jobType!r} already has a handler: "
                f"{known.function.__module__}.{known.function.__qualname__}"
            )
        self._tasks[task.jobType] = task

    def get(self, jobType: str) -> Task | None:
        """
        @return: The handler of C{jobType}, if there is one.
        """
        return self._tasks.get(jobType)

    def jobTypes(self) -> list[str]:
        """
        @return: The job types with a handler, sorted.
        """
        return sorted(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)


#: The registry that L{task} adds to and C{twistd ingest --tasks} runs.
defaultRegistry = TaskRegistry()


def task(
    jobType: str,
    *,
    maxAttempts: int | None = None,
    timeout: float | None = None,
    inThread: bool | None = None,
) -> Callable[[_F], _F]:
    """
    Register the decorated function as the handler of C{jobType} in
    L{defaultRegistry}; see L{TaskRegistry.task}.
    """
    return defaultRegistry.task(
        jobType, maxAttempts=maxAttempts, timeout=timeout, inThread=inThread
    )


def importTaskModules(names: Iterable[str]) -> None:
    """
    Import modules so that their L{task} decorators register handlers.

    @param names: Dotted module names.

    @raise ImportError: If one cannot be imported (the original error,
        with the module named).
    """
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"cannot import tasks module {name!r}: {e}") from e
