# -*- test-case-name: tests.test_protocol -*-
"""
Where lines are framed: the NDJSON protocol of one client connection.

Each line is one JSON object in UTF-8.  An accepted line goes into the shared
L{MessageQueue}; a rejected one gets exactly one reply naming its line and
reason, and the connection stays open.  With acknowledgements on, the client
also learns, cumulatively, which of its lines are handled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import simplejson
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from tx_ingest.queue import Entry, MessageQueue, QueueClosed
from tx_ingest.throttle import WarningThrottle

if TYPE_CHECKING:
    from tx_ingest.listener import IngestFactory

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
LINE_TOO_LONG = "line_too_long"
REJECTED = "rejected"
IDLE_TIMEOUT = "idle_timeout"
TOO_MANY_CONNECTIONS = "too_many_connections"

_HOLD_QUEUE = 1
_HOLD_REPLIES = 2
_HOLD_STOPPED = 4

# Parses one JSON value from a str with simplejson's C scanner; NaN and
# Infinity are refused.
_DECODER = simplejson.JSONDecoder(allow_nan=False)

_JSON_TYPES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class IConnectionTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    What a connection's transport provides here: a TCP transport that is
    also a consumer (of replies) and a push producer (of received bytes).
    """


@dataclass(frozen=True)
class ProtocolSettings:
    """
    What every connection of a listener shares.

    @ivar maxLineBytes: The longest accepted line, without its delimiter.
    @ivar idleTimeout: Seconds of client silence before the connection is
        closed; 0 disables it.
    @ivar ack: Whether to send cumulative C{{"ack": N}} replies.
    """

    maxLineBytes: int = 8192
    idleTimeout: float = 300.0
    ack: bool = False


def encodeReply(reply: dict) -> bytes:
    """
    @return: One NDJSON reply line.
    """
    return simplejson.dumps(reply, separators=(",", ":")).encode("utf-8") + b"\n"


