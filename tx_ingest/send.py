# -*- test-case-name: tests.test_send -*-
"""
A client that streams NDJSON lines to a tx_ingest server until each is acked.

The server numbers the lines of each connection from 1, answers
C{{"ack": N}} once lines 1..N of the connection are handled, and
C{{"error": CODE, "line": N, "detail": ...}} for each rejected line. This
client keeps the lines it has sent but not yet seen acked in a bounded
L{UnackedWindow}; when a connection drops (or is refused) it reconnects with
backoff and sends those lines again, so every line is delivered at least once.

Run it as C{python -m tx_ingest.send FILE --to HOST:PORT}; see L{Options}.
"""

from __future__ import annotations

import getopt
import json
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall, deferLater, react
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger()

#: The most bytes of lines joined into one C{transport.write}.
CHUNK_BYTES = 64 * 1024


class Rejection(NamedTuple):
    """
    A line the server refused to store.

    @ivar line: The line's number in the input (1-based).
    @ivar code: The server's error code.
    @ivar detail: The server's explanation.
    """

    line: int
    code: str
    detail: str


@dataclass
class SendResult:
    """
    What happened to the lines of one L{Sender.send}.

    @ivar lines: Lines read from the input.
    @ivar sent: Lines written to a connection, resent lines included.
    @ivar acked: Lines covered by an ack (stored, or rejected and reported).
    @ivar rejected: The rejected lines, in input order.
    @ivar reconnects: Connection attempts after the first one.
    @ivar gaveUp: C{True} if the sender stopped retrying before every line
        was acked.
    """

    lines: int = 0
    sent: int = 0
    acked: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    reconnects: int = 0
    gaveUp: bool = False

    @property
    def exitStatus(self) -> int:
        """
        The command line's exit status for this result.

        @return: 0 if every line was acked and none rejected, 1 if some were
            rejected, 2 if the sender gave up.
        """
        if self.gaveUp or self.acked < self.lines:
            return 2
        if self.rejected:
            return 1
        return 0


