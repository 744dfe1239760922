# -*- test-case-name: tests.test_worker,tests.test_worker_db -*-
"""
The worker: claims stored jobs, runs their handlers and records the outcome.

One L{Worker} per process keeps at most C{concurrency} jobs claimed.  All its
database work goes through L{tx_ingest.store.claims.ClaimStore}; its drain
loop (the "pump") sends, in one round trip, the outcomes of the jobs that
ended since the previous trip together with the claim of as many new jobs as
slots are free.  While a trip is in flight, outcomes pile up and go together
in the next one, so round trips shrink under load instead of multiplying.

The pump runs when there is something to write, or when new jobs may be due:
after a C{NOTIFY} from the sink, on each poll, and after a claim that filled
every free slot.  An idle worker makes one cheap claim per poll interval and
one heartbeat per quarter of C{orphanAfter}.

Delivery is at least once: a job whose worker dies mid-run is taken back and
run again (its attempt counts), and a handler's effects may happen twice.
"""

from __future__ import annotations

import inspect
import os
import random
import socket
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from threading import Thread
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from tx_ingest.store.claims import (
    AttemptLimits,
    ClaimedJob,
    ClaimStore,
    JobListener,
    Outcome,
)
from tx_ingest.tasks import JobContext, Task, TaskRegistry

#: Most handler failures logged per second; the rest are counted.
FAILURE_LOG_RATE = 10


def defaultWorkerName() -> str:
    """
    @return: C{<host>-<pid>}: unique among live processes, so a restarted
        process gets a new name (pass a stable name to take back at start
        what a crashed previous run held).
    """
    return f"{socket.gethostname()}-{os.getpid()}"


def backoffDelay(
    attempt: int,
    base: float = 1.0,
    cap: float = 3600.0,
    random: Callable[[], float] = random.random,
) -> float:
    """
    How long a failed job waits before its next attempt: exponential in the
    number of attempts made, with jitter so that jobs failing together do not
    all come back together.

    @param attempt: The attempt that failed (1 for the first).
    @param base: The ceiling after the first failure, in seconds; it doubles
        with each further failure.
    @param cap: The largest ceiling.
    @param random: Returns a number in [0, 1).

    @return: A delay between half the ceiling and the ceiling,
        C{min(cap, base * 2 ** (attempt - 1))}.
    """
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))
    return ceiling / 2 + random() * ceiling / 2


def describeError(reason: Failure) -> str:
    """
    @return: The error of a failed attempt as C{last_error} stores it: its
        type and message.
    """
    error = reason.value
    message = " ".join(str(error).split())
    name = type(error).__qualname__
    return f"{name}: {message}" if message else name


@dataclass(frozen=True)
class WorkerSettings:
    """
    How a worker runs.

    @ivar name: Locks jobs and heartbeats; unique among live processes.
    @ivar concurrency: Most jobs claimed at once (and running threads).
    @ivar pollInterval: Seconds between claims when nothing wakes it.
    @ivar notify: Whether to C{LISTEN} for new jobs (else poll only).
    @ivar orphanAfter: Seconds without a heartbeat after which a worker is
        presumed dead and its running jobs taken back.
    @ivar keepDone: Seconds a C{done} job is kept; 0 deletes it at once.
    @ivar maxAttempts: Attempts of a job whose row and handler do not say.
    @ivar jobTimeout: Seconds an attempt may take when its handler does not
        say; 0 for no limit.
    @ivar shutdownTimeout: Seconds running jobs get to finish at shutdown.
    @ivar retentionInterval: Seconds between deletions of old C{done} jobs;
        L{None} for a tenth of C{keepDone} between 1 and 60 seconds.
    @ivar retentionBatch: Most jobs deleted per statement.
    """

    name: str = field(default_factory=defaultWorkerName)
    concurrency: int = 10
    pollInterval: float = 1.0
    notify: bool = True
    orphanAfter: float = 60.0
    keepDone: float = 86400.0
    maxAttempts: int = 5
    jobTimeout: float = 300.0
    shutdownTimeout: float = 30.0
    retentionInterval: float | None = None
    retentionBatch: int = 1000

    @property
    def heartbeatInterval(self) -> float:
        """
        Seconds between heartbeats (and sweeps for dead workers' jobs).
        """
        return self.orphanAfter / 4

    @property
    def retentionEvery(self) -> float:
        """
        Seconds between retention passes.
        """
        if self.retentionInterval is not None:
            return self.retentionInterval
        return min(60.0, max(1.0, self.keepDone / 10))


