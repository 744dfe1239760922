# -*- test-case-name: tests.test_fuzz -*-
"""
Property-based fuzzing of the NDJSON wire protocol with hypothesis: random
bytes, random JSON documents and random splits of the same bytes into
packets.  Whatever arrives, every line gets exactly one outcome (queued, or
exactly one error reply naming it), line numbers match the input, nothing
escapes the protocol, and the outcome does not depend on how the bytes were
split.

Most examples run in memory (L{StringTransport}, L{Clock}); one smaller
property replays generated inputs over a real loopback socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from faults import until
from tests.netclient import connect
from tx_ingest.protocol import NDJSONProtocol, ProtocolSettings
from tx_ingest.queue import MessageQueue
from tx_ingest.stream import IngestStream, listen
from tx_ingest.throttle import WarningThrottle

#: The longest line in these tests, small so that long lines occur.
MAX_LINE = 120

#: A queue this small pauses the connection often, exercising its stash.
QUEUE_SIZE = 3

#: The error codes a line can get from the protocol itself.
LINE_ERRORS = {"invalid_utf8", "invalid_json", "not_an_object", "line_too_long"}


@dataclass(frozen=True)
class Result:
    """
    What a connection made of its input.

    @ivar queued: C{(line number, bytes)} of each queued line, in order.
    @ivar errors: C{(line number, code, detail)} of each error reply.
    @ivar acks: Every ack, in order.
    @ivar closed: Whether the server closed the connection at the end.
    """

    queued: tuple[tuple[int, bytes], ...]
    errors: tuple[tuple[int, str, str], ...]
    acks: tuple[int, ...]
    closed: bool

    @property
    def outcome(self) -> tuple[object, ...]:
        """
        What must not depend on how the input was split: the queued lines,
        the error replies, the final ack and the close (intermediate acks
        depend on when the consumer settles).
        """
        return (self.queued, self.errors, self.acks[-1:], self.closed)


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    Split C{data} at the given offsets (taken modulo its length).
    """
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def parseReplies(raw: bytes) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """
    Sort reply lines into errors and acks; anything else fails the test.
    """
    errors = []
    acks = []
    for line in raw.splitlines():
        reply = json.loads(line)
        if "ack" in reply:
            assert set(reply) == {"ack"}, reply
            acks.append(reply["ack"])
        else:
            assert set(reply) == {"error", "line", "detail"}, reply
            errors.append((reply["line"], reply["error"], reply["detail"]))
    return tuple(errors), tuple(acks)