class UnackedWindow:
    """
    The lines read from the input and not yet acked, up to a bound.

    Lines move from the input to C{unsent}, from C{unsent} to C{unacked} as
    they are written, and out of the window when acked. After a dropped
    connection L{rewind} puts the unacked lines back in front of the unsent
    ones. The input is only read while the window has room.

    @ivar maxLines: The most lines held at once.
    @ivar maxBytes: The most bytes held at once (a single longer line is still
        admitted into an empty window).
    @ivar linesRead: Lines read from the input so far.
    @ivar firstUnacked: The input line number of the oldest line not acked.
    """

    def __init__(self, source: Iterable[bytes], maxLines: int, maxBytes: int) -> None:
        """
        @param source: The input lines, each with or without its C{b"\\n"}.
        @param maxLines: See L{maxLines}.
        @param maxBytes: See L{maxBytes}.
        """
        self._source: Iterator[bytes] = iter(source)
        self._exhausted = False
        self.maxLines = maxLines
        self.maxBytes = maxBytes
        self.linesRead = 0
        self.firstUnacked = 1
        self._bytes = 0
        self._unsent: deque[bytes] = deque()
        self._unacked: deque[bytes] = deque()

    def __len__(self) -> int:
        """
        @return: The number of lines held.
        """
        return len(self._unsent) + len(self._unacked)

    def _hasRoom(self) -> bool:
        """
        @return: Whether another line may be read from the input.
        """
        if len(self) == 0:
            return True
        return len(self) < self.maxLines and self._bytes < self.maxBytes

    def _readOne(self) -> bool:
        """
        Read one line from the input into C{unsent}.

        @return: C{False} when the input is exhausted.
        """
        if self._exhausted:
            return False
        try:
            line = next(self._source)
        except StopIteration:
            self._exhausted = True
            return False
        if not line.endswith(b"\n"):
            line += b"\n"
        self._unsent.append(line)
        self._bytes += len(line)
        self.linesRead += 1
        return True

    def prime(self) -> None:
        """
        Read ahead one line if nothing is held, so that L{done} is known for
        an empty input before connecting.
        """
        if len(self) == 0:
            self._readOne()

    def takeChunk(self, maxBytes: int) -> tuple[bytes, int]:
        """
        Mark lines as sent and return them joined, reading the input as far
        as the window allows.

        @param maxBytes: Stop adding lines once the chunk reaches this size.
        @return: The bytes to write and how many lines they hold (C{0} if the
            window is full or the input exhausted).
        """
        lines: list[bytes] = []
        size = 0
        unsent, unacked = self._unsent, self._unacked
        # Lines already read (put back by a rewind) go first.
        while unsent and size < maxBytes:
            line = unsent.popleft()
            unacked.append(line)
            lines.append(line)
            size += len(line)
        if size < maxBytes and not unsent and not self._exhausted:
            size = self._readInto(lines, size, maxBytes)
        return b"".join(lines), len(lines)

    def _readInto(self, lines: list[bytes], size: int, maxBytes: int) -> int:
        """
        Read input lines straight into C{unacked} (and C{lines}) while the
        chunk is under C{maxBytes} and the window has room; the per-line
        loop of a sender, so kept to local variables.

        @return: The chunk's size after reading.
        """
        source, unacked = self._source, self._unacked
        held, heldBytes = len(unacked), self._bytes
        maxLines, maxHeldBytes = self.maxLines, self.maxBytes
        read = 0
        while size < maxBytes and (
            held == 0 or (held < maxLines and heldBytes < maxHeldBytes)
        ):
            line = next(source, None)
            if line is None:
                self._exhausted = True
                break
            if line[-1:] != b"\n":
                line += b"\n"
            length = len(line)
            unacked.append(line)
            lines.append(line)
            size += length
            heldBytes += length
            held += 1
            read += 1
        self._bytes = heldBytes
        self.linesRead += read
        return size

    def ack(self, through: int) -> int:
        """
        Drop the lines acked up to input line C{through}.

        @param through: An input line number.
        @return: How many lines were dropped.
        """
        dropped = min(through - self.firstUnacked + 1, len(self._unacked))
        if dropped <= 0:
            return 0
        popleft = self._unacked.popleft
        freed = 0
        for _ in range(dropped):
            freed += len(popleft())
        self._bytes -= freed
        self.firstUnacked += dropped
        return dropped

    def rewind(self) -> None:
        """
        Treat every unacked line as unsent again, for a new connection.
        """
        self._unsent.extendleft(reversed(self._unacked))
        self._unacked.clear()

    def allSent(self) -> bool:
        """
        @return: Whether the input is exhausted and every line was written.
        """
        if self._unsent:
            return False
        if self._exhausted:
            return True
        return self._hasRoom() and not self._readOne()

    def done(self) -> bool:
        """
        @return: Whether the input is exhausted and every line was acked.
        """
        return not self._unacked and self.allSent()


class HalfCloseableConsumer(Protocol):
    """
    The parts of a TCP transport that L{SenderProtocol} writes through.
    """

    def write(self, data: bytes) -> None:
        """
        @param data: Bytes to send.
        """

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """
        @param producer: Paused and resumed as the write buffer fills and drains.
        @param streaming: C{True} for a push producer.
        """

    def unregisterProducer(self) -> None:
        """
        Forget the producer.
        """

    def loseWriteConnection(self) -> None:
        """
        Half-close: send end-of-file once the buffer is written.
        """

    def abortConnection(self) -> None:
        """
        Close at once, dropping anything buffered.
        """


