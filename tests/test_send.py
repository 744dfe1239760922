# -*- test-case-name: tests.test_send -*-
"""
Tests for L{tx_ingest.send}, over real loopback sockets against a fake server.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tx_ingest.send import (
    Progress,
    Rejection,
    Sender,
    SendResult,
    UnackedWindow,
    endpointDescription,
    run,
)


class FakeServerFactory(Factory):
    """
    Builds L{FakeServer} connections and keeps what all of them received.

    @ivar received: Every line received, over all connections, in order.
    @ivar connections: How many connections were accepted.
    @ivar refuse: How many of the first connections to refuse.
    @ivar dropAfter: Per connection number (1-based), the count of lines after
        which that connection is dropped without acking them.
    """

    def __init__(
        self,
        ackEvery: int = 10,
        refuse: int = 0,
        dropAfter: dict[int, int] | None = None,
        pauseFor: float = 0.0,
    ) -> None:
        """
        @param ackEvery: Ack after every this many lines.
        @param refuse: See L{refuse}.
        @param dropAfter: See L{dropAfter}.
        @param pauseFor: Seconds to stop reading after connecting.
        """
        self.ackEvery = ackEvery
        self.refuse = refuse
        self.dropAfter = dropAfter or {}
        self.pauseFor = pauseFor
        self.received: list[bytes] = []
        self.connections = 0

    def buildProtocol(self, addr: object) -> FakeServer:
        """
        @param addr: The peer's address.
        @return: A new connection, numbered.
        """
        self.connections += 1
        return FakeServer(self, self.connections)


@implementer(IHalfCloseableProtocol)
class FakeServer(Protocol):
    """
    A tx_ingest server reduced to its replies: rejects lines containing
    C{bad}, acks every few lines and at end of input, and can refuse or drop
    connections.
    """

    def __init__(self, factory: FakeServerFactory, number: int) -> None:
        """
        @param factory: The shared settings and record.
        @param number: This connection's number, from 1.
        """
        self.factory = factory
        self.number = number
        # A TCP transport, also a push producer: more than ITransport says.
        self.tcp: Any = None
        self.buffer = b""
        self.count = 0
        self.dropped = False

    def connectionMade(self) -> None:
        """
        Refuse, or pause reading for a while, as configured.
        """
        self.tcp = self.transport
        if self.number <= self.factory.refuse:
            self.reply({"error": "too_many_connections", "limit": 1})
            self.tcp.loseConnection()
        elif self.factory.pauseFor:
            self.tcp.pauseProducing()
            reactor.callLater(self.factory.pauseFor, self.tcp.resumeProducing)

    def reply(self, message: dict[str, object]) -> None:
        """
        @param message: One NDJSON reply.
        """
        self.tcp.write(json.dumps(message).encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        """
        Split lines, reply to each, and drop the connection when configured.

        @param data: Received bytes.
        """
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            if self.dropped:
                return
            if self.count == self.factory.dropAfter.get(self.number):
                # Closing (not aborting) still sends the acks already written.
                self.dropped = True
                self.tcp.loseConnection()
                return
            self.count += 1
            self.factory.received.append(line)
            if b"bad" in line:
                self.reply({"error": "bad_line", "line": self.count, "detail": "bad"})
            if self.count % self.factory.ackEvery == 0:
                self.reply({"ack": self.count})

    def readConnectionLost(self) -> None:
        """
        At the client's half-close, ack everything and close.
        """
        self.reply({"ack": self.count})
        self.tcp.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Nothing to do: the server never half-closes.
        """


def numbered(count: int, bad: frozenset[int] = frozenset()) -> list[bytes]:
    """
    Make input lines.

    @param count: How many.
    @param bad: Line numbers (1-based) whose line contains C{bad}.
    @return: The lines, each a JSON object with its number.
    """
    return [
        json.dumps({"n": n, "bad" if n in bad else "ok": True}).encode() + b"\n"
        for n in range(1, count + 1)
    ]


