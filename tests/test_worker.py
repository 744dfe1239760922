"""
Unit tests for L{tx_ingest.worker} and L{tx_ingest.tasks}: a fake claim store
and a L{Clock}, no database and no threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tx_ingest.store.claims import AttemptLimits, ClaimedJob, Outcome
from tx_ingest.tap import Options
from tx_ingest.tasks import JobContext, TaskRegistry
from tx_ingest.worker import Worker, WorkerSettings, backoffDelay, describeError


class ThreadlessClock(Clock):
    """
    A L{Clock} that runs C{callFromThread} calls at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """
        Call C{f} now.
        """
        f(*args, **kw)


class InlinePool:
    """
    Stands for a thread pool: runs each function at once, in this thread.
    """

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, object], None], f: Callable[..., Any], *a: Any
    ) -> None:
        """
        Call C{f} and report its result.
        """
        try:
            result = f(*a)
        except Exception:
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, result)


class FakeClaims:
    """
    A claim store in memory: C{pending} jobs are handed out in order.

    @ivar cycles: The arguments of each L{cycle} call.
    @ivar written: Every outcome written.
    @ivar failNext: Exceptions to fail the next calls of a method with.
    """

    def __init__(self, jobs: Sequence[ClaimedJob] = ()) -> None:
        self.pending = list(jobs)
        self.cycles: list[tuple[list[Outcome], int, list[int] | None]] = []
        self.written: list[Outcome] = []
        self.heartbeats = 0
        self.sweeps = 0
        self.releases = 0
        self.failNext: dict[str, list[Exception]] = {}

    def _failing(self, method: str) -> Exception | None:
        errors = self.failNext.get(method)
        return errors.pop(0) if errors else None

    def register(self, host: str, pid: int, limits: AttemptLimits) -> Deferred[int]:
        return succeed(0)

    def cycle(
        self,
        outcomes: Sequence[Outcome],
        claimLimit: int,
        jobTypes: Sequence[str],
        known: Sequence[int] | None = None,
    ) -> Deferred[tuple[list[ClaimedJob], int]]:
        self.cycles.append(
            (list(outcomes), claimLimit, None if known is None else list(known))
        )
        error = self._failing("cycle")
        if error is not None:
            return fail(error)
        self.written.extend(outcomes)
        claimed, self.pending = self.pending[:claimLimit], self.pending[claimLimit:]
        return succeed((claimed, len(outcomes)))

    def heartbeat(self, host: str, pid: int) -> Deferred[None]:
        self.heartbeats += 1
        error = self._failing("heartbeat")
        return fail(error) if error is not None else succeed(None)

    def recoverOrphans(
        self, orphanAfter: float, limits: AttemptLimits
    ) -> Deferred[tuple[int, list[str]]]:
        self.sweeps += 1
        return succeed((0, []))

    def deleteDone(self, olderThan: float, batchSize: int = 1000) -> Deferred[int]:
        return succeed(0)

    def release(self) -> Deferred[int]:
        self.releases += 1
        return succeed(0)


def job(
    jobId: int, jobType: str = "t", attempt: int = 1, maxAttempts: int | None = None
) -> ClaimedJob:
    """
    @return: A claimed job with payload C{{"n": jobId}}.
    """
    return ClaimedJob(jobId, jobType, {"n": jobId}, attempt, maxAttempts)


class BackoffTests(SynchronousTestCase):
    """
    L{backoffDelay}.
    """

    def test_doublesWithJitter(self) -> None:
        """
        Each failure doubles the ceiling; the delay lies between half the
        ceiling and the ceiling.
        """
        self.assertEqual(backoffDelay(1, random=lambda: 0.0), 0.5)
        self.assertEqual(backoffDelay(1, random=lambda: 1.0), 1.0)
        self.assertEqual(backoffDelay(4, random=lambda: 0.0), 4.0)
        self.assertEqual(backoffDelay(4, random=lambda: 1.0), 8.0)

    def test_capped(self) -> None:
        """
        The ceiling stops at C{cap}, however many attempts failed.
        """
        self.assertEqual(backoffDelay(10_000, cap=60, random=lambda: 1.0), 60.0)
        self.assertEqual(backoffDelay(30, base=2, cap=60, random=lambda: 0.0), 30.0)


