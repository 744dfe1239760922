"""
The real thing: C{twistd -n ingest} started as a subprocess, fed over a
socket, stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal

import psycopg2
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

import tests
from tests.netclient import connect
from tests.pgfixture import createDatabase, dropDatabase
from tests.servicerun import ServiceProcess, twistdCommand


class TwistdTests(TestCase):
    """
    The plugin runs under twistd and stores what it accepts.
    """

    timeout = 120

    def test_ingestUnderTwistd(self) -> Deferred[None]:
        """
        Lines sent to C{twistd -n ingest --ack} are stored as jobs and
        acknowledged, a bad line gets its error reply, and SIGTERM stops the
        service cleanly after logging its shutdown.
        """
        dsn = createDatabase()
        self.addCleanup(dropDatabase, dsn)
        service = ServiceProcess(dsn, "--ack", "--type-field=kind")
        self.addCleanup(service.cleanup)
        service.start()

        async def run() -> None:
            await service.waitListening()
            client = await connect(service.port)
            lines = b"".join(b'{"kind":"k","n":%d}\n' % n for n in range(100))
            client.send(lines + b"oops\n", halfClose=True)
            replies = await client.closed
            self.assertEqual(
                replies[0],
                {"error": "invalid_json", "line": 101, "detail": replies[0]["detail"]},
            )
            self.assertEqual(replies[-1], {"ack": 101})
            with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
                cursor.execute(
                    "SELECT job_type, (payload->>'n')::int, status"
                    " FROM tx_ingest.jobs ORDER BY id"
                )
                rows = cursor.fetchall()
            connection.close()
            self.assertEqual(rows, [("k", n, "pending") for n in range(100)])
            service.signal(signal.SIGTERM)
            status = await service.wait()
            self.assertIn(status, (0, 143, -signal.SIGTERM))
            log = service.log()
            self.assertIn("flushed 0 messages at shutdown", log)
            self.assertNotIn("Traceback", log)

        return Deferred.fromCoroutine(run())


class TacTests(TestCase):
    """
    The C{.tac} file runs the same service, configured from the environment.
    """

    timeout = 120

    def test_tacFromEnvironment(self) -> Deferred[None]:
        """
        C{twistd -ny tx_ingest.tac} with C{TX_INGEST_*} variables and
        C{DATABASE_URL} listens where told and stores what it acknowledges.
        """
        dsn = createDatabase()
        self.addCleanup(dropDatabase, dsn)
        tac = os.path.join(os.path.dirname(tests.__file__), os.pardir, "tx_ingest.tac")
        service = ServiceProcess(dsn)
        service.argv = [
            *twistdCommand(),
            "-ny",
            os.path.abspath(tac),
            "--pidfile=",
            f"--logfile={service.logPath}",
        ]
        self.addCleanup(service.cleanup)
        environment = {
            **os.environ,
            "DATABASE_URL": dsn,
            "TX_INGEST_LISTEN": f"tcp:{service.port}:interface=127.0.0.1",
            "TX_INGEST_ACK": "1",
            "TX_INGEST_QUEUE_SIZE": "16",
        }
        service.start(environment)

        async def run() -> None:
            await service.waitListening()
            self.assertIn("queue-size=16", service.log())
            client = await connect(service.port)
            client.send(b'{"via":"tac"}\n', halfClose=True)
            self.assertEqual(await client.closed, [{"ack": 1}])
            with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
                cursor.execute("SELECT payload FROM tx_ingest.jobs")
                self.assertEqual(cursor.fetchall(), [({"via": "tac"},)])
            connection.close()
            service.signal(signal.SIGTERM)
            await service.wait()

        return Deferred.fromCoroutine(run())