class SenderTests(TestCase):
    """
    Tests for L{Sender} against L{FakeServer} on a loopback socket.
    """

    def listen(self, factory: FakeServerFactory) -> TCP4ClientEndpoint:
        """
        Start the fake server on a free port (kept in C{self.portNumber}),
        stopped at cleanup.

        @param factory: The server.
        @return: A client endpoint for it.
        """
        port: IListeningPort = self.successResultOf(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        )
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.portNumber = address.port
        return TCP4ClientEndpoint(reactor, "127.0.0.1", address.port)

    def sender(
        self, endpoint: TCP4ClientEndpoint, lines: object, **kw: object
    ) -> Sender:
        """
        @param endpoint: The fake server.
        @param lines: The input.
        @param kw: More L{Sender} arguments.
        @return: A sender with short retry delays.
        """
        kw.setdefault("initialDelay", 0.01)
        kw.setdefault("maxDelay", 0.05)
        return Sender(reactor, endpoint, lines, **kw)  # type: ignore[arg-type]

    async def test_allAcked(self) -> None:
        """
        Every line is received once and acked, and the result counts them.
        """
        factory = FakeServerFactory(ackEvery=7)
        lines = numbered(1000)

        result = await self.sender(self.listen(factory), lines).send()

        self.assertEqual(factory.received, [line.rstrip(b"\n") for line in lines])
        self.assertEqual(
            result, SendResult(lines=1000, sent=1000, acked=1000, reconnects=0)
        )
        self.assertEqual(result.exitStatus, 0)

    async def test_missingFinalNewline(self) -> None:
        """
        Input lines without a newline (a file's last line) are terminated,
        and blank lines are sent as lines.
        """
        factory = FakeServerFactory()

        result = await self.sender(self.listen(factory), [b"{}", b"\n", b"{}"]).send()

        self.assertEqual(factory.received, [b"{}", b"", b"{}"])
        self.assertEqual(result.acked, 3)

    async def test_rejectsByInputLine(self) -> None:
        """
        Rejected lines are reported with their input line numbers, code and
        detail, and the exit status says so.
        """
        factory = FakeServerFactory(ackEvery=5)

        result = await self.sender(
            self.listen(factory), numbered(50, frozenset({3, 41}))
        ).send()

        self.assertEqual(
            result.rejected,
            [Rejection(3, "bad_line", "bad"), Rejection(41, "bad_line", "bad")],
        )
        self.assertEqual(result.acked, 50)
        self.assertEqual(result.exitStatus, 1)

    async def test_resendAfterDrop(self) -> None:
        """
        When the server drops connections part-way, the sender reconnects and
        resends from the last ack: every line arrives at least once, rejects
        keep their input line numbers (even on the second connection, whose
        numbering restarts) and are reported once, and reconnects are counted.
        """
        factory = FakeServerFactory(ackEvery=10, dropAfter={1: 125, 2: 37})
        lines = numbered(300, frozenset({121, 150, 290}))

        result = await self.sender(self.listen(factory), lines).send()

        expected = [line.rstrip(b"\n") for line in lines]
        self.assertEqual(sorted(set(factory.received)), sorted(expected))
        # Acked at 120 then dropped at 125; acked at 120 + 30 then dropped.
        self.assertEqual(len(factory.received), 300 + 5 + 7)
        self.assertEqual(result.reconnects, 2)
        self.assertEqual(result.acked, 300)
        # Lines written before a drop but never read by the server count too.
        self.assertGreaterEqual(result.sent, len(factory.received))
        self.assertEqual([r.line for r in result.rejected], [121, 150, 290])

    async def test_refusedThenRetried(self) -> None:
        """
        A connection refused with C{too_many_connections} is retried after a
        backoff until the server accepts.
        """
        factory = FakeServerFactory(refuse=2)

        result = await self.sender(self.listen(factory), numbered(20)).send()

        self.assertEqual(factory.connections, 3)
        self.assertEqual(result.reconnects, 2)
        self.assertEqual(result.acked, 20)
        self.assertEqual(result.exitStatus, 0)

    async def test_giveUp(self) -> None:
        """
        After the allowed number of connections without progress, the sender
        gives up, with exit status 2.
        """
        factory = FakeServerFactory(refuse=100)

        result = await self.sender(self.listen(factory), numbered(5), retries=3).send()

        self.assertTrue(result.gaveUp)
        self.assertEqual(factory.connections, 4)
        self.assertEqual(result.acked, 0)
        self.assertEqual(result.exitStatus, 2)

    async def test_windowBoundsReading(self) -> None:
        """
        While the server does not read, the sender reads no more of its input
        than its window holds; once the server reads again, every line goes.
        """
        factory = FakeServerFactory(ackEvery=50, pauseFor=0.3)
        pulled = []

        def source() -> Iterator[bytes]:
            for line in numbered(20_000):
                pulled.append(line)
                yield line

        sending = self.sender(self.listen(factory), source(), maxLines=500).send()
        await deferLater(reactor, 0.2)
        self.assertEqual(len(pulled), 500)

        result = await sending
        self.assertEqual(result.acked, 20_000)
        self.assertEqual(len(factory.received), 20_000)

    async def test_cliExitStatus(self) -> None:
        """
        The command line sends a file and exits 1 when a line was rejected,
        printing a summary that names the rejected line.
        """
        factory = FakeServerFactory()
        self.listen(factory)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.writelines(numbered(30, frozenset({12})))
        stderr = io.StringIO()

        status = await run(
            reactor,
            [path, "--to", f"127.0.0.1:{self.portNumber}"],
            io.BytesIO(),
            stderr,
        )

        self.assertEqual(status, 1)
        self.assertIn("30 lines read, 30 acked, 1 rejected", stderr.getvalue())
        self.assertIn("line 12: bad_line: bad", stderr.getvalue())

    async def test_cliStdin(self) -> None:
        """
        C{-} reads standard input; a clean send exits 0, and C{--quiet}
        prints nothing.
        """
        factory = FakeServerFactory()
        self.listen(factory)
        stderr = io.StringIO()

        status = await run(
            reactor,
            ["-", "--quiet", "--to", f"tcp:127.0.0.1:{self.portNumber}"],
            io.BytesIO(b"".join(numbered(9))),
            stderr,
        )

        self.assertEqual(status, 0)
        self.assertEqual(len(factory.received), 9)
        self.assertEqual(stderr.getvalue(), "")


