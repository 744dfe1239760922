"""
The worker under C{twistd}: three C{--no-ingest} worker processes sharing one
database (scale-out, and crash recovery after SIGKILL), and one process that
both ingests and runs jobs.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import psycopg2
from twisted.trial.unittest import TestCase

from tests.pgfixture import createDatabase, dropDatabase
from tests.servicerun import ServiceProcess
from tests.test_worker_db import sleep

JOBS = 10_000


class WorkerProcessTests(TestCase):
    """
    Worker processes on one database.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        Create a migrated database holding L{JOBS} pending jobs.
        """
        self.dsn = createDatabase()
        self.addCleanup(dropDatabase, self.dsn)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """
        @return: The rows of C{sql}, run on a connection of its own.
        """
        connection = psycopg2.connect(self.dsn)
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    async def startWorkers(self, jobType: str, *options: str) -> list[ServiceProcess]:
        """
        Start three workers with a first one creating the schema, then load
        the jobs, then wait for all three to run.
        """
        workers = []
        for number in range(3):
            worker = ServiceProcess(
                self.dsn,
                "--no-ingest",
                "--tasks=tests.tasksample",
                f"--worker-name=w{number}",
                "--poll-interval=0.2",
                *options,
                listen=False,
            )
            self.addCleanup(worker.cleanup)
            worker.start()
            workers.append(worker)
        for worker in workers:
            await worker.waitListening()
            while "worker w" not in worker.log():
                await sleep(0.05)
        self.query(
            "INSERT INTO tx_ingest.jobs (job_type, payload)"
            f" SELECT '{jobType}', jsonb_build_object('n', g)"
            f" FROM generate_series(1, {JOBS}) g;"
            " NOTIFY tx_ingest_jobs"
        )
        return workers

    async def waitDone(self, timeout: float = 60.0) -> None:
        """
        Wait until every job is done.
        """
        deadline = time.monotonic() + timeout
        while (
            self.query("SELECT count(*) FROM tx_ingest.jobs WHERE status = 'done'")[0][
                0
            ]
            < JOBS
        ):
            if time.monotonic() > deadline:
                raise AssertionError(
                    self.query("SELECT status, count(*) FROM tx_ingest.jobs GROUP BY 1")
                )
            await sleep(0.1)

    async def stop(self, workers: list[ServiceProcess]) -> None:
        """
        Stop the workers still running with SIGTERM.
        """
        for worker in workers:
            assert worker.process is not None
            if worker.process.poll() is None:
                worker.signal(signal.SIGTERM)
        for worker in workers:
            await worker.wait()

    async def test_eachJobOnce(self) -> None:
        """
        Three workers run 10,000 jobs between them, each exactly once (one
        attempt each), and all three take part.
        """
        workers = await self.startWorkers("noop")
        await self.waitDone()
        self.assertEqual(
            self.query(
                "SELECT status, attempts, count(*) FROM tx_ingest.jobs GROUP BY 1, 2"
            ),
            [("done", 1, JOBS)],
        )
        shares = self.query(
            "SELECT locked_by, count(*) FROM tx_ingest.jobs GROUP BY 1 ORDER BY 1"
        )
        self.assertEqual([name for name, _ in shares], ["w0", "w1", "w2"])
        await self.stop(workers)
        self.assertEqual(self.query("SELECT count(*) FROM tx_ingest.workers"), [(0,)])

    async def test_sigkillMidRun(self) -> None:
        """
        When one of three workers is killed with SIGKILL mid-run, the others
        take back its jobs once its heartbeat is too old: every job ends
        C{done}, none is lost, none is left running.
        """
        workers = await self.startWorkers(
            "slow", "--orphan-after=1", "--concurrency=20"
        )
        while (
            self.query(
                "SELECT count(*) FROM tx_ingest.jobs WHERE status = 'done'"
                " AND locked_by = 'w0'"
            )[0][0]
            < 500
        ):
            await sleep(0.05)
        workers[0].signal(signal.SIGKILL)
        await workers[0].wait()
        await self.waitDone()
        self.assertEqual(
            self.query(
                "SELECT count(*), count(*) FILTER (WHERE status = 'done'),"
                " count(*) FILTER (WHERE attempts = 2) <= 20"
                " FROM tx_ingest.jobs"
            ),
            [(JOBS, JOBS, True)],
        )
        self.assertIn("took back", workers[1].log() + workers[2].log())
        await self.stop(workers)

    async def test_ingestAndRunInOneProcess(self) -> None:
        """
        C{twistd -n ingest --tasks ...} stores what it receives and runs it;
        a job whose handler keeps failing ends C{failed} with its error.
        """
        from tests.netclient import connect

        service = ServiceProcess(
            self.dsn,
            "--ack",
            "--type-field=type",
            "--tasks=tests.tasksample",
            "--keep-done=0",
        )
        self.addCleanup(service.cleanup)
        service.start()
        await service.waitListening()
        client = await connect(service.port)
        lines = b"".join(b'{"type":"noop","n":%d}\n' % n for n in range(50))
        client.send(lines + b'{"type":"broken"}\n', halfClose=True)
        replies = await client.closed
        self.assertEqual(replies[-1], {"ack": 51})
        deadline = time.monotonic() + 20
        while self.query("SELECT count(*) FROM tx_ingest.jobs")[0][0] > 1:
            self.assertLess(time.monotonic(), deadline)
            await sleep(0.05)
        while self.query("SELECT status FROM tx_ingest.jobs") != [("failed",)]:
            self.assertLess(time.monotonic(), deadline)
            await sleep(0.05)
        [(error, attempts)] = self.query(
            "SELECT last_error, attempts FROM tx_ingest.jobs"
        )
        self.assertEqual(attempts, 2)
        self.assertRegex(error, r"^RuntimeError: job \d+ is broken$")
        await self.stop([service])
        self.assertIn("unfinished jobs back to pending", service.log())