class _Resumed:
    """
    Awaiting this continues a coroutine that was already stepped once, as
    C{await} on it would have: values sent and exceptions thrown go to it.
    """

    def __init__(self, coroutine: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coroutine = coroutine
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, value = self._coroutine, self._first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    value = coroutine.throw(error)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coroutine.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coroutine: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Resumed(coroutine, first)


def _daemonThread(**kwargs: Any) -> Thread:
    # A handler thread that hangs must not keep the process alive at exit.
    return Thread(daemon=True, **kwargs)


class _HandlerThreads(ThreadPool):
    """
    The thread pool of plain-function handlers; its threads are daemons.
    """

    threadFactory = staticmethod(_daemonThread)  # type: ignore[assignment]


@dataclass
class _Attempt:
    """
    A claimed job in this process, from its claim until its outcome is
    written.
    """

    job: ClaimedJob
    maxAttempts: int
    running: Deferred[Any] | None = None
    finished: bool = False


class Worker:
    """
    Claims and runs jobs; see the module docstring.

    @ivar claims: Its database side.
    @ivar registry: The handlers, by job type.
    @ivar settings: How it runs.
    @ivar ran: Attempts that ended (any outcome) since it started.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        claims: ClaimStore,
        registry: TaskRegistry,
        settings: WorkerSettings,
        threadpool: ThreadPool | None = None,
        backoff: Callable[[int], float] = backoffDelay,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        """
        @param reactor: An L{IReactorTime} and L{IReactorFromThreads}
            provider.
        @param claims: See L{claims}.
        @param registry: See L{registry}; only its job types are claimed.
        @param settings: See L{settings}.
        @param threadpool: Runs plain-function handlers; by default one of
            C{concurrency} daemon threads, started with the worker.
        @param backoff: Given the attempt that failed, returns the seconds
            until the next one.
        @param host: Recorded in the workers table; this host's name if
            L{None}.
        @param pid: Recorded in the workers table; this process's if L{None}.
        """
        self.reactor = reactor
        self.claims = claims
        self.registry = registry
        self.settings = settings
        self.backoff = backoff
        self.ran = 0
        self.host = socket.gethostname() if host is None else host
        self.pid = os.getpid() if pid is None else pid
        self.limits = AttemptLimits(
            settings.maxAttempts,
            {t.jobType: t.maxAttempts for t in registry if t.maxAttempts is not None},
        )
        self._jobTypes = registry.jobTypes()
        self._ownsThreadpool = threadpool is None
        self._threadpool = threadpool
        if threadpool is None and any(t.inThread for t in registry):
            self._threadpool = _HandlerThreads(
                0, settings.concurrency, "tx_ingest-worker"
            )

        self._attempts: dict[int, _Attempt] = {}
        self._running = 0
        self._lingering = 0
        self._settled: list[Outcome] = []
        self._claiming = False
        self._wanted = True
        self._wakes = 0
        self._pumping = False
        self._retry: IDelayedCall | None = None
        self._retryDelay = 0.0
        self._outageSince: float | None = None
        self._quietObservers: list[Deferred[None]] = []
        self._idleObservers: list[Deferred[None]] = []
        self._abandoned = False
        self._started = False
        self._logSecond = -1
        self._logged = 0
        self._unlogged = 0
        self._loops: list[tuple[LoopingCall, Deferred[LoopingCall]]] = []

    @property
    def claimed(self) -> int:
        """
        Jobs claimed and not yet written back, plus threads of timed-out
        handlers still running: never more than C{concurrency}.
        """
        return len(self._attempts) + self._lingering

    def start(self) -> Deferred[None]:
        """
        Register (taking back what a previous process of the same name held),
        then start claiming, polling, heartbeating and deleting old jobs.

        @return: Fires once claiming has started; if registering fails (the
            database is unreachable) it is retried until L{stop}.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._started = True
        if self._threadpool is not None and self._ownsThreadpool:
            self._threadpool.start()
        delay = 0.1
        while True:
            try:
                taken = await self.claims.register(self.host, self.pid, self.limits)
                break
            except Exception:
                self.log.failure("cannot register worker; retrying")
            pause: Deferred[None] = Deferred()
            self.reactor.callLater(delay, pause.callback, None)
            await pause
            delay = min(delay * 2, 5.0)
            if not self._started:
                return
        if not self._started:
            return
        settings = self.settings
        self.log.info(
            "worker {name} started: job types {types}, concurrency {concurrency}, "
            "poll every {poll} s, notify {notify}, orphans after {orphanAfter} s, "
            "keep done jobs {keepDone} s",
            name=settings.name,
            types=", ".join(self._jobTypes),
            concurrency=settings.concurrency,
            poll=settings.pollInterval,
            notify=settings.notify,
            orphanAfter=settings.orphanAfter,
            keepDone=settings.keepDone,
        )
        if taken:
            self.log.warn(
                "took back {count} jobs a previous run of {name} left running",
                count=taken,
                name=settings.name,
            )
        self._claiming = True
        self._loop(self._maintain, settings.heartbeatInterval, now=False)
        if settings.keepDone > 0:
            self._loop(self._deleteDone, settings.retentionEvery, now=False)
        # The poll's first call, now, makes the first claim.
        self._loop(self.wake, settings.pollInterval)

    def _loop(
        self, body: Callable[[], object], interval: float, now: bool = True
    ) -> None:
        call = LoopingCall(body)
        call.clock = self.reactor
        done = call.start(interval, now=now)
        done.addErrback(lambda f: self.log.failure("worker loop stopped", f))
        self._loops.append((call, done))

    def wake(self) -> None:
        """
        New jobs may be due: claim as many as slots are free.  Called on
        each notification and each poll.
        """
        try:
            self._wakes += 1
            self._wanted = True
            self._kick()
        except Exception:
            self.log.failure("waking the worker failed")

    def _kick(self) -> None:
        if self._pumping or self._retry is not None:
            return
        Deferred.fromCoroutine(self._pump())

    async def _pump(self) -> None:
        self._pumping = True
        try:
            while True:
                outcomes, self._settled = self._settled, []
                limit = 0
                if self._claiming and self._wanted:
                    limit = self.settings.concurrency - self.claimed + len(outcomes)
                if not outcomes and limit <= 0:
                    break
                if not await self._trip(outcomes, limit):
                    break
        except Exception:
            self.log.failure("worker drain loop failed; it goes on at the next wake")
        finally:
            self._pumping = False
        if not self._settled:
            observers, self._quietObservers = self._quietObservers, []
            for observer in observers:
                observer.callback(None)

    async def _trip(self, outcomes: list[Outcome], limit: int) -> bool:
        """
        One round trip: write C{outcomes}, claim up to C{limit} jobs, start
        them.

        @return: Whether the pump should go on.
        """
        wakes = self._wakes
        known = list(self._attempts) if self._outageSince is not None else None
        try:
            claimed, written = await self.claims.cycle(
                outcomes, limit, self._jobTypes, known
            )
        except Exception:
            self._settled[:0] = outcomes
            self._failed(Failure())
            return False
        self._recovered()

        for outcome in outcomes:
            self._attempts.pop(outcome.jobId, None)
        if written < len(outcomes):
            self.log.warn(
                "{count} job outcomes were not written: the jobs were taken back "
                "from this worker (presumed dead), or an earlier write whose "
                "answer was lost already wrote them",
                count=len(outcomes) - written,
            )
        if len(claimed) < limit and self._wakes == wakes:
            self._wanted = False
        for job in claimed:
            self._start1(job)
        return True

    def _failed(self, reason: Failure) -> None:
        """
        A round trip failed: try again after a growing pause (claimed jobs
        of a lost answer are put back by the next trip: see
        L{ClaimStore.cycle}'s C{known}).
        """
        if self._outageSince is None:
            self._outageSince = self.reactor.seconds()
            self.log.warn(
                "worker cannot reach the job store ({error}); retrying",
                error=reason.getErrorMessage() or repr(reason.value),
            )
        self._retryDelay = min(max(self._retryDelay * 2, 0.1), 2.0)
        self._retry = self.reactor.callLater(self._retryDelay, self._retryNow)

    def _retryNow(self) -> None:
        self._retry = None
        self._wanted = True
        self._kick()

    def _recovered(self) -> None:
        self._retryDelay = 0.0
        if self._outageSince is not None:
            self.log.info(
                "worker reached the job store again after {seconds:.1f} s",
                seconds=self.reactor.seconds() - self._outageSince,
            )
            self._outageSince = None

    def _start1(self, job: ClaimedJob) -> None:
        """
        Run one claimed job's handler.
        """
        task = self.registry.get(job.jobType)
        assert task is not None, f"claimed a job of unknown type {job.jobType!r}"
        maxAttempts = job.maxAttempts or task.maxAttempts or self.settings.maxAttempts
        attempt = _Attempt(job, maxAttempts)
        self._attempts[job.jobId] = attempt
        self._running += 1
        context = JobContext(
            job.jobId, job.jobType, job.attempt, maxAttempts, self.settings.name
        )
        timeout = self.settings.jobTimeout if task.timeout is None else task.timeout
        if task.inThread:
            self._runInThread(attempt, task, context, timeout)
        else:
            self._runOnReactor(attempt, task, context, timeout)

    def _runOnReactor(
        self, attempt: _Attempt, task: Task, context: JobContext, timeout: float
    ) -> None:
        try:
            result = task.function(attempt.job.payload, context)
        except Exception:
            self._finish(attempt, Failure())
            return

        # A coroutine that ends without waiting costs no Deferred at all.
        if inspect.iscoroutine(result):
            try:
                first = result.send(None)
            except StopIteration:
                self._finish(attempt, None)
                return
            except Exception:
                self._finish(attempt, Failure())
                return
            result = Deferred.fromCoroutine(_resume(result, first))
        if not isinstance(result, Deferred):
            self._finish(attempt, None)
            return
        attempt.running = result
        if timeout > 0 and not result.called:
            result.addTimeout(timeout, self.reactor)
        result.addBoth(lambda outcome: self._finish(attempt, outcome))

    def _runInThread(
        self, attempt: _Attempt, task: Task, context: JobContext, timeout: float
    ) -> None:
        assert self._threadpool is not None
        timer: list[IDelayedCall] = []

        def returned(success: bool, result: object) -> None:
            if timer and timer[0].active():
                timer[0].cancel()
            if attempt.finished:
                self._lingering -= 1
                self.log.warn(
                    "the thread of job {jobId} ({jobType}) returned after its timeout",
                    jobId=attempt.job.jobId,
                    jobType=attempt.job.jobType,
                )
                self.wake()
                return
            if success and (
                isinstance(result, Deferred) or inspect.iscoroutine(result)
            ):
                if inspect.iscoroutine(result):
                    result.close()
                error = TypeError(
                    f"the {attempt.job.jobType!r} handler ran in a thread and "
                    "returned an awaitable: register it with inThread=False"
                )
                self._finish(attempt, Failure(error))
                return
            self._finish(attempt, None if success else result)

        def timedOut() -> None:
            self._lingering += 1
            self._finish(
                attempt, Failure(TimeoutError(f"attempt took more than {timeout} s"))
            )

        if timeout > 0:
            timer.append(self.reactor.callLater(timeout, timedOut))
        self._threadpool.callInThreadWithCallback(
            lambda success, result: self.reactor.callFromThread(
                returned, success, result
            ),
            task.function,
            attempt.job.payload,
            context,
        )

    def _finish(self, attempt: _Attempt, result: object) -> None:
        """
        An attempt ended: C{result} is a L{Failure}, or anything else for
        success.  Queue its outcome for the next round trip.
        """
        if attempt.finished:
            return
        attempt.finished = True
        attempt.running = None
        self._running -= 1
        self.ran += 1
        if self._abandoned:
            # Shutdown gave up on it: its job goes back to pending instead.
            self._attempts.pop(attempt.job.jobId, None)
            return
        job = attempt.job
        if isinstance(result, Failure):
            error = describeError(result)
            if job.attempt >= attempt.maxAttempts:
                outcome = Outcome(job.jobId, job.attempt, "failed", error)
                verdict = "failed for good"
            else:
                delay = self.backoff(job.attempt)
                outcome = Outcome(job.jobId, job.attempt, "pending", error, delay)
                verdict = f"retry in {delay:.1f} s"
            self._logFailure(job, attempt.maxAttempts, error, verdict)
        else:
            outcome = Outcome(job.jobId, job.attempt, "done")
        self._settled.append(outcome)
        if not self._running:
            observers, self._idleObservers = self._idleObservers, []
            for observer in observers:
                observer.callback(None)
        self._kick()

    def _logFailure(
        self, job: ClaimedJob, maxAttempts: int, error: str, verdict: str
    ) -> None:
        second = int(self.reactor.seconds())
        if second != self._logSecond:
            if self._unlogged:
                self.log.warn(
                    "{count} more job failures were not logged", count=self._unlogged
                )
            self._logSecond, self._logged, self._unlogged = second, 0, 0
        if self._logged >= FAILURE_LOG_RATE:
            self._unlogged += 1
            return
        self._logged += 1
        self.log.warn(
            "job {jobId} ({jobType}) attempt {attempt} of {maxAttempts} failed: "
            "{error}; {verdict}",
            jobId=job.jobId,
            jobType=job.jobType,
            attempt=job.attempt,
            maxAttempts=maxAttempts,
            error=error,
            verdict=verdict,
        )

    async def _maintain(self) -> None:
        """
        Heartbeat, then take back the jobs of workers presumed dead.  Never
        fails, so that the loop calling it goes on.
        """
        try:
            await self.claims.heartbeat(self.host, self.pid)
        except Exception:
            self.log.failure("worker heartbeat failed")
        try:
            taken, gone = await self.claims.recoverOrphans(
                self.settings.orphanAfter, self.limits
            )
        except Exception:
            self.log.failure("looking for dead workers' jobs failed")
            return
        if taken or gone:
            self.log.warn(
                "took back {count} jobs of workers presumed dead ({workers})",
                count=taken,
                workers=", ".join(gone) or "already forgotten",
            )
            self.wake()

    async def _deleteDone(self) -> None:
        """
        Delete C{done} jobs older than C{keepDone}, a small batch per
        statement.  Never fails.
        """
        deleted = 0
        batch = self.settings.retentionBatch
        try:
            while self._claiming:
                count = await self.claims.deleteDone(self.settings.keepDone, batch)
                deleted += count
                if count < batch:
                    break
        except Exception:
            self.log.failure("deleting old done jobs failed")
        if deleted:
            self.log.info("deleted {count} old done jobs", count=deleted)

    def stop(self) -> Deferred[None]:
        """
        Stop claiming, give running jobs up to C{shutdownTimeout} seconds to
        finish, write every outcome, and put the unfinished jobs back to
        C{pending}.

        @return: Fires when done; never fails.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._claiming = False
        wasStarted, self._started = self._started, False
        for call, _ in self._loops:
            if call.running:
                call.stop()
        for _, done in self._loops:
            await done
        if not wasStarted:
            return
        deadline = self.reactor.seconds() + self.settings.shutdownTimeout

        if self._running:
            self.log.info(
                "worker stopping: waiting up to {timeout} s for {count} running jobs",
                timeout=self.settings.shutdownTimeout,
                count=self._running,
            )
            idle: Deferred[None] = Deferred()
            self._idleObservers.append(idle)
            await self._until(idle, deadline)
        unfinished = [a for a in self._attempts.values() if not a.finished]
        if unfinished:
            self._abandoned = True
            for attempt in unfinished:
                if attempt.running is not None:
                    attempt.running.cancel()

        if self._settled or self._pumping:
            quiet: Deferred[None] = Deferred()
            self._quietObservers.append(quiet)
            self._kick()
            await self._until(quiet, deadline)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

        released = 0
        try:
            released = await self.claims.release()
        except Exception:
            self.log.failure(
                "could not put this worker's unfinished jobs back; they are taken "
                "back once it is presumed dead"
            )
        self.log.info(
            "worker {name} stopped: {ran} attempts ran, {unwritten} outcomes "
            "unwritten, {released} unfinished jobs back to pending",
            name=self.settings.name,
            ran=self.ran,
            unwritten=len(self._settled),
            released=released,
        )
        self._stopThreads()

    async def _until(self, d: Deferred[None], deadline: float) -> None:
        d.addTimeout(max(deadline - self.reactor.seconds(), 0), self.reactor)
        try:
            await d
        except TimeoutError:
            pass

    def _stopThreads(self) -> None:
        if self._threadpool is None or not self._ownsThreadpool:
            return
        stuck = self._lingering + sum(
            1 for a in self._attempts.values() if not a.finished
        )
        if stuck:
            # Joining would block for ever; the threads are daemons.
            self.log.warn(
                "{count} handler threads are still running; they end with the process",
                count=stuck,
            )
            return
        self._threadpool.stop()


class WorkerService(Service):
    """
    Runs a L{Worker} (and, unless polling only, a L{JobListener}) once the
    database service is ready, and stops it before the database.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        database: Any,
        registry: TaskRegistry,
        settings: WorkerSettings,
    ) -> None:
        """
        @param reactor: The reactor.
        @param database: A L{tx_ingest.service.DatabaseService}: its C{ready}
            Deferred, C{pool} and C{schema} are used.
        @param registry: The handlers.
        @param settings: How the worker runs.
        """
        self.reactor = reactor
        self.database = database
        self.registry = registry
        self.settings = settings
        self.worker: Worker | None = None
        self.listener: JobListener | None = None
        self._starting: Deferred[None] = succeed(None)

    def startService(self) -> None:
        """
        Start the worker once the job store is ready.
        """
        Service.startService(self)

        def begin(_: object) -> Deferred[None] | None:
            if not self.running:
                return None
            pool = self.database.pool
            claims = ClaimStore(
                pool, self.database.schema, self.settings.name, self.settings.keepDone
            )
            self.worker = Worker(self.reactor, claims, self.registry, self.settings)
            if self.settings.notify:
                self.listener = JobListener(
                    self.reactor, pool.dsn, self.database.schema, self.worker.wake
                )
                self.listener.start()
            return self.worker.start()

        # A Deferred of its own: the sink waits on the database's too.
        ready: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            if isinstance(result, Failure):
                ready.errback(result)
            else:
                ready.callback(None)
            return result

        self.database.ready.addBoth(relay)
        self._starting = ready.addCallback(begin)
        self._starting.addErrback(
            lambda f: self.log.failure("the worker could not start", f)
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop the listener, then the worker (see L{Worker.stop}).
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.worker is not None:
            await self.worker.stop()