class RegistryTests(SynchronousTestCase):
    """
    L{TaskRegistry} and the public decorator.
    """

    def test_threadOrReactor(self) -> None:
        """
        Plain functions run in threads, C{async def} ones on the reactor,
        unless told otherwise.
        """
        registry = TaskRegistry()

        @registry.task("a", maxAttempts=3, timeout=2)
        def a(payload: Any, job: JobContext) -> None:
            pass

        @registry.task("b")
        async def b(payload: Any, job: JobContext) -> None:
            pass

        @registry.task("c", inThread=False)
        def c(payload: Any, job: JobContext) -> Deferred[None]:
            return succeed(None)

        tasks = {t.jobType: t for t in registry}
        self.assertEqual(
            [(t.inThread, t.maxAttempts, t.timeout) for t in tasks.values()],
            [(True, 3, 2), (False, None, None), (False, None, None)],
        )
        self.assertEqual(registry.jobTypes(), ["a", "b", "c"])

    def test_oneHandlerPerType(self) -> None:
        """
        A second, different handler for a job type is refused, as are bad
        settings.
        """
        registry = TaskRegistry()
        registry.task("a")(lambda payload, job: None)
        self.assertRaises(ValueError, registry.task("a"), lambda payload, job: None)
        self.assertRaises(ValueError, registry.task, "b", maxAttempts=0)
        self.assertRaises(ValueError, registry.task, "b", timeout=-1)

    def test_packageExport(self) -> None:
        """
        C{from tx_ingest import task} gives the decorator of the default
        registry.
        """
        from tx_ingest import task
        from tx_ingest.tasks import defaultRegistry

        self.assertEqual(task.__module__, "tx_ingest.tasks")
        self.assertIsNotNone(defaultRegistry)


