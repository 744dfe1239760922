"""
End-to-end tests of the front end over real loopback sockets: replies, the
connection cap, half-close and backpressure.  The consumer is the test.
"""

from __future__ import annotations

import simplejson
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.netclient import ReplyCollector, connect
from tx_ingest.stream import IngestStream, listen


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """
    Wait (polling the real reactor) until C{condition()} is true.
    """
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


class FrontEndTests(TestCase):
    """
    The listener, its replies and its limits, with real sockets.
    """

    async def startStream(self, **settings: object) -> IngestStream:
        stream = await listen(reactor, "tcp:0:interface=127.0.0.1", **settings)
        self.addCleanup(lambda: Deferred.fromCoroutine(stream.stop(0)))
        return stream

    def port(self, stream: IngestStream) -> int:
        return stream.ports[0].getHost().port

    def test_repliesAndAcks(self) -> Deferred[None]:
        """
        A client that sends good and bad lines then half-closes gets one
        error per bad line, a final ack covering every line, and then the
        server closes.
        """

        async def run() -> None:
            stream = await self.startStream(ack=True, maxLineBytes=20)
            client = await connect(self.port(stream))
            client.send(
                b'{"a":1}\nnope\n[1]\n\xff\n{"b":"' + b"x" * 50 + b'"}\n{"c":2}',
                halfClose=True,
            )
            stored = []
            async for batch in stream.batches(10):
                stored += [(m.number, m.line) for m in batch.messages]
                batch.settle()
                if len(stored) == 2:
                    break
            replies = await client.closed
            self.assertEqual(stored, [(1, b'{"a":1}'), (6, b'{"c":2}')])
            errors = [(r["error"], r["line"]) for r in replies if "error" in r]
            self.assertEqual(
                errors,
                [
                    ("invalid_json", 2),
                    ("not_an_object", 3),
                    ("invalid_utf8", 4),
                    ("line_too_long", 5),
                ],
            )
            self.assertEqual(replies[-1], {"ack": 6})

        return Deferred.fromCoroutine(run())

    def test_connectionCap(self) -> Deferred[None]:
        """
        The connection past the cap is refused with the limit and closed, the
        others keep working, and the count stays exact after abrupt resets.
        """

        async def run() -> None:
            stream = await self.startStream(maxConnections=3, ack=True)
            port = self.port(stream)
            clients = [await connect(port) for _ in range(3)]
            await until(lambda: len(stream.factory.connections) == 3)
            extra = await connect(port)
            self.assertEqual(
                await extra.closed, [{"error": "too_many_connections", "limit": 3}]
            )
            clients[0].transport.abortConnection()
            clients[1].transport.loseWriteConnection()
            await until(lambda: len(stream.factory.connections) == 1)
            self.assertEqual(await clients[1].closed, [])
            clients.append(await connect(port))
            await until(lambda: len(stream.factory.connections) == 2)
            clients[2].send(b'{"still":"here"}\n')
            batch = await stream.queue.take(10)
            self.assertEqual(batch.messages[0].line, b'{"still":"here"}')
            batch.settle()
            await clients[2].waitFor(lambda r: r.get("ack") == 1)
            for client in clients:
                client.transport.abortConnection()
            await until(lambda: len(stream.factory.connections) == 0)

        return Deferred.fromCoroutine(run())

    def test_backpressureHoldsCap(self) -> Deferred[None]:
        """
        Ten times the queue size pushed by several clients through a stalled
        consumer never puts more than the queue size in memory, pauses the
        clients, and arrives complete and in order per connection.
        """

        async def run() -> None:
            size = 50
            stream = await self.startStream(queueSize=size, ack=True)
            port = self.port(stream)
            clients: list[ReplyCollector] = []
            perClient = 300
            for c in range(3):
                client = await connect(port)
                clients.append(client)
                client.send(
                    b"".join(
                        b'{"c":%d,"n":%d,"pad":"%s"}\n' % (c, n, b"p" * 200)
                        for n in range(perClient)
                    ),
                    halfClose=True,
                )
            await until(lambda: stream.queue.paused)
            await deferLater(reactor, 0.2, lambda: None)
            self.assertEqual(len(stream.queue), size)
            seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
            async for batch in stream.batches(7):
                self.assertLessEqual(len(stream.queue), size)
                for message in batch.messages:
                    value = simplejson.loads(message.line)
                    seen[value["c"]].append(value["n"])
                await deferLater(reactor, 0.001, lambda: None)
                batch.settle()
                if sum(map(len, seen.values())) == 3 * perClient:
                    break
            for values in seen.values():
                self.assertEqual(values, list(range(perClient)))
            self.assertEqual(stream.queue.highestSize, size)
            self.assertGreater(stream.queue.pauses, 1)
            for client in clients:
                replies = await client.closed
                self.assertEqual(replies[-1], {"ack": perClient})

        return Deferred.fromCoroutine(run())