@implementer(IPushProducer)
class SenderProtocol(LineOnlyReceiver):
    """
    One connection of a L{Sender}: writes lines while the transport accepts
    them, and reads the server's replies.

    It is registered as a streaming producer with its transport, so the
    transport's pause and resume calls decide when lines are written.

    @ivar firstLine: The input line number of this connection's line 1.
    @ivar output: The transport, once connected.
    @ivar halfClosed: Whether every line was written and the write side closed.
    @ivar acks: How many acks this connection received.
    @ivar lost: Fires with L{None} once the connection is lost.
    @ivar lostReason: Why the connection was lost, once it was.
    @ivar refusal: The server's connection-level error reply, if any.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1024 * 1024

    def __init__(self, sender: Sender) -> None:
        """
        @param sender: The sender whose window and counts this connection uses.
        """
        self.sender = sender
        self.firstLine = sender.window.firstUnacked
        self.lost: Deferred[None] = Deferred()
        self.lostReason: Failure | None = None
        self.refusal: dict[str, Any] | None = None
        self._written = 0
        self.acks = 0
        self._paused = False
        self.halfClosed = False
        self._finalAckTimeout: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """
        Register as the transport's producer and start writing.
        """
        self.output = cast(HalfCloseableConsumer, self.transport)
        self.output.registerProducer(self, True)
        self.pump()

    def pauseProducing(self) -> None:
        """
        Stop writing: the transport's buffer is full.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        Write again: the transport's buffer has drained.
        """
        self._paused = False
        self.pump()

    def stopProducing(self) -> None:
        """
        Stop writing for good: the connection is going away.
        """
        self._paused = True

    def pump(self) -> None:
        """
        Write lines until the transport pauses us, the window is full or the
        input is exhausted; once every line is written, half-close.
        """
        window = self.sender.window
        while not self._paused and not self.halfClosed:
            data, count = window.takeChunk(CHUNK_BYTES)
            if not count:
                break
            self._written += count
            self.sender.result.sent += count
            self.output.write(data)

        if not self.halfClosed and not self._paused and window.allSent():
            self.halfClosed = True
            self.output.unregisterProducer()
            self.output.loseWriteConnection()
            self._armFinalAckTimeout()

    def _armFinalAckTimeout(self) -> None:
        """
        After the half-close, (re)start the wait for the next ack.
        """
        if self._finalAckTimeout is not None and self._finalAckTimeout.active():
            self._finalAckTimeout.cancel()
        self._finalAckTimeout = self.sender.clock.callLater(
            self.sender.finalAckTimeout, self._finalAckTimedOut
        )

    def _finalAckTimedOut(self) -> None:
        """
        Give up on this connection: no ack came after the half-close.
        """
        self._finalAckTimeout = None
        _log.warn(
            "no ack for {seconds}s after sending every line; reconnecting",
            seconds=self.sender.finalAckTimeout,
        )
        self.output.abortConnection()

    def lineReceived(self, line: bytes) -> None:
        """
        Handle one reply from the server.

        @param line: One NDJSON reply, without its newline.
        """
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            _log.warn("unreadable reply from server: {reply!r}", reply=line[:200])
            return

        if "ack" in reply:
            self._ackReceived(reply["ack"])
        elif "error" in reply and "line" in reply:
            self._rejectReceived(reply)
        elif "error" in reply:
            self.refusal = reply
            _log.warn("server refused the connection: {reply}", reply=reply)
        else:
            _log.warn("unexpected reply from server: {reply}", reply=reply)

    def _toInputLine(self, connectionLine: object) -> int | None:
        """
        Map a line number of this connection to an input line number.

        @param connectionLine: The number the server sent.
        @return: The input line number, or L{None} if the server named a line
            that was never written on this connection.
        """
        if (
            not isinstance(connectionLine, int)
            or isinstance(connectionLine, bool)
            or not 0 <= connectionLine <= self._written
        ):
            _log.warn(
                "server named line {line} of {written} written",
                line=connectionLine,
                written=self._written,
            )
            return None
        return self.firstLine + connectionLine - 1

    def _ackReceived(self, connectionLine: object) -> None:
        """
        Drop acked lines from the window and write more in their place.

        @param connectionLine: The ack's line number on this connection.
        """
        inputLine = self._toInputLine(connectionLine)
        if inputLine is None:
            return
        self.acks += 1
        self.sender.ackReceived(inputLine)
        if self.halfClosed:
            self._armFinalAckTimeout()
        else:
            self.pump()

    def _rejectReceived(self, reply: dict[str, Any]) -> None:
        """
        Record a rejected line under its input line number.

        @param reply: The error reply.
        """
        inputLine = self._toInputLine(reply["line"])
        if inputLine is None:
            return
        self.sender.rejectReceived(
            Rejection(inputLine, str(reply["error"]), str(reply.get("detail", "")))
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        Drop the connection on a reply too long to be one of the protocol's.

        @param line: The start of the overlong reply.
        """
        _log.warn("reply longer than {max} bytes; dropping", max=self.MAX_LENGTH)
        self.output.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop the final-ack timer and report the loss.

        @param reason: Why the connection was lost.
        """
        if self._finalAckTimeout is not None and self._finalAckTimeout.active():
            self._finalAckTimeout.cancel()
        self._paused = True
        self.lostReason = reason
        self.lost.callback(None)


class Sender:
    """
    Sends every line of an input to a tx_ingest server, at least once,
    reconnecting with exponential backoff when a connection drops or is
    refused.

    Its counts (C{result}) are updated as replies arrive, so a caller may show
    progress while L{send} runs.

    @ivar window: The unacked lines.
    @ivar result: The counts so far; L{send} returns this same object.
    @ivar clock: The clock for backoff and timeouts.
    @ivar finalAckTimeout: Seconds to wait for each ack after the half-close.
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        lines: Iterable[bytes],
        *,
        maxLines: int = 100_000,
        maxBytes: int = 64 * 1024 * 1024,
        retries: int = 10,
        initialDelay: float = 0.1,
        maxDelay: float = 10.0,
        finalAckTimeout: float = 60.0,
    ) -> None:
        """
        @param clock: See L{clock}.
        @param endpoint: Where the server listens.
        @param lines: The input, one line per item.
        @param maxLines: The most unacked lines held in memory.
        @param maxBytes: The most bytes of unacked lines held in memory.
        @param retries: Consecutive connections that may fail to get any line
            acked before giving up.
        @param initialDelay: Seconds before the first reconnection; doubled
            after each connection that got nothing acked.
        @param maxDelay: The longest wait between reconnections.
        @param finalAckTimeout: See L{finalAckTimeout}.
        """
        self.clock = clock
        self.endpoint = endpoint
        self.window = UnackedWindow(lines, maxLines, maxBytes)
        self.result = SendResult()
        self.retries = retries
        self.initialDelay = initialDelay
        self.maxDelay = maxDelay
        self.finalAckTimeout = finalAckTimeout
        self._rejected: dict[int, Rejection] = {}

    def send(self) -> Deferred[SendResult]:
        """
        Send every line, then wait for the acks.

        @return: A L{Deferred} firing with the L{SendResult} once every line
            is acked or the sender gives up.
        """
        return Deferred.fromCoroutine(self._send())

    async def _send(self) -> SendResult:
        """
        Connect, and reconnect after each loss, until every line is acked.

        @return: The final counts.
        """
        failures = 0
        self.window.prime()
        while not self.window.done():
            if self.result.sent or failures:
                delay = min(
                    self.maxDelay, self.initialDelay * 2 ** max(failures - 1, 0)
                )
                await deferLater(self.clock, delay)
                self.result.reconnects += 1

            ackedBefore = self.result.acked
            await self._connectOnce()
            self.window.rewind()
            if self.result.acked > ackedBefore:
                failures = 0
            else:
                failures += 1
            if failures > self.retries and not self.window.done():
                _log.error(
                    "giving up after {failures} connections without progress;"
                    " {acked} of {lines} lines acked",
                    failures=failures,
                    acked=self.result.acked,
                    lines=self.result.lines,
                )
                self.result.gaveUp = True
                break

        self.result.lines = self.window.linesRead
        self.result.rejected = sorted(self._rejected.values())
        return self.result

    async def _connectOnce(self) -> None:
        """
        Run one connection until it is lost, or fail to connect.
        """
        protocol = SenderProtocol(self)
        try:
            await self.endpoint.connect(Factory.forProtocol(lambda: protocol))
        except Exception as e:
            _log.warn("cannot connect: {error}", error=e)
            return
        await protocol.lost
        self.result.lines = self.window.linesRead
        if protocol.halfClosed and not protocol.acks and not self.window.done():
            _log.warn(
                "the server closed after the last line without acking any;"
                " does it send acks (twistd ingest --ack)?"
            )
        elif not self.window.done() and protocol.lostReason is not None:
            _log.info(
                "connection lost with {unacked} lines unacked: {reason}",
                unacked=len(self.window),
                reason=protocol.lostReason.getErrorMessage(),
            )

    def ackReceived(self, inputLine: int) -> None:
        """
        Count the lines acked through C{inputLine}.

        @param inputLine: An input line number.
        """
        self.result.acked += self.window.ack(inputLine)
        self.result.lines = self.window.linesRead

    def rejectReceived(self, rejection: Rejection) -> None:
        """
        Record a rejected line (once, even if it was sent again).

        @param rejection: The line and the server's reasons.
        """
        self._rejected.setdefault(rejection.line, rejection)

    @property
    def rejectedCount(self) -> int:
        """
        @return: The number of distinct rejected lines so far.
        """
        return len(self._rejected)