def feed(chunks: list[bytes], maxLine: int = MAX_LINE) -> Result:
    """
    Feed chunks to one in-memory connection with acks on, draining its
    queue after each chunk as a consumer would, then half-close.
    """
    clock = Clock()
    queue = MessageQueue(clock, QUEUE_SIZE)
    protocol = NDJSONProtocol(
        queue,
        ProtocolSettings(maxLineBytes=maxLine, idleTimeout=0, ack=True),
        clock,
        WarningThrottle(Logger(), clock),
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    queued: list[tuple[int, bytes]] = []

    def drain() -> None:
        while len(queue):
            taken = queue.take(QUEUE_SIZE)
            batches: list[Any] = []
            taken.addCallback(batches.append)
            (batch,) = batches
            queued.extend((message.number, message.line) for message in batch.messages)
            batch.settle()

    for chunk in chunks:
        protocol.dataReceived(chunk)
        drain()
    protocol.readConnectionLost()
    drain()
    assert not clock.getDelayedCalls(), clock.getDelayedCalls()
    errors, acks = parseReplies(transport.value())
    return Result(tuple(queued), errors, acks, transport.disconnecting)


def expectedLines(data: bytes, maxLine: int = MAX_LINE) -> list[bytes | None]:
    """
    The lines of C{data} as the README numbers them: split on C{\\n}, one
    trailing C{\\r} stripped, an unterminated last line counted; L{None}
    stands for a line too long to be looked at.
    """
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    lines: list[bytes | None] = []
    for piece in pieces:
        line = piece[:-1] if piece.endswith(b"\r") else piece
        lines.append(None if len(line) > maxLine else line)
    return lines


def strictJson(line: bytes) -> object:
    """
    Parse a line as strict JSON (no NaN or Infinity).

    @raise ValueError: If it is not.
    """

    def refuse(constant: str) -> object:
        raise ValueError(constant)

    return json.loads(line.decode("utf-8"), parse_constant=refuse)


def checkOutcomes(
    case: TestCase | SynchronousTestCase, data: bytes, result: Result
) -> None:
    """
    Check that every line of C{data} got exactly one correct outcome and
    that the acks and the close are right.
    """
    lines = expectedLines(data)
    queuedNumbers = [number for number, _ in result.queued]
    errorNumbers = [number for number, _, _ in result.errors]
    case.assertEqual(queuedNumbers, sorted(queuedNumbers))
    case.assertEqual(errorNumbers, sorted(errorNumbers))
    outcomes = queuedNumbers + errorNumbers
    case.assertEqual(len(outcomes), len(set(outcomes)), "a line got two outcomes")

    expected = {
        number
        for number, line in enumerate(lines, 1)
        if line is None or (line and not line.isspace())
    }
    case.assertEqual(set(outcomes), expected)
    for number, line in result.queued:
        case.assertEqual(line, lines[number - 1])
        case.assertIsInstance(strictJson(line), dict)
    for number, code, detail in result.errors:
        case.assertIn(code, LINE_ERRORS)
        case.assertTrue(detail)
        line = lines[number - 1]
        if line is None:
            case.assertEqual(code, "line_too_long")
            continue
        case.assertNotEqual(code, "line_too_long")
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            case.assertEqual(code, "invalid_utf8")
            continue
        try:
            value = strictJson(line)
        except (ValueError, RecursionError):
            continue
        case.assertFalse(isinstance(value, dict), (line, code, detail))

    case.assertEqual(list(result.acks), sorted(set(result.acks)))
    case.assertEqual(result.acks[-1:], (len(lines),) if lines else ())
    case.assertTrue(result.closed)


# Pieces that make framing interesting: newlines, CRs, valid and broken JSON,
# invalid UTF-8, whitespace, and runs long enough to pass MAX_LINE.
_pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"\n",
            b"\r\n",
            b"\r",
            b" ",
            b"\t\n",
            b"{}",
            b'{"a":1}',
            b'{"a":[1,{"b":null}]}\n',
            b"[1]",
            b"NaN",
            b'{"x":NaN}',
            b'"s"',
            b"\xff",
            b"\xc3",
            b"\xe2\x82\xac",
            b'{"s":"\\u0000"}',
            b"x" * (MAX_LINE + 1),
        ]
    ),
)
randomInput = st.lists(_pieces, max_size=30).map(b"".join)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
jsonValues = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def jsonInput(draw: st.DrawFn) -> bytes:
    """
    Lines that are mostly JSON documents (objects and others, ASCII-escaped
    or not, some with CRLF), with the odd garbage line between them.
    """
    lines = []
    for value in draw(st.lists(jsonValues, max_size=12)):
        text = json.dumps(value, ensure_ascii=draw(st.booleans()))
        lines.append(text.encode("utf-8") + draw(st.sampled_from([b"\n", b"\r\n"])))
        if draw(st.integers(0, 5)) == 0:
            lines.append(draw(st.binary(max_size=10)).replace(b"\n", b"") + b"\n")
    return b"".join(lines)


