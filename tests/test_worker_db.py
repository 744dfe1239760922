"""
Integration tests of the worker against a real PostgreSQL: outcomes, retries,
timeouts, ordering, wake-ups, crash recovery, shutdown and retention.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.pgfixture import DatabaseTestCase, terminateBackends
from tx_ingest.store import ClaimStore, JobListener, JobStore, NewJob
from tx_ingest.tasks import JobContext, TaskRegistry
from tx_ingest.worker import Worker, WorkerSettings


def sleep(seconds: float) -> Deferred[None]:
    """
    @return: Fires after C{seconds} on the real reactor.
    """
    return deferLater(reactor, seconds, lambda: None)


class WorkerDatabaseTests(DatabaseTestCase):
    """
    A L{Worker} with a real L{ClaimStore}.
    """

    poolSize = 3
    timeout = 30

    async def _setUp(self) -> None:
        await super()._setUp()
        self.registry = TaskRegistry()
        self.jobs = JobStore(self.pool)
        self.ran: list[tuple[int, Any]] = []

    def startWorker(
        self,
        backoff: Callable[[int], float] = lambda attempt: 0.0,
        listen: bool = False,
        **settings: Any,
    ) -> Deferred[Worker]:
        """
        Start a worker on the test database, stopped at clean-up.
        """
        options: dict[str, Any] = {
            "name": "w1",
            "pollInterval": 0.05,
            "notify": listen,
            **settings,
        }
        workerSettings = WorkerSettings(**options)
        claims = ClaimStore(
            self.pool, self.schema, workerSettings.name, workerSettings.keepDone
        )
        worker = Worker(reactor, claims, self.registry, workerSettings, backoff=backoff)
        if listen:
            listener = JobListener(reactor, self.dsn, self.schema, worker.wake)
            listener.start()
            self.addCleanup(listener.stop)
            self.listener = listener
        self.addCleanup(worker.stop)
        return worker.start().addCallback(lambda _: worker)

    def record(self, jobType: str, **options: Any) -> None:
        """
        Register an C{async def} handler of C{jobType} that records each job.
        """

        @self.registry.task(jobType, **options)
        async def handler(payload: Any, job: JobContext) -> None:
            self.ran.append((job.jobId, payload))

    async def rows(
        self, columns: str = "id, status, attempts"
    ) -> list[tuple[Any, ...]]:
        """
        @return: Each job's C{columns}, by id.
        """
        return await self.pool.runQuery(
            f"SELECT {columns} FROM tx_ingest.jobs ORDER BY id"
        )

    async def waitFor(
        self, condition: str, timeout: float = 10.0, parameters: Any = None
    ) -> None:
        """
        Wait until the SQL expression C{condition} is true.
        """
        deadline = time.monotonic() + timeout
        while True:
            [(true,)] = await self.pool.runQuery(f"SELECT {condition}", parameters)
            if true:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout} s: {condition}")
            await sleep(0.02)

    async def test_outcomes(self) -> None:
        """
        A job whose handler returns is C{done} with C{finished_at} set; one
        whose handler raises is C{pending} again, pushed out by the backoff,
        with its error recorded and its lock cleared.
        """
        self.record("ok")

        @self.registry.task("bad")
        def bad(payload: Any, job: JobContext) -> None:
            raise ValueError("bad payload")

        await self.jobs.pushMany([NewJob({"n": 1}, "ok"), NewJob({"n": 2}, "bad")])
        await self.startWorker(backoff=lambda attempt: 300.0)
        await self.waitFor(
            "(SELECT count(*) = 2 FROM tx_ingest.jobs WHERE status <> 'running'"
            " AND attempts = 1)"
        )
        rows = await self.rows(
            "status, finished_at IS NOT NULL, locked_by, last_error,"
            " run_at > now() + interval '290 seconds'"
        )
        self.assertEqual(
            rows,
            [
                ("done", True, "w1", None, False),
                ("pending", False, None, "ValueError: bad payload", True),
            ],
        )

    async def test_maxAttempts(self) -> None:
        """
        A job failing every time is tried C{maxAttempts} times (the row's
        limit before the handler's) and then C{failed}.
        """
        calls: list[int] = []

        @self.registry.task("bad", maxAttempts=3)
        async def bad(payload: Any, job: JobContext) -> None:
            calls.append(job.attempt)
            raise RuntimeError(f"attempt {job.attempt}")

        await self.jobs.pushMany([NewJob({}, "bad"), NewJob({}, "bad", maxAttempts=1)])
        await self.startWorker()
        await self.waitFor(
            "(SELECT count(*) = 2 FROM tx_ingest.jobs WHERE status = 'failed')"
        )
        rows = await self.rows("attempts, last_error, finished_at IS NOT NULL")
        self.assertEqual(
            rows,
            [
                (3, "RuntimeError: attempt 3", True),
                (1, "RuntimeError: attempt 1", True),
            ],
        )
        self.assertEqual(sorted(calls), [1, 1, 2, 3])

    async def test_timeouts(self) -> None:
        """
        An attempt taking longer than its timeout fails with C{TimeoutError},
        on the reactor and in a thread alike.
        """

        @self.registry.task("hang", timeout=0.1, maxAttempts=1)
        async def hang(payload: Any, job: JobContext) -> None:
            await sleep(30)

        @self.registry.task("block", timeout=0.1, maxAttempts=1)
        def block(payload: Any, job: JobContext) -> None:
            time.sleep(0.4)

        await self.jobs.pushMany([NewJob({}, "hang"), NewJob({}, "block")])
        await self.startWorker()
        await self.waitFor(
            "(SELECT count(*) = 2 FROM tx_ingest.jobs WHERE status = 'failed')"
        )
        rows = await self.rows("last_error")
        self.assertEqual([row[0][:13] for row in rows], ["TimeoutError:"] * 2)
        # Let the blocked thread return before the worker stops.
        await sleep(0.5)

    async def test_priorityAndRunAt(self) -> None:
        """
        Jobs run highest priority first, then oldest C{run_at}; a job whose
        C{run_at} has not come is left alone until it comes.
        """
        self.record("t")
        now = datetime.now(timezone.utc)
        await self.jobs.pushMany(
            [
                NewJob({"n": 1}, "t", priority=0, runAt=now - timedelta(seconds=5)),
                NewJob({"n": 2}, "t", priority=5, runAt=now - timedelta(seconds=1)),
                NewJob({"n": 3}, "t", priority=0, runAt=now - timedelta(seconds=9)),
                NewJob({"n": 4}, "t", priority=9, runAt=now + timedelta(seconds=0.8)),
                NewJob({"n": 5}, "t", priority=5, runAt=now - timedelta(seconds=2)),
                NewJob({"n": 6}, "other", priority=99),
            ]
        )
        await self.startWorker(concurrency=1)
        await self.waitFor(
            "(SELECT count(*) = 4 FROM tx_ingest.jobs WHERE status = 'done')"
        )
        self.assertEqual([p["n"] for _, p in self.ran], [5, 2, 3, 1])
        await self.waitFor(
            "(SELECT status = 'done' FROM tx_ingest.jobs WHERE payload->>'n' = '4')"
        )
        self.assertEqual(
            await self.pool.runQuery(
                "SELECT status FROM tx_ingest.jobs WHERE job_type = 'other'"
            ),
            [("pending",)],
        )

    async def test_notifyWakesWorker(self) -> None:
        """
        With C{LISTEN}, a job pushed to an idle worker that polls once a
        minute runs at once, also after the listening connection was killed
        and came back.
        """
        self.record("t")
        await self.startWorker(listen=True, pollInterval=60.0)
        await self.waitFor("true")
        while not self.listener.listening:
            await sleep(0.02)
        await self.jobs.push({"n": 1}, "t")
        await self.waitFor("(SELECT bool_and(status = 'done') FROM tx_ingest.jobs)", 3)

        terminateBackends(self.dsn)
        await sleep(0.3)
        while not self.listener.listening:
            await sleep(0.02)
        for _ in range(20):
            try:
                await self.jobs.push({"n": 2}, "t")
                break
            except psycopg2.Error:
                await sleep(0.1)
        await self.waitFor(
            "(SELECT count(*) = 2 FROM tx_ingest.jobs WHERE status = 'done')", 3
        )
        self.flushLoggedErrors(psycopg2.OperationalError, psycopg2.InterfaceError)

    async def test_pollOnly(self) -> None:
        """
        Without C{LISTEN} the worker finds new jobs by polling.
        """
        self.record("t")
        await self.startWorker(pollInterval=0.1)
        await sleep(0.2)
        await self.jobs.push({"n": 1}, "t")
        await self.waitFor("(SELECT bool_and(status = 'done') FROM tx_ingest.jobs)", 3)

    async def test_orphansTakenBack(self) -> None:
        """
        Jobs running under a worker whose heartbeat is too old go back to
        pending (the attempt counts) and run again; the dead worker is
        forgotten.  A job that was on its last attempt is failed instead.
        """
        self.record("t")
        await self.jobs.pushMany(
            [NewJob({"n": 1}, "t"), NewJob({"n": 2}, "t", maxAttempts=1)]
        )
        await self.pool.runOperation(
            "INSERT INTO tx_ingest.workers (name, heartbeat_at)"
            " VALUES ('dead', now() - interval '1 hour');"
            "UPDATE tx_ingest.jobs SET status = 'running', locked_by = 'dead',"
            " locked_at = now(), attempts = 1"
        )
        await self.startWorker(orphanAfter=0.4)
        await self.waitFor(
            "(SELECT count(*) = 0 FROM tx_ingest.jobs WHERE status = 'running')"
        )
        await self.waitFor(
            "(SELECT count(*) = 1 FROM tx_ingest.jobs WHERE status = 'done')"
        )
        rows = await self.rows("status, attempts, last_error")
        lost = "WorkerLost: worker dead stopped while running this attempt"
        self.assertEqual(rows, [("done", 2, lost), ("failed", 1, lost)])
        self.assertEqual(
            await self.pool.runQuery("SELECT name FROM tx_ingest.workers"), [("w1",)]
        )

    async def test_restartTakesBackOwnJobs(self) -> None:
        """
        A worker starting under the name of a previous process first takes
        back what that process left running.
        """
        self.record("t")
        await self.jobs.push({"n": 1}, "t")
        await self.pool.runOperation(
            "UPDATE tx_ingest.jobs SET status = 'running', locked_by = 'w1',"
            " attempts = 1"
        )
        await self.startWorker()
        await self.waitFor("(SELECT bool_and(status = 'done') FROM tx_ingest.jobs)")
        self.assertEqual(await self.rows(), [(1, "done", 2)])

    async def test_gracefulShutdown(self) -> None:
        """
        Stopping lets a job that ends within the shutdown timeout finish,
        puts one that does not back to pending without counting its attempt,
        and removes the worker from the workers table.
        """

        @self.registry.task("t")
        async def slow(payload: Any, job: JobContext) -> None:
            await sleep(payload["seconds"])

        await self.jobs.pushMany(
            [NewJob({"seconds": 0.1}, "t"), NewJob({"seconds": 30}, "t")]
        )
        worker = await self.startWorker(shutdownTimeout=0.5)
        await self.waitFor(
            "(SELECT count(*) = 2 FROM tx_ingest.jobs WHERE status = 'running')"
        )
        started = time.monotonic()
        await worker.stop()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(
            await self.rows("status, attempts, locked_by"),
            [("done", 1, "w1"), ("pending", 0, None)],
        )
        self.assertEqual(
            await self.pool.runQuery("SELECT name FROM tx_ingest.workers"), []
        )

    async def test_retention(self) -> None:
        """
        Done jobs older than C{keepDone} are deleted in small batches; newer
        done jobs and failed jobs stay.
        """
        self.record("t")
        await self.pool.runOperation(
            "INSERT INTO tx_ingest.jobs (job_type, payload, status, finished_at)"
            " SELECT 'x', '{}', s, now() - a * interval '1 hour'"
            " FROM (VALUES ('done', 2), ('done', 3), ('done', 4), ('done', 0),"
            " ('failed', 5)) AS v(s, a)"
        )
        await self.startWorker(
            keepDone=3600.0, retentionInterval=0.05, retentionBatch=2
        )
        await self.waitFor("(SELECT count(*) = 2 FROM tx_ingest.jobs)")
        self.assertEqual(
            await self.rows("status, finished_at > now() - interval '1 minute'"),
            [("done", True), ("failed", False)],
        )

    async def test_keepNothing(self) -> None:
        """
        With C{keepDone} 0 a job is deleted as it completes.
        """
        self.record("t")
        await self.jobs.pushMany([NewJob({"n": n}, "t") for n in range(5)])
        await self.startWorker(keepDone=0)
        await self.waitFor("(SELECT count(*) = 0 FROM tx_ingest.jobs)")
        self.assertEqual(len(self.ran), 5)

    async def test_fencedOutcome(self) -> None:
        """
        A job taken back from this worker while it ran is not completed by
        it: the outcome is dropped and the row keeps its new owner.
        """
        gate: Deferred[None] = Deferred()

        @self.registry.task("t")
        async def wait(payload: Any, job: JobContext) -> None:
            await gate

        await self.jobs.push({}, "t")
        await self.startWorker()
        await self.waitFor("(SELECT bool_and(status = 'running') FROM tx_ingest.jobs)")
        await self.pool.runOperation(
            "UPDATE tx_ingest.jobs SET locked_by = 'other', attempts = 2"
        )
        gate.callback(None)
        await sleep(0.3)
        self.assertEqual(await self.rows("status, locked_by"), [("running", "other")])

    async def test_claimFollowsIndexAfterBulkLoad(self) -> None:
        """
        Right after a bulk load, before any ANALYZE, the claim still walks
        the pending index in order instead of sorting every pending row.
        """
        await self.pool.runOperation(
            "INSERT INTO tx_ingest.jobs (job_type, payload, priority)"
            " SELECT 't', '{}', g % 3 FROM generate_series(1, 50000) g"
        )
        plan = await ClaimStore(self.pool, self.schema, "w").claimPlan(10, ["t"])
        self.assertIn("Index Scan using jobs_claim", plan)
        self.assertNotIn("Seq Scan", plan)
        self.assertNotIn("Bitmap", plan)
        self.assertNotIn("JIT", plan)
