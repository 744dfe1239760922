"""
The real thing: C{twistd -n ingest} started as a subprocess, fed over a
socket, stopped with SIGTERM.
"""

from __future__ import annotations

import signal

import psycopg2
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.netclient import connect
from tests.pgfixture import createDatabase, dropDatabase
from tests.servicerun import ServiceProcess


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
                replies[0], {"error": "invalid_json", "line": 101, "detail": replies[0]["detail"]}
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
