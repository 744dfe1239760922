# -*- test-case-name: tests.test_protocol -*-
"""
Unit tests for L{tx_ingest.protocol}: framing, replies, limits, acks and
pausing, on a L{StringTransport} and a L{Clock}.
"""

from __future__ import annotations

import simplejson
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tx_ingest.listener import IngestFactory, RefusingProtocol
from tx_ingest.protocol import NDJSONProtocol, ProtocolSettings
from tx_ingest.queue import Batch, MessageQueue
from tx_ingest.throttle import WarningThrottle


class HalfCloseTransport(StringTransport):
    """
    A L{StringTransport} that records pauses like a TCP transport.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))


def replies(transport: StringTransport) -> list[dict]:
    """
    @return: The NDJSON replies written so far.
    """
    return [simplejson.loads(line) for line in transport.value().splitlines()]


class Harness:
    """
    One factory, one queue, and helpers to connect protocols to transports.
    """

    def __init__(
        self,
        capacity: int = 100,
        maxConnections: int = 10,
        **settings: object,
    ) -> None:
        self.clock = Clock()
        self.queue = MessageQueue(self.clock, capacity)
        self.factory = IngestFactory(
            self.queue,
            self.clock,
            ProtocolSettings(**settings),  # type: ignore[arg-type]
            maxConnections,
            WarningThrottle(Logger(), self.clock),
        )

    def connect(self) -> tuple[NDJSONProtocol, StringTransport]:
        """
        @return: A connected protocol and its transport.
        """
        address = IPv4Address("TCP", "127.0.0.1", 4321)
        protocol = self.factory.buildProtocol(address)
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)
        return protocol, transport  # type: ignore[return-value]

    def takeAll(self) -> Batch:
        """
        @return: Everything queued, as one batch.
        """
        batch = self.queue.take(10**6)
        return self.successResultOf(batch)

    def successResultOf(self, d):  # type: ignore[no-untyped-def]
        """
        @return: The result of C{d} once the clock has turned.
        """
        results: list = []
        d.addBoth(results.append)
        self.clock.advance(0)
        assert results, "no result"
        return results[0]


class FramingTests(SynchronousTestCase):
    """
    Lines are framed by C{\\n}, whatever the packet boundaries.
    """

    def test_linesSplitAcrossChunks(self) -> None:
        """
        A line split across chunks, and several lines in one chunk, are all
        queued whole and numbered in order.
        """
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1}\n{"b"')
        protocol.dataReceived(b':2}\n{"c":3}\n')
        batch = h.takeAll()
        self.assertEqual(
            [(m.line, m.number) for m in batch.messages],
            [(b'{"a":1}', 1), (b'{"b":2}', 2), (b'{"c":3}', 3)],
        )
        self.assertEqual(transport.value(), b"")

    def test_carriageReturnStripped(self) -> None:
        """
        A trailing C{\\r} is not part of the line.
        """
        h = Harness()
        protocol, _ = h.connect()
        protocol.dataReceived(b'{"a":1}\r\n')
        self.assertEqual(h.takeAll().messages[0].line, b'{"a":1}')

    def test_blankLinesIgnoredButCounted(self) -> None:
        """
        Blank lines produce no message and no reply, but keep their number.
        """
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b'\n  \r\n{"a":1}\n')
        batch = h.takeAll()
        self.assertEqual([m.number for m in batch.messages], [3])
        self.assertEqual(transport.value(), b"")

    def test_byteByByte(self) -> None:
        """
        Delivering one byte at a time gives the same messages.
        """
        h = Harness()
        protocol, _ = h.connect()
        for byte in b'{"a":1}\n{"b":[1,2]}\n':
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(
            [m.line for m in h.takeAll().messages], [b'{"a":1}', b'{"b":[1,2]}']
        )


class RejectionTests(SynchronousTestCase):
    """
    Every rejected line gets exactly one reply naming its line and reason, and
    the connection stays open.
    """

    def assertRejected(self, line: bytes, code: str, **settings: object) -> dict:
        """
        Assert that C{line}, sent between two good lines, is refused with
        C{code} and the good lines are queued.
        """
        h = Harness(**settings)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"ok":1}\n' + line + b'\n{"ok":2}\n')
        [reply] = replies(transport)
        self.assertEqual((reply["error"], reply["line"]), (code, 2))
        self.assertIsInstance(reply["detail"], str)
        self.assertEqual([m.number for m in h.takeAll().messages], [1, 3])
        self.assertFalse(transport.disconnecting)
        return reply

    def test_invalidJson(self) -> None:
        """
        A line that is not JSON is C{invalid_json}.
        """
        self.assertRejected(b'{"a":', "invalid_json")

    def test_nanIsInvalid(self) -> None:
        """
        C{NaN} is not JSON.
        """
        self.assertRejected(b'{"a":NaN}', "invalid_json")

    def test_invalidUtf8(self) -> None:
        """
        Bytes that are not UTF-8 are C{invalid_utf8}.
        """
        reply = self.assertRejected(b'{"a":"\xff\xfe"}', "invalid_utf8")
        self.assertIn("byte 6", reply["detail"])

    def test_notAnObject(self) -> None:
        """
        JSON that is not an object is C{not_an_object}, saying what it was.
        """
        reply = self.assertRejected(b"[1,2]", "not_an_object")
        self.assertIn("array", reply["detail"])
        self.assertRejected(b'"x"', "not_an_object")
        self.assertRejected(b"null", "not_an_object")

    def test_deepNesting(self) -> None:
        """
        Nesting deeper than the parser allows is refused, not raised.
        """
        self.assertRejected(
            b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}",
            "invalid_json",
            maxLineBytes=10**6,
        )

    def test_hostileButValid(self) -> None:
        """
        Huge numbers and odd escapes that are valid JSON are accepted.
        """
        h = Harness(maxLineBytes=100000)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1e400,"b":-1e-400,"c":"\\ud83d\\ude00\\/"}\n')
        self.assertEqual(len(h.takeAll()), 1)
        self.assertEqual(transport.value(), b"")


class LineLengthTests(SynchronousTestCase):
    """
    A line over the limit is refused and discarded as it arrives; the next
    line is read normally.
    """

    def test_tooLongInOneChunk(self) -> None:
        """
        A complete over-long line is refused.
        """
        h = Harness(maxLineBytes=10)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":"0123456789"}\n{"b":1}\n')
        self.assertEqual(
            [(r["error"], r["line"]) for r in replies(transport)],
            [("line_too_long", 1)],
        )
        self.assertEqual([m.number for m in h.takeAll().messages], [2])

    def test_exactlyAtLimit(self) -> None:
        """
        A line of exactly the limit is accepted.
        """
        h = Harness(maxLineBytes=9)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":123}\r\n')
        self.assertEqual(len(h.takeAll()), 1)
        self.assertEqual(transport.value(), b"")

    def test_neverEndingLineStaysBounded(self) -> None:
        """
        A line with no newline in sight is refused once it passes the limit,
        and its further bytes are dropped instead of buffered.
        """
        h = Harness(maxLineBytes=100)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":"')
        for _ in range(1000):
            protocol.dataReceived(b"x" * 1000)
            self.assertLessEqual(len(protocol._partial), 101)
        self.assertEqual(replies(transport)[0]["error"], "line_too_long")
        protocol.dataReceived(b'xxx"}\n{"b":2}\n')
        self.assertEqual(len(replies(transport)), 1)
        self.assertEqual([m.number for m in h.takeAll().messages], [2])


class AckTests(SynchronousTestCase):
    """
    With acks on, settled lines are acknowledged cumulatively.
    """

    def test_ackAfterSettle(self) -> None:
        """
        Settling a batch acknowledges its lines, and rejected lines in
        between count as handled.
        """
        h = Harness(ack=True)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1}\nbad\n{"a":2}\n')
        self.assertEqual([r.get("error") for r in replies(transport)], ["invalid_json"])
        h.takeAll().settle()
        self.assertEqual(replies(transport)[-1], {"ack": 3})

    def test_refusedBySink(self) -> None:
        """
        A line the consumer refuses gets a C{rejected} reply before the ack
        covering it.
        """
        h = Harness(ack=True)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1}\n{"a":2}\n')
        h.takeAll().settle({1: "no"})
        self.assertEqual(
            replies(transport),
            [{"error": "rejected", "line": 2, "detail": "no"}, {"ack": 2}],
        )

    def test_ackInOrderOfBatches(self) -> None:
        """
        A later batch settled first does not acknowledge lines of an earlier
        batch still being written.
        """
        h = Harness(ack=True)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1}\n')
        first = h.takeAll()
        protocol.dataReceived(b'{"a":2}\n')
        second = h.takeAll()
        second.settle()
        self.assertEqual(transport.value(), b"")
        first.settle()
        self.assertEqual(replies(transport), [{"ack": 2}])

    def test_onlyRejectedLinesAcked(self) -> None:
        """
        A chunk of only bad lines is acknowledged once, right away.
        """
        h = Harness(ack=True)
        protocol, transport = h.connect()
        protocol.dataReceived(b"x\ny\n")
        self.assertEqual(replies(transport)[-1], {"ack": 2})
        self.assertEqual(len(replies(transport)), 3)

    def test_noAckWhenOff(self) -> None:
        """
        Without acks, settling writes nothing.
        """
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1}\n')
        h.takeAll().settle()
        self.assertEqual(transport.value(), b"")


class HalfCloseTests(SynchronousTestCase):
    """
    A client that half-closes gets every reply before the server closes.
    """

    def test_closeAfterSettled(self) -> None:
        """
        The connection closes only once every line is settled and acked; an
        unterminated last line still counts.
        """
        h = Harness(ack=True)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1}\n{"a":2}')
        protocol.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        h.takeAll().settle()
        self.assertEqual(replies(transport), [{"ack": 2}])
        self.assertTrue(transport.disconnecting)


class BackpressureTests(SynchronousTestCase):
    """
    The queue's cap holds across connections, and reading resumes below the
    low-water mark without losing or reordering lines.
    """

    def test_pauseAtCapAndResume(self) -> None:
        """
        Ten times the capacity sent at once is queued at most C{capacity} at
        a time, every connection is paused while full, and everything arrives
        in order per connection.
        """
        h = Harness(capacity=10)
        connections = [h.connect() for _ in range(3)]
        for index, (protocol, _) in enumerate(connections):
            protocol.dataReceived(
                b"".join(b'{"c":%d,"n":%d}\n' % (index, n) for n in range(100))
            )
        for _, transport in connections:
            self.assertEqual(transport.producerState, "paused")
        received: dict[int, list[int]] = {0: [], 1: [], 2: []}
        while any(len(v) < 100 for v in received.values()):
            self.assertLessEqual(len(h.queue), 10)
            batch = h.takeAll()
            for message in batch.messages:
                value = message.json()
                received[value["c"]].append(value["n"])
            batch.settle()
        for values in received.values():
            self.assertEqual(values, list(range(100)))
        self.assertEqual(h.queue.highestSize, 10)
        for _, transport in connections:
            self.assertEqual(transport.producerState, "producing")

    def test_repliesBackedUpPauseReading(self) -> None:
        """
        When the client stops reading replies, the connection stops reading
        lines until the replies drain.
        """
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b"bad\n")
        transport.producer.pauseProducing()
        protocol.dataReceived(b"bad\n")
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(replies(transport)), 1)
        transport.producer.resumeProducing()
        self.assertEqual(len(replies(transport)), 2)


class ConnectionCapTests(SynchronousTestCase):
    """
    The factory counts live connections and refuses extras.
    """

    def test_refuseBeyondCap(self) -> None:
        """
        The connection past the cap is told the limit and closed; closing
        one frees a place.
        """
        h = Harness(maxConnections=2)
        first, _ = h.connect()
        h.connect()
        refused = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(refused, RefusingProtocol)
        transport = StringTransport()
        refused.makeConnection(transport)
        self.assertEqual(
            replies(transport), [{"error": "too_many_connections", "limit": 2}]
        )
        self.assertTrue(transport.disconnecting)
        first.connectionLost(None)
        self.assertEqual(len(h.factory.connections), 1)
        self.assertIsInstance(
            h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)),
            NDJSONProtocol,
        )


class IdleTimeoutTests(SynchronousTestCase):
    """
    Silent clients are closed; clients waiting on the server are not.
    """

    def test_idleClosed(self) -> None:
        """
        After the idle timeout the client is told and disconnected.
        """
        h = Harness(idleTimeout=5)
        protocol, transport = h.connect()
        h.clock.advance(4)
        protocol.dataReceived(b"\n")
        h.clock.advance(4)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(2)
        self.assertEqual(replies(transport)[-1]["error"], "idle_timeout")
        self.assertTrue(transport.disconnecting)

    def test_notIdleWhileWaiting(self) -> None:
        """
        A client whose lines are not yet settled is not idle.
        """
        h = Harness(idleTimeout=5)
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"a":1}\n')
        h.clock.advance(20)
        self.assertFalse(transport.disconnecting)