class HalfCloseableStringTransport(StringTransport):
    """
    A L{StringTransport} that records a half-close.

    @ivar writeClosed: Whether L{loseWriteConnection} was called.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        """
        Record the half-close.
        """
        self.writeClosed = True


class OneConnectionEndpoint:
    """
    A client endpoint connecting its protocol to a string transport once and
    failing afterwards.

    @ivar transport: The transport of the one connection.
    """

    def __init__(self) -> None:
        """
        Make the transport.
        """
        self.transport = HalfCloseableStringTransport()
        self.protocol: IProtocol | None = None

    def connect(self, factory: Factory) -> Deferred[IProtocol]:
        """
        @param factory: Builds the protocol.
        @return: The connected protocol, or a failure after the first call.
        """
        if self.protocol is not None:
            return fail(ConnectionRefusedError())
        self.protocol = factory.buildProtocol(None)
        assert self.protocol is not None
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class FinalAckTimeoutTests(SynchronousTestCase):
    """
    Tests for the wait for the last ack after the half-close, on a fake clock.
    """

    def test_timeoutAborts(self) -> None:
        """
        Once every line is written the sender half-closes; with no ack for
        C{finalAckTimeout} seconds after that, it aborts the connection and
        (with no retries allowed) gives up, leaving no delayed call behind.
        """
        clock = Clock()
        endpoint = OneConnectionEndpoint()
        sender = Sender(
            clock,
            endpoint,  # type: ignore[arg-type]
            [b"{}\n"],
            finalAckTimeout=5,
            retries=0,
        )

        sending = sender.send()
        self.assertEqual(endpoint.transport.value(), b"{}\n")
        self.assertTrue(endpoint.transport.writeClosed)
        clock.advance(4.9)
        self.assertFalse(endpoint.transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(endpoint.transport.disconnecting)

        assert endpoint.protocol is not None
        endpoint.protocol.connectionLost(Failure(ConnectionAborted()))
        result = self.successResultOf(sending)
        self.assertTrue(result.gaveUp)
        self.assertEqual((result.sent, result.acked), (1, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_ackRestartsTimeout(self) -> None:
        """
        Each ack after the half-close restarts the wait, and the ack of the
        last line ends the send once the server closes.
        """
        clock = Clock()
        endpoint = OneConnectionEndpoint()
        sender = Sender(
            clock,
            endpoint,  # type: ignore[arg-type]
            [b"{}\n", b"{}\n"],
            finalAckTimeout=5,
        )
        sending = sender.send()
        protocol = endpoint.protocol
        assert protocol is not None

        clock.advance(4)
        protocol.dataReceived(b'{"ack": 1}\n')
        clock.advance(4)
        self.assertFalse(endpoint.transport.disconnecting)
        protocol.dataReceived(b'{"ack": 2}\n')
        protocol.connectionLost(Failure(ConnectionDone()))

        self.assertEqual(self.successResultOf(sending).exitStatus, 0)
        self.assertEqual(clock.getDelayedCalls(), [])


class UnackedWindowTests(SynchronousTestCase):
    """
    Tests for L{UnackedWindow}.
    """

    def test_boundedByLines(self) -> None:
        """
        Lines are read from the input only while fewer than C{maxLines} are
        held; acks make room.
        """
        window = UnackedWindow(iter(numbered(10)), maxLines=3, maxBytes=10**6)

        data, count = window.takeChunk(10**6)
        self.assertEqual(count, 3)
        self.assertEqual(window.linesRead, 3)
        self.assertEqual(window.takeChunk(10**6), (b"", 0))

        self.assertEqual(window.ack(2), 2)
        self.assertEqual(window.takeChunk(10**6)[1], 2)
        self.assertEqual(window.firstUnacked, 3)

    def test_boundedByBytes(self) -> None:
        """
        The byte bound stops reading too, but a lone line always fits.
        """
        window = UnackedWindow(iter([b"x" * 100] * 3), maxLines=10, maxBytes=50)

        self.assertEqual(window.takeChunk(10**6)[1], 1)
        self.assertEqual(window.takeChunk(10**6)[1], 0)

    def test_rewind(self) -> None:
        """
        After a rewind, unacked lines are sent again, oldest first.
        """
        window = UnackedWindow(iter([b"a\n", b"b\n", b"c\n"]), 10, 10**6)
        window.takeChunk(4)
        window.ack(1)

        window.rewind()

        self.assertEqual(window.takeChunk(10**6), (b"b\nc\n", 2))
        self.assertTrue(window.allSent())
        self.assertFalse(window.done())
        window.ack(3)
        self.assertTrue(window.done())


class EndpointDescriptionTests(SynchronousTestCase):
    """
    Tests for L{endpointDescription}.
    """

    def test_hostPort(self) -> None:
        """
        C{HOST:PORT} and C{[IPV6]:PORT} become TCP endpoint strings; endpoint
        strings pass through.
        """
        self.assertEqual(
            endpointDescription("example.com:5000"), "tcp:host=example.com:port=5000"
        )
        self.assertEqual(
            endpointDescription("[::1]:5000"), "tcp:host=\\:\\:1:port=5000"
        )
        self.assertEqual(
            endpointDescription("tcp:127.0.0.1:5000"), "tcp:127.0.0.1:5000"
        )
        self.assertEqual(endpointDescription("unix:path=/s"), "unix:path=/s")


class ProgressTests(SynchronousTestCase):
    """
    Tests for L{Progress}.
    """

    def test_showAndClear(self) -> None:
        """
        The progress line is rewritten in place with the counts and the ack
        rate since the last update, and cleared at the end.
        """
        clock = Clock()
        sender = Sender(clock, None, [])  # type: ignore[arg-type]
        stream = io.StringIO()
        progress = Progress(sender, stream, clock)
        sender.result.sent = 300
        sender.result.acked = 200
        clock.advance(2)

        progress.show()

        self.assertEqual(
            stream.getvalue(),
            "\rsent 300 acked 200 rejected 0 reconnects 0 (100 lines/s)",
        )
        progress.clear()
        self.assertTrue(stream.getvalue().endswith("\r"))

    def test_showSurvivesErrors(self) -> None:
        """
        A failure while showing progress is logged, not raised, so the
        L{LoopingCall} that runs it keeps running.
        """
        clock = Clock()
        sender = Sender(clock, None, [])  # type: ignore[arg-type]
        stream = io.StringIO()
        stream.close()
        progress = Progress(sender, stream, clock)
        loop = LoopingCall(progress.show)
        loop.clock = clock
        loop.start(0.5)

        clock.advance(0.5)

        self.assertTrue(loop.running)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        loop.stop()