fuzzSettings = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class ProtocolFuzzTests(SynchronousTestCase):
    """
    The protocol in memory, under hypothesis.
    """

    @fuzzSettings
    @given(randomInput, st.lists(st.integers(min_value=0), max_size=20))
    def test_randomBytes(self, data: bytes, cuts: list[int]) -> None:
        """
        Random bytes, however split into packets, give every non-blank line
        exactly one outcome with the right number and kind, acks that only
        grow and end at the line count, the same result as the unsplit
        bytes, and a close after the half-close.
        """
        whole = feed([data])
        checkOutcomes(self, data, whole)
        self.assertEqual(feed(splitAt(data, cuts)).outcome, whole.outcome)
        self.assertEqual(feed([bytes([b]) for b in data]).outcome, whole.outcome)

    @fuzzSettings
    @given(jsonInput(), st.lists(st.integers(min_value=0), max_size=20))
    def test_jsonDocuments(self, data: bytes, cuts: list[int]) -> None:
        """
        Random JSON documents: every object short enough is queued with its
        exact bytes, every other document gets exactly one error reply, and
        the result is the same however the bytes are split.
        """
        whole = feed([data])
        checkOutcomes(self, data, whole)
        for number, line in enumerate(expectedLines(data), 1):
            try:
                isObject = line is not None and isinstance(strictJson(line), dict)
            except (ValueError, UnicodeDecodeError):
                isObject = False
            self.assertEqual(isObject, (number, line) in whole.queued, (number, line))
        self.assertEqual(feed(splitAt(data, cuts)).outcome, whole.outcome)

    @fuzzSettings
    @given(
        st.lists(jsonValues.map(lambda v: json.dumps({"v": v}).encode()), max_size=8),
        st.lists(st.integers(min_value=0), max_size=20),
    )
    def test_longLinesLongerLimit(self, values: list[bytes], cuts: list[int]) -> None:
        """
        With a limit near the documents' sizes, a line is refused as too
        long exactly when it is longer than the limit, however split.
        """
        limit = 40
        data = b"\n".join(values) + b"\n" if values else b""
        whole = feed([data], maxLine=limit)
        tooLong = {
            number for number, code, _ in whole.errors if code == "line_too_long"
        }
        self.assertEqual(
            tooLong,
            {number for number, value in enumerate(values, 1) if len(value) > limit},
        )
        self.assertEqual(
            [number for number, _ in whole.queued],
            [number for number, value in enumerate(values, 1) if len(value) <= limit],
        )
        self.assertEqual(
            feed(splitAt(data, cuts), maxLine=limit).outcome, whole.outcome
        )


class SocketFuzzTests(TestCase):
    """
    Generated inputs over a real loopback socket give the same result as in
    memory.
    """

    timeout = 60

    def test_overSocket(self) -> Deferred[None]:
        """
        Inputs generated by hypothesis (random bytes and JSON lines, split
        into separate writes) sent over TCP give each line the same outcome,
        error replies and final ack as the in-memory protocol, and the
        server closes after the half-close.
        """
        cases: list[tuple[bytes, list[bytes]]] = []

        @settings(max_examples=25, deadline=None, database=None)
        @given(
            randomInput | jsonInput(), st.lists(st.integers(min_value=0), max_size=8)
        )
        def collect(data: bytes, cuts: list[int]) -> None:
            cases.append((data, splitAt(data, cuts)))

        collect()

        async def body() -> None:
            for data, chunks in cases:
                stream = await listen(
                    reactor,
                    "tcp:0:interface=127.0.0.1",
                    ack=True,
                    maxLineBytes=MAX_LINE,
                    queueSize=QUEUE_SIZE,
                    idleTimeout=0,
                )
                try:
                    await self.replay(stream, data, chunks)
                finally:
                    await stream.stop(0)

        return Deferred.fromCoroutine(body())

    async def replay(
        self, stream: IngestStream, data: bytes, chunks: list[bytes]
    ) -> None:
        """
        Send one case and compare with L{feed}.
        """
        queued: list[tuple[int, bytes]] = []

        async def consume() -> None:
            async for batch in stream.batches(QUEUE_SIZE):
                queued.extend((m.number, m.line) for m in batch.messages)
                batch.settle()

        consumer = Deferred.fromCoroutine(consume())
        client = await connect(stream.ports[0].getHost().port)
        for chunk in chunks:
            client.transport.write(chunk)
        client.transport.loseWriteConnection()
        closed = client.closed
        closed.addTimeout(20, reactor)
        replies = await closed
        errors = tuple(
            (r["line"], r["error"], r["detail"]) for r in replies if "error" in r
        )
        acks = tuple(r["ack"] for r in replies if "ack" in r)
        await until(lambda: not stream.factory.connections, 10, "server closed")
        stream.queue.close()
        await consumer
        expected = feed([data])
        self.assertEqual(tuple(queued), expected.queued)
        self.assertEqual(errors, expected.errors)
        self.assertEqual(acks[-1:], expected.acks[-1:])
        self.assertEqual(len(replies), len(errors) + len(acks))