@implementer(IPushProducer)
class _ReplyValve:
    """
    Registered with the transport as the producer of replies: when the client
    stops reading them, the transport pauses this, and the connection stops
    reading lines, so a client cannot make the server buffer replies without
    bound.
    """

    def __init__(self, protocol: NDJSONProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        """
        The client's unread replies filled the transport's buffer: stop
        reading its lines.
        """
        self._protocol._hold(_HOLD_REPLIES)

    def resumeProducing(self) -> None:
        """
        The replies drained: read again.
        """
        self._protocol._release(_HOLD_REPLIES)

    def stopProducing(self) -> None:
        """
        The connection is gone; the protocol's C{connectionLost} cleans up.
        """


@implementer(IHalfCloseableProtocol)
class NDJSONProtocol(LineReceiver, TimeoutMixin):
    """
    One client connection: frames lines, validates them, queues the accepted
    ones, replies to the rejected ones, and acknowledges handled ones.

    L{dataReceived} is LineReceiver's framing done per received chunk: it
    splits each chunk once instead of re-slicing its buffer for every line.

    @ivar lineNumber: Lines read so far on this connection (blank and
        too-long lines included).
    @ivar outstanding: Accepted lines not yet settled by the consumer.
    @ivar acked: The last line number acknowledged to the client.
    """

    delimiter = b"\n"
    log = Logger()
    transport: IConnectionTransport  # type: ignore[assignment]
    factory: IngestFactory | None  # type: ignore[assignment]

    def __init__(
        self,
        queue: MessageQueue,
        settings: ProtocolSettings,
        clock: IReactorTime,
        warnings: WarningThrottle,
    ) -> None:
        self.MAX_LENGTH = settings.maxLineBytes
        self.callLater = clock.callLater  # type: ignore[method-assign,assignment]
        self.lineNumber = 0
        self.outstanding = 0
        self.acked = 0
        self.peer = "?"
        self._queue = queue
        self._settings = settings
        self._warnings = warnings
        self._holds = 0
        self._stash = b""
        self._partial = b""
        self._discarding = False
        self._inputEnded = False
        self._closed = False

    def connectionMade(self) -> None:
        """
        Start counting idle time, join the queue's readers and watch how fast
        the client reads its replies.
        """
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        if self.factory is not None:
            self.factory.connectionOpened(self)
        self.transport.registerProducer(_ReplyValve(self), True)
        self._queue.addReader(self)
        if self._settings.idleTimeout:
            self.setTimeout(self._settings.idleTimeout)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Leave the queue's readers.  Lines already queued are still stored.
        """
        self._closed = True
        self.setTimeout(None)
        self._queue.removeReader(self)
        if self.factory is not None:
            self.factory.connectionClosed(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Frame and handle a received chunk, holding back what cannot be taken
        while reading is paused.
        """
        if self._holds:
            self._stash += data
            return
        self.resetTimeout()
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1 :]
        if self._partial:
            data = self._partial + data
            self._partial = b""
        lines = data.split(b"\n")
        partial = lines.pop()
        if not self._handleLines(lines, b"\r" in data):
            self._stashRest(lines, partial)
            return
        if len(partial) > self.MAX_LENGTH + 1:
            self.lineNumber += 1
            self._discarding = True
            self._tooLong(self.lineNumber)
        else:
            self._partial = partial
        if self._settings.ack and not self.outstanding:
            self._sendAck(self.lineNumber)
        if self._inputEnded:
            self._finishInput()

    def _handleLines(self, lines: list[bytes], crlf: bool) -> bool:
        """
        Handle complete lines in order until reading is held.  Accepted lines
        go to the queue together, never more than it has room for.

        @return: C{True} if every line was handled; otherwise the handled ones
            are removed from C{lines}.
        """
        maxLength = self.MAX_LENGTH
        scan = _DECODER.scan_once
        queue = self._queue
        room = queue.capacity - len(queue)
        accepted: list[Entry] = []
        number = self.lineNumber
        for index, line in enumerate(lines):
            if room <= 0:
                self._enqueue(accepted)
                accepted = []
                room = queue.capacity - len(queue)
                if room <= 0:
                    self._hold(_HOLD_QUEUE)
            if self._holds:
                self._enqueue(accepted)
                del lines[:index]
                self.lineNumber = number
                return False
            number += 1
            if crlf and line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                continue
            if len(line) > maxLength:
                self.lineNumber = number
                self._tooLong(number)
                continue
            # The fast path: one C call for a well-formed line.
            try:
                text = line.decode("utf-8")
                value, end = scan(text, 0)
                if end != len(text) and text[end:].strip(" \t\r"):
                    raise ValueError("extra data")
            except UnicodeDecodeError as e:
                self.lineNumber = number
                self._reject(number, INVALID_UTF8, f"invalid UTF-8 at byte {e.start}")
                continue
            except RecursionError:
                self.lineNumber = number
                self._reject(number, INVALID_JSON, "nested too deeply")
                continue
            except Exception:
                if line.isspace():
                    continue
                try:
                    value = simplejson.loads(line, allow_nan=False)
                except RecursionError:
                    self.lineNumber = number
                    self._reject(number, INVALID_JSON, "nested too deeply")
                    continue
                except Exception as e:
                    self.lineNumber = number
                    self._reject(number, INVALID_JSON, str(e)[:200])
                    continue
            if type(value) is not dict:
                self.lineNumber = number
                kind = _JSON_TYPES.get(type(value), "not an object")
                self._reject(number, NOT_AN_OBJECT, f"expected an object, got {kind}")
                continue
            accepted.append((line, number, self))
            room -= 1
        self.lineNumber = number
        self._enqueue(accepted)
        return True

    def _enqueue(self, messages: list[Entry]) -> None:
        """
        Queue accepted messages (which may pause reading).
        """
        if messages:
            self.outstanding += len(messages)
            self._queue.putMany(messages)

    def _stashRest(self, lines: list[bytes], partial: bytes) -> None:
        """
        Keep unhandled lines (and the partial one) to read once released.
        """
        if lines:
            self._stash = b"\n".join(lines) + b"\n" + partial + self._stash
        else:
            self._stash = partial + self._stash

    def _tooLong(self, number: int) -> None:
        """
        Reply that line C{number} is too long; its bytes are dropped as they
        arrive.
        """
        self._reject(number, LINE_TOO_LONG, f"line exceeds {self.MAX_LENGTH} bytes")

    def _reject(self, number: int, code: str, detail: str) -> None:
        """
        Reply to a rejected line and log it (rate-limited).
        """
        self._warnings.warn(
            "rejected line {line} from {peer}: {code}: {detail}",
            line=number,
            peer=self.peer,
            code=code,
            detail=detail,
        )
        if not self._closed:
            self.transport.write(
                encodeReply({"error": code, "line": number, "detail": detail})
            )

    def _sendAck(self, upTo: int) -> None:
        """
        Acknowledge lines 1..C{upTo} if that says something new.
        """
        if upTo > self.acked and not self._closed:
            self.acked = upTo
            self.transport.write(b'{"ack":%d}\n' % upTo)

    def linesSettled(
        self, count: int, highest: int, rejected: list[tuple[int, str]]
    ) -> None:
        """
        The consumer handled C{count} of this connection's lines, up to line
        C{highest}: reply to those it refused and acknowledge.
        """
        self.outstanding -= count
        for number, detail in rejected:
            self._reject(number, REJECTED, detail)
        if self._settings.ack:
            self._sendAck(highest if self.outstanding else self.lineNumber)
        if self._inputEnded:
            self._finishInput()

    def pauseReading(self) -> None:
        """
        The queue is full: stop reading.
        """
        self._hold(_HOLD_QUEUE)

    def resumeReading(self) -> None:
        """
        The queue has room: read again.
        """
        self._release(_HOLD_QUEUE)

    def stopReading(self) -> None:
        """
        Stop reading for good (the service is shutting down).
        """
        self._hold(_HOLD_STOPPED)

    def _hold(self, reason: int) -> None:
        """
        Pause reading for C{reason}.
        """
        if not self._holds and not self._closed:
            self.transport.pauseProducing()
        self._holds |= reason

    def _release(self, reason: int) -> None:
        """
        Lift C{reason}; once nothing holds reading, handle the stashed input
        and read again.
        """
        if not self._holds & reason:
            return
        self._holds &= ~reason
        if self._holds:
            return
        if self._closed:
            return
        stash, self._stash = self._stash, b""
        if stash:
            self.dataReceived(stash)
        if not self._holds and not self._closed:
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        """
        The client half-closed: an unterminated last line still counts, and
        the connection closes once every line has had its reply.
        """
        self._inputEnded = True
        if self._partial or (self._stash and not self._stash.endswith(b"\n")):
            self.dataReceived(b"\n")
        else:
            self._finishInput()

    def writeConnectionLost(self) -> None:
        """
        The client stopped reading; nothing more to say to it.
        """
        self.transport.loseConnection()

    def _finishInput(self) -> None:
        """
        Close after a half-close once nothing is left to answer.
        """
        if self._holds & ~_HOLD_REPLIES or self._stash or self.outstanding:
            return
        if self._settings.ack:
            self._sendAck(self.lineNumber)
        self.closeConnection()

    def closeConnection(self) -> None:
        """
        Close, after the replies already written reach the client.
        """
        if not self._closed:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        The client was silent too long.  A connection waiting on its own
        lines (paused, or with lines not yet settled) is not idle.
        """
        if self._holds or self.outstanding:
            self.resetTimeout()
            return
        self.transport.write(
            encodeReply({"error": IDLE_TIMEOUT, "limit": self._settings.idleTimeout})
        )
        self.closeConnection()


__all__ = [
    "NDJSONProtocol",
    "ProtocolSettings",
    "QueueClosed",
    "encodeReply",
]
