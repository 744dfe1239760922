# -*- test-case-name: tests.test_ingest -*-
"""
Integration of the whole ingest path in one process: the service that
L{tx_ingest.tap.makeService} builds (listener, bounded queue, sink, healing
pool, migrations, job store), fed over real loopback sockets and writing to
a fresh database on the test PostgreSQL.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from faults import until
from tests.netclient import ReplyCollector, connect
from tests.pgfixture import createDatabase, dropDatabase
from tx_ingest.service import DatabaseService, IngestService
from tx_ingest.tap import Options, makeService


def query(dsn: str, sql: str, *parameters: object) -> list[tuple[Any, ...]]:
    """
    Run one query on its own connection and return every row.
    """
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, parameters)
            return cursor.fetchall()
    finally:
        connection.close()


def numbered(connection: int, count: int, start: int = 0) -> bytes:
    """
    C{count} lines of client C{connection}, each naming its client and index.
    """
    return b"".join(
        b'{"c":%d,"n":%d,"pad":"%s"}\n' % (connection, n, b"x" * 30)
        for n in range(start, start + count)
    )


class RunningService:
    """
    An in-process ingest service on an ephemeral loopback port.

    @ivar service: The L{IngestService}.
    @ivar database: Its L{DatabaseService}.
    @ivar port: Its TCP port.
    """

    def __init__(self, service: IngestService) -> None:
        self.service = service
        self.database = next(
            child for child in service if isinstance(child, DatabaseService)
        )
        self.port = 0

    async def start(self) -> None:
        """
        Listen, start, and wait until the schema is migrated.
        """
        self.service.privilegedStartService()
        self.service.startService()
        await self.database.ready
        self.port = self.service.stream.ports[0].getHost().port

    async def stop(self) -> None:
        """
        Stop the service if it still runs.
        """
        if self.service.running:
            await self.service.stopService()


class IngestTests(TestCase):
    """
    Lines sent over sockets end up as job rows, answered and acknowledged as
    the README says.
    """

    timeout = 60

    async def startService(self, *arguments: str) -> RunningService:
        """
        Build the service as C{twistd ingest --ack} would with C{arguments},
        on a fresh database, and start it.
        """
        self.dsn = createDatabase()
        self.addCleanup(dropDatabase, self.dsn)
        options = Options()
        options.parseOptions(
            [
                "--listen=tcp:0:interface=127.0.0.1",
                f"--dsn={self.dsn}",
                "--ack",
                *arguments,
            ]
        )
        running = RunningService(makeService(options))  # type: ignore[arg-type]
        self.addCleanup(lambda: Deferred.fromCoroutine(running.stop()))
        await running.start()
        return running

    async def connect(self, running: RunningService) -> ReplyCollector:
        """
        Connect a client, aborted at cleanup if still open.
        """
        client = await connect(running.port)
        self.addCleanup(
            lambda: None if client.closed.called else client.transport.abortConnection()
        )
        return client

    def rows(self, sql: str, *parameters: object) -> list[tuple[Any, ...]]:
        """
        Query the test database.
        """
        return query(self.dsn, sql, *parameters)

    def run_(self, coroutine: Callable[[], Any]) -> Deferred[None]:
        """
        Run an C{async} test body.
        """
        return Deferred.fromCoroutine(coroutine())

    def test_manyConnectionsStoredOnce(self) -> Deferred[None]:
        """
        Several connections each sending thousands of lines get a final ack
        equal to their line count and no error, and every line is stored
        exactly once.
        """

        async def body() -> None:
            running = await self.startService()
            clients, perClient = 4, 5000
            connections = [await self.connect(running) for _ in range(clients)]
            for number, client in enumerate(connections):
                client.send(numbered(number, perClient), halfClose=True)
            for client in connections:
                replies = await client.closed
                self.assertEqual(replies[-1], {"ack": perClient})
                self.assertEqual([r for r in replies if "error" in r], [])
            rows = self.rows(
                "SELECT (payload->>'c')::int, (payload->>'n')::int FROM tx_ingest.jobs"
            )
            self.assertEqual(len(rows), clients * perClient)
            self.assertEqual(
                set(rows),
                {(c, n) for c in range(clients) for n in range(perClient)},
            )

        return self.run_(body)

    def test_poisonRowsRejectedAlone(self) -> Deferred[None]:
        """
        A C{\\u0000} escape, a lone surrogate escape and a number PostgreSQL
        cannot hold, inside a big batch, are each rejected with
        C{{"error": "rejected", "line": N}}; every other line of the batch is
        stored and the final ack covers them all.
        """

        async def body() -> None:
            running = await self.startService("--batch-size=5000", "--queue-size=5000")
            total = 3000
            poison = {
                700: b'{"s":"\\u0000"}',
                1500: b'{"s":"\\ud800"}',
                2200: b'{"n":1e1000000}',
            }
            lines = [
                poison.get(number, b'{"n":%d}' % number)
                for number in range(1, total + 1)
            ]
            client = await self.connect(running)
            client.send(b"\n".join(lines) + b"\n", halfClose=True)
            replies = await client.closed
            errors = [r for r in replies if "error" in r]
            self.assertEqual(
                [(r["error"], r["line"]) for r in errors],
                [("rejected", number) for number in sorted(poison)],
            )
            self.assertTrue(all(r["detail"] for r in errors))
            self.assertEqual(replies[-1], {"ack": total})
            stored = self.rows(
                "SELECT (payload->>'n')::int FROM tx_ingest.jobs ORDER BY id"
            )
            self.assertEqual(
                [n for (n,) in stored],
                [n for n in range(1, total + 1) if n not in poison],
            )

        return self.run_(body)

    def test_dedupeAcrossConnections(self) -> Deferred[None]:
        """
        With C{--dedupe-field}, a key sent again on the same connection and
        again on a second connection (a client resending after a drop) is
        stored once, and both connections are fully acked; lines without
        the field are never deduplicated.
        """

        async def body() -> None:
            running = await self.startService("--dedupe-field=key")
            keyed = b"".join(b'{"key":"k%d","n":%d}\n' % (n, n) for n in range(200))
            first = await self.connect(running)
            first.send(keyed + keyed + b'{"unkeyed":1}\n')
            await first.waitFor(lambda reply: reply.get("ack") == 401)
            second = await self.connect(running)
            second.send(keyed + b'{"unkeyed":1}\n', halfClose=True)
            self.assertEqual((await second.closed)[-1], {"ack": 201})
            first.send(b"", halfClose=True)
            self.assertEqual((await first.closed)[-1], {"ack": 401})
            keys = self.rows(
                "SELECT dedupe_key, count(*) FROM tx_ingest.jobs"
                " GROUP BY dedupe_key ORDER BY dedupe_key"
            )
            self.assertEqual(
                keys, sorted([(f"k{n}", 1) for n in range(200)]) + [(None, 2)]
            )

        return self.run_(body)

    def test_typeField(self) -> Deferred[None]:
        """
        C{--type-field} takes a line's job type from that field when it holds
        a string, and C{--job-type} otherwise.
        """

        async def body() -> None:
            running = await self.startService("--type-field=kind", "--job-type=misc")
            client = await self.connect(running)
            client.send(
                b'{"kind":"email","n":1}\n{"kind":"sms","n":2}\n{"kind":5,"n":3}\n'
                b'{"n":4}\n{"kind":null,"n":5}\n{"kind":{"a":1},"n":6}\n',
                halfClose=True,
            )
            self.assertEqual((await client.closed)[-1], {"ack": 6})
            self.assertEqual(
                self.rows(
                    "SELECT (payload->>'n')::int, job_type FROM tx_ingest.jobs"
                    " ORDER BY 1"
                ),
                [
                    (1, "email"),
                    (2, "sms"),
                    (3, "misc"),
                    (4, "misc"),
                    (5, "misc"),
                    (6, "misc"),
                ],
            )

        return self.run_(body)

    def test_loneLineAckedPromptly(self) -> Deferred[None]:
        """
        With C{--batch-size 1} and one line at a time, each line is stored
        and acked promptly: no batch waits to fill or for a timer.
        """

        async def body() -> None:
            running = await self.startService("--batch-size=1")
            client = await self.connect(running)
            delays = []
            for number in range(1, 11):
                sent = time.monotonic()
                client.send(b'{"n":%d}\n' % number)
                await client.waitFor(lambda reply, n=number: reply.get("ack") == n)
                delays.append(time.monotonic() - sent)
                self.assertEqual(
                    self.rows("SELECT count(*) FROM tx_ingest.jobs"), [(number,)]
                )
            self.assertLess(statistics.median(delays), 0.25, delays)
            self.assertLess(max(delays), 2.0, delays)

        return self.run_(body)

    def test_clientNotReadingRepliesIsPaused(self) -> Deferred[None]:
        """
        A client that sends many bad lines and never reads the replies is
        paused once its unread replies pile up: the server stops reading it
        (so the replies it holds stay bounded) while another client is
        served as usual.
        """

        async def body() -> None:
            running = await self.startService()
            factory = running.service.stream.factory
            greedy = DeafClient()
            await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", running.port), greedy
            )
            self.addCleanup(greedy.transport.abortConnection)
            await until(lambda: len(factory.connections) == 1, 10, "connected")
            (server,) = factory.connections
            badLine = b"x" * 99 + b"\n"
            total = 200_000
            greedy.transport.write(badLine * total)

            def serverPaused() -> bool:
                return server.transport not in reactor.getReaders()

            await until(serverPaused, 20, "the server paused the greedy client")
            read = server.lineNumber
            other = await self.connect(running)
            other.send(numbered(1, 1000), halfClose=True)
            replies = await other.closed
            self.assertEqual(replies, [{"ack": 1000}])
            self.assertEqual(
                self.rows("SELECT count(*) FROM tx_ingest.jobs"), [(1000,)]
            )
            self.assertTrue(serverPaused())
            self.assertEqual(server.lineNumber, read)
            self.assertLess(read, total // 4)
            self.assertTrue(greedy.writesBlocked)

            greedy.transport.abortConnection()
            await until(lambda: not factory.connections, 10, "greedy gone")

        return self.run_(body)

    def test_gracefulShutdownWritesAccepted(self) -> Deferred[None]:
        """
        Lines accepted but not yet written when the service is told to stop
        (the jobs table is locked, so they wait in the queue) are all stored
        before the stop completes, and every client gets a final ack for
        exactly the lines stored from it.
        """

        async def body() -> None:
            running = await self.startService("--shutdown-timeout=30")
            stream = running.service.stream
            locker = psycopg2.connect(self.dsn)
            self.addCleanup(locker.close)
            with locker.cursor() as cursor:
                cursor.execute("LOCK TABLE tx_ingest.jobs IN ACCESS EXCLUSIVE MODE")
            clients = [await self.connect(running) for _ in range(3)]
            for number, client in enumerate(clients):
                client.send(numbered(number, 3000))
            await until(lambda: stream.queue.paused, 20, "the queue filled")
            accepted = len(stream.queue) + stream.queue.inFlight

            stopping = running.service.stopService()
            locker.rollback()
            await stopping
            stored = self.rows("SELECT count(*) FROM tx_ingest.jobs")[0][0]
            self.assertEqual(stored, running.service.sink.written)
            self.assertGreaterEqual(stored, accepted)
            for number, client in enumerate(clients):
                replies = await client.closed
                (count,) = self.rows(
                    "SELECT count(*) FROM tx_ingest.jobs"
                    " WHERE (payload->>'c')::int = %s",
                    number,
                )[0]
                if count:
                    self.assertEqual(replies[-1], {"ack": count})
                else:
                    self.assertEqual(replies, [])
            self.assertGreater(stored, 0)

        return self.run_(body)

    def test_stopReturnsAfterConnectionsClosed(self) -> Deferred[None]:
        """
        When the service's stop completes, every client connection is
        closed, so nothing of the final acks is left in a buffer that
        twistd's reactor shutdown would drop.
        """

        async def body() -> None:
            running = await self.startService()
            clients = [await self.connect(running) for _ in range(3)]
            for number, client in enumerate(clients):
                client.send(numbered(number, 2000))
            await until(
                lambda: running.service.sink.written > 0, 20, "some lines written"
            )
            await running.service.stopService()
            self.assertEqual(running.service.stream.factory.connections, set())

        return self.run_(body)


class DeafClient(Protocol):
    """
    A client that never reads what the server sends, with a tiny receive
    buffer, and notes when its own writes back up.

    @ivar writesBlocked: Whether the transport ever told it to stop writing.
    """

    writesBlocked = False

    def connectionMade(self) -> None:
        """
        Stop reading at once and shrink the receive buffer.
        """
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.pauseProducing()
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """
        The write buffer is full: the server stopped reading.
        """
        self.writesBlocked = True

    def resumeProducing(self) -> None:
        """
        The write buffer drained.
        """

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