class OptionsTests(SynchronousTestCase):
    """
    The worker's options of C{twistd ingest}.
    """

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """
        Each worker option has its documented default.
        """
        options = self.parse()
        self.assertEqual(
            [
                options[name]
                for name in (
                    "tasks",
                    "concurrency",
                    "poll-interval",
                    "orphan-after",
                    "keep-done",
                    "max-attempts",
                    "job-timeout",
                    "worker-name",
                )
            ],
            [[], 10, 1.0, 60.0, 86400.0, 5, 300.0, None],
        )
        self.assertFalse(options["no-notify"] or options["no-worker"])

    def test_tasksImported(self) -> None:
        """
        C{--tasks} is repeatable and imports its modules; a module that
        cannot be imported is a usage error.
        """
        options = self.parse("--tasks", "tests.tasksample", "--tasks", "json")
        self.assertEqual(options["tasks"], ["tests.tasksample", "json"])
        self.assertRaises(usage.UsageError, self.parse, "--tasks", "no.such.module")

    def test_roles(self) -> None:
        """
        C{--no-ingest} needs C{--tasks}, takes no C{--listen}, and cannot go
        with C{--no-worker}.
        """
        options = self.parse("--no-ingest", "--tasks", "tests.tasksample")
        self.assertEqual(options["listen"], [])
        for argv in (
            ["--no-ingest"],
            ["--no-ingest", "--no-worker", "--tasks", "tests.tasksample"],
            ["--no-ingest", "--tasks", "tests.tasksample", "--listen", "tcp:1"],
            ["--concurrency", "0"],
            ["--poll-interval", "0"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)


class WorkerTests(SynchronousTestCase):
    """
    L{Worker} on a fake store and a clock.
    """

    def setUp(self) -> None:
        self.clock = ThreadlessClock()
        self.registry = TaskRegistry()
        self.claims = FakeClaims()
        self.settings = WorkerSettings(
            name="w", concurrency=3, orphanAfter=8.0, keepDone=0, jobTimeout=5.0
        )

    def worker(self) -> Worker:
        worker = Worker(
            self.clock,
            self.claims,  # type: ignore[arg-type]
            self.registry,
            self.settings,
            threadpool=InlinePool(),  # type: ignore[arg-type]
            backoff=lambda attempt: 10.0 * attempt,
            host="h",
            pid=1,
        )
        self.successResultOf(worker.start())
        return worker

    def test_asyncHandlerEndingAtOnce(self) -> None:
        """
        An C{async def} handler that never waits completes its job without
        any Deferred, and the outcome goes out with the next claim.
        """
        seen = []

        @self.registry.task("t")
        async def handler(payload: Any, context: JobContext) -> None:
            seen.append((payload, context))

        self.claims.pending = [job(1), job(2)]
        self.worker()
        self.assertEqual([p for p, _ in seen], [{"n": 1}, {"n": 2}])
        self.assertEqual(seen[0][1], JobContext(1, "t", 1, 5, "w"))
        self.assertEqual(
            self.claims.written, [Outcome(1, 1, "done"), Outcome(2, 1, "done")]
        )
        # The first claim got fewer jobs than it asked for: the queue is
        # empty, so the next trip only writes the outcomes.
        self.assertEqual(
            [(len(o), n) for o, n, _ in self.claims.cycles], [(0, 3), (2, 0)]
        )

    def test_failureRetriesWithBackoff(self) -> None:
        """
        A handler that raises sends its job back to pending with the backoff
        delay and the error's type and message.
        """

        @self.registry.task("t")
        def handler(payload: Any, context: JobContext) -> None:
            raise ValueError("no  good\nat all")

        self.claims.pending = [job(1, attempt=2)]
        self.worker()
        self.assertEqual(
            self.claims.written,
            [Outcome(1, 2, "pending", "ValueError: no good at all", 20.0)],
        )

    def test_lastAttemptFails(self) -> None:
        """
        A failure on the last attempt (the row's limit first, else the
        handler's, else the default) marks the job failed.
        """

        @self.registry.task("t", maxAttempts=2)
        async def handler(payload: Any, context: JobContext) -> None:
            raise KeyError("k")

        self.claims.pending = [job(1, attempt=2), job(2, attempt=2, maxAttempts=3)]
        self.worker()
        self.assertEqual(
            [(o.jobId, o.status, o.error) for o in self.claims.written],
            [(1, "failed", "KeyError: 'k'"), (2, "pending", "KeyError: 'k'")],
        )

    def test_timeout(self) -> None:
        """
        An attempt still running after its timeout fails with
        C{TimeoutError}; the slot is free for the next claim.
        """
        waits: list[Deferred[None]] = []

        @self.registry.task("t", timeout=2)
        async def handler(payload: Any, context: JobContext) -> None:
            d: Deferred[None] = Deferred()
            waits.append(d)
            await d

        self.claims.pending = [job(1)]
        worker = self.worker()
        self.assertEqual(worker.claimed, 1)
        self.clock.advance(1.9)
        self.assertEqual(self.claims.written, [])
        self.clock.advance(0.1)
        [outcome] = self.claims.written
        self.assertEqual((outcome.status, outcome.retryDelay), ("pending", 10.0))
        self.assertTrue(outcome.error and outcome.error.startswith("TimeoutError"))
        self.assertEqual(worker.claimed, 0)

    def test_deferredHandlerResumed(self) -> None:
        """
        An C{async def} handler that waits is resumed when what it waits on
        fires, and its result decides the outcome.
        """
        gate: Deferred[int] = Deferred()

        @self.registry.task("t")
        async def handler(payload: Any, context: JobContext) -> None:
            value = await gate
            if value != 7:
                raise ValueError(value)

        self.claims.pending = [job(1)]
        self.worker()
        self.assertEqual(self.claims.written, [])
        gate.callback(7)
        self.assertEqual(self.claims.written, [Outcome(1, 1, "done")])

    def test_neverMoreThanConcurrency(self) -> None:
        """
        Claims ask only for free slots: never more than C{concurrency} jobs
        are held at once.
        """
        gates: dict[int, Deferred[None]] = {}

        @self.registry.task("t", inThread=False)
        def handler(payload: Any, context: JobContext) -> Deferred[None]:
            gates[context.jobId] = Deferred()
            return gates[context.jobId]

        self.claims.pending = [job(n) for n in range(1, 6)]
        worker = self.worker()
        self.assertEqual(sorted(gates), [1, 2, 3])
        self.assertEqual(worker.claimed, 3)
        gates[2].callback(None)
        self.assertEqual(sorted(gates), [1, 2, 3, 4])
        self.assertEqual(self.claims.cycles[-1][:2], ([Outcome(2, 1, "done")], 1))
        self.assertEqual(worker.claimed, 3)

    def test_heartbeat(self) -> None:
        """
        The worker heartbeats and looks for dead workers' jobs every quarter
        of C{orphanAfter}.
        """
        self.registry.task("t")(lambda payload, job: None)
        self.worker()
        self.assertEqual(self.claims.heartbeats, 0)
        self.clock.advance(2.0)
        self.assertEqual((self.claims.heartbeats, self.claims.sweeps), (1, 1))
        self.clock.advance(2.0)
        self.assertEqual((self.claims.heartbeats, self.claims.sweeps), (2, 2))

    def test_heartbeatLoopSurvivesFailure(self) -> None:
        """
        A failed heartbeat is logged and the loop keeps beating.
        """
        self.registry.task("t")(lambda payload, job: None)
        self.claims.failNext["heartbeat"] = [RuntimeError("db down")]
        self.worker()
        self.clock.advance(2.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(2.0)
        self.assertEqual(self.claims.heartbeats, 2)
        self.assertEqual(self.claims.sweeps, 2)

    def test_claimFailureRetried(self) -> None:
        """
        A failed round trip keeps its outcomes, is retried after a pause,
        and the next trip puts back claims whose answer was lost.
        """
        self.registry.task("t")(lambda payload, job: None)
        self.claims.failNext["cycle"] = [ConnectionError("gone")]
        self.claims.pending = [job(1)]
        self.worker()
        self.assertEqual(len(self.claims.cycles), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.claims.cycles[1], ([], 3, []))
        self.assertEqual(self.claims.written, [Outcome(1, 1, "done")])

    def test_pollWakes(self) -> None:
        """
        Once the queue looked empty, the worker claims again at the next
        poll, not before.
        """
        self.registry.task("t")(lambda payload, job: None)
        self.worker()
        self.assertEqual(len(self.claims.cycles), 1)
        self.claims.pending = [job(1)]
        self.clock.advance(0.5)
        self.assertEqual(len(self.claims.cycles), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.claims.written, [Outcome(1, 1, "done")])

    def test_gracefulStop(self) -> None:
        """
        Stopping stops claiming, waits for running jobs up to the shutdown
        timeout, writes what ended, and then releases the rest.
        """
        gates: dict[int, Deferred[None]] = {}

        @self.registry.task("t", inThread=False, timeout=0)
        def handler(payload: Any, context: JobContext) -> Deferred[None]:
            gates[context.jobId] = Deferred()
            return gates[context.jobId]

        self.settings = WorkerSettings(name="w", concurrency=2, shutdownTimeout=3.0)
        self.claims.pending = [job(1), job(2), job(3)]
        worker = self.worker()
        stopped = worker.stop()
        gates[1].callback(None)
        self.assertNoResult(stopped)
        self.assertEqual(self.claims.releases, 0)
        self.clock.advance(3.0)
        self.successResultOf(stopped)
        self.assertEqual(self.claims.written, [Outcome(1, 1, "done")])
        self.assertEqual(self.claims.releases, 1)
        self.assertEqual(sorted(gates), [1, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_describeError(self) -> None:
        """
        An error is stored as its type and its message on one line.
        """
        from twisted.python.failure import Failure

        self.assertEqual(describeError(Failure(OSError("a\n b"))), "OSError: a b")
        self.assertEqual(
            describeError(Failure(KeyboardInterrupt())), "KeyboardInterrupt"
        )