def endpointDescription(address: str) -> str:
    """
    Turn C{HOST:PORT} (or C{[IPV6]:PORT}) into a client endpoint string;
    anything else is taken to be an endpoint string already.

    @param address: The C{--to} argument.
    @return: A string for L{clientFromString}.
    """
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit():
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and (":" not in host or address.startswith("[")):
            escaped = host.replace(":", "\\:")
            return f"tcp:host={escaped}:port={port}"
    return address


class Options(usage.Options):
    """
    Command line of C{python -m tx_ingest.send}.

    Exit status: 0 when every line was acked and none rejected, 1 when some
    were rejected, 2 when the sender gave up, 64 on a usage error.
    """

    synopsis = "Usage: python -m tx_ingest.send FILE --to HOST:PORT [options]"
    longdesc = (
        "Send each line of FILE (- for standard input) to a tx_ingest server,"
        " resending after a dropped connection until every line is acked."
        " Exit status: 0 all acked, 1 some lines rejected, 2 gave up,"
        " 64 usage error."
    )

    optParameters = [
        ["to", "t", None, "Server address: HOST:PORT or a client endpoint string."],
        ["window", "w", 100_000, "Most unacked lines held in memory.", int],
        ["window-mb", None, 64, "Most megabytes of unacked lines in memory.", int],
        ["retries", "r", 10, "Reconnections without progress before giving up.", int],
        ["timeout", None, 60.0, "Seconds to wait for each final ack.", float],
    ]
    optFlags = [["quiet", "q", "Print no progress line and no summary."]]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse, accepting options after C{FILE} as well as before it.

        @param options: The arguments; C{sys.argv[1:]} if L{None}.
        @raise usage.UsageError: On unknown options or a wrong argument count.
        """
        if options is None:
            options = sys.argv[1:]
        try:
            parsed, arguments = getopt.gnu_getopt(
                list(options), self.shortOpt, self.longOpt
            )
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from e

        ordered = []
        for name, value in parsed:
            ordered.append(name)
            takesValue = (
                f"{name[2:]}=" in self.longOpt
                if name.startswith("--")
                else f"{name[1:]}:" in self.shortOpt
            )
            if takesValue:
                ordered.append(value)
        super().parseOptions(ordered + ["--"] + arguments)

    def parseArgs(self, file: str) -> None:  # type: ignore[override]
        """
        @param file: The NDJSON file to send, C{-} for standard input.
        """
        self["file"] = file

    def postOptions(self) -> None:
        """
        Check that a destination was given and the limits are positive.

        @raise usage.UsageError: If not.
        """
        if not self["to"]:
            raise usage.UsageError("--to HOST:PORT is required")
        for name in ("window", "window-mb"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["retries"] < 0:
            raise usage.UsageError("--retries must not be negative")


class Progress:
    """
    A progress line on a terminal, rewritten in place.

    @ivar sender: The sender whose counts are shown.
    """

    def __init__(self, sender: Sender, stream: IO[str], clock: IReactorTime) -> None:
        """
        @param sender: See L{sender}.
        @param stream: The terminal.
        @param clock: The clock for the rate.
        """
        self.sender = sender
        self._stream = stream
        self._clock = clock
        self._last = (clock.seconds(), 0)
        self._width = 0

    def show(self) -> None:
        """
        Rewrite the progress line; a failure is logged, never raised, so the
        L{LoopingCall} running this keeps going.
        """
        try:
            now = self._clock.seconds()
            result = self.sender.result
            lastTime, lastAcked = self._last
            rate = (result.acked - lastAcked) / max(now - lastTime, 1e-6)
            self._last = (now, result.acked)
            text = (
                f"sent {result.sent} acked {result.acked}"
                f" rejected {self.sender.rejectedCount}"
                f" reconnects {result.reconnects} ({rate:,.0f} lines/s)"
            )
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width = len(text)
        except Exception:
            _log.failure("cannot show progress")

    def clear(self) -> None:
        """
        Blank the progress line.
        """
        self._stream.write("\r" + " " * self._width + "\r")
        self._stream.flush()


def summarize(result: SendResult, seconds: float, stream: IO[str]) -> None:
    """
    Print the final counts, then the first rejected lines.

    @param result: The outcome.
    @param seconds: How long the send took.
    @param stream: Where to print.
    """
    rate = result.acked / max(seconds, 1e-6)
    outcome = "gave up" if result.gaveUp else "done"
    stream.write(
        f"{outcome}: {result.lines} lines read, {result.acked} acked,"
        f" {len(result.rejected)} rejected, {result.sent} sent,"
        f" {result.reconnects} reconnects in {seconds:.1f}s ({rate:,.0f} lines/s)\n"
    )
    shown = result.rejected[:20]
    for rejection in shown:
        stream.write(f"line {rejection.line}: {rejection.code}: {rejection.detail}\n")
    if len(result.rejected) > len(shown):
        stream.write(f"... and {len(result.rejected) - len(shown)} more rejected\n")


async def run(reactor: Any, argv: list[str], stdin: IO[bytes], stderr: IO[str]) -> int:
    """
    Send a file as the command line asks.

    @param reactor: The reactor (for the endpoint and the clock).
    @param argv: The arguments after the program name.
    @param stdin: Read when the file is C{-}.
    @param stderr: Where progress, the summary and usage errors go.
    @return: The exit status.
    """
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        stderr.write(f"{options.synopsis}\n{e}\n")
        return 64

    if options["file"] == "-":
        source = stdin
    else:
        try:
            source = open(options["file"], "rb")
        except OSError as e:
            stderr.write(f"cannot open {options['file']}: {e.strerror}\n")
            return 2

    with source:
        endpoint = clientFromString(reactor, endpointDescription(options["to"]))
        sender = Sender(
            reactor,
            endpoint,
            source,
            maxLines=options["window"],
            maxBytes=options["window-mb"] * 1024 * 1024,
            retries=options["retries"],
            finalAckTimeout=options["timeout"],
        )
        progressLoop = None
        progress = None
        if not options["quiet"] and stderr.isatty():
            progress = Progress(sender, stderr, reactor)
            progressLoop = LoopingCall(progress.show)
            progressLoop.clock = reactor
            progressLoop.start(0.5, now=False)

        started = time.monotonic()
        try:
            result = await sender.send()
        finally:
            if progressLoop is not None and progress is not None:
                progressLoop.stop()
                progress.clear()

    if not options["quiet"]:
        summarize(result, time.monotonic() - started, stderr)
    return result.exitStatus


def main(reactor: Any, *argv: str) -> Deferred[None]:
    """
    Entry point for L{react}.

    @param reactor: The reactor.
    @param argv: The arguments after the program name.
    @return: A L{Deferred} that fails with L{SystemExit} on a non-zero status.
    """

    async def mainAsync() -> None:
        status = await run(reactor, list(argv), sys.stdin.buffer, sys.stderr)
        if status:
            raise SystemExit(status)

    return Deferred.fromCoroutine(mainAsync())


if __name__ == "__main__":
    react(main, sys.argv[1:])
