"""
Unit tests for L{tx_ingest.sink}: batching, retries through failures, outage
logging and shutdown, with a fake store on a L{Clock}.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tx_ingest.queue import Message, MessageQueue
from tx_ingest.sink import BatchSink


class FakeOrigin:
    """
    Records what it is told about its lines.
    """

    def __init__(self) -> None:
        self.settled: list[tuple[int, int, list[tuple[int, str]]]] = []

    def pauseReading(self) -> None:
        """
        Nothing to pause.
        """

    def resumeReading(self) -> None:
        """
        Nothing to resume.
        """

    def linesSettled(
        self, count: int, highest: int, rejected: list[tuple[int, str]]
    ) -> None:
        """
        Record what the queue said.
        """
        self.settled.append((count, highest, rejected))


class FakeStore:
    """
    A store whose writes the test answers by hand.

    @ivar calls: One C{(lines, Deferred)} per write attempt.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], Deferred[dict[int, str]]]] = []

    def insertLines(self, lines: Sequence[bytes]) -> Deferred[dict[int, str]]:
        """
        Record a write attempt; the test fires its L{Deferred}.
        """
        d: Deferred[dict[int, str]] = Deferred()
        self.calls.append((list(lines), d))
        return d


class BatchSinkTests(SynchronousTestCase):
    """
    L{BatchSink} drains the queue into the store and never drops a batch.
    """

    def setUp(self) -> None:
        """
        A queue of 100, a fake store and one origin, on a L{Clock}, with the
        log captured.
        """
        self.clock = Clock()
        self.queue = MessageQueue(self.clock, 100)
        self.store = FakeStore()
        self.origin = FakeOrigin()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def put(self, *numbers: int) -> None:
        """
        Queue one message per number, from the one origin.
        """
        for n in numbers:
            self.queue.put(Message(b'{"n":%d}' % n, n, self.origin))

    def test_loneLineWrittenAtOnce(self) -> None:
        """
        A single line is written on the next reactor turn, not after a fixed
        delay, and a flood arriving meanwhile fills the next batch.
        """
        sink = BatchSink(self.clock, self.queue, self.store, batchSize=3, concurrency=1)
        sink.startService()
        self.put(1)
        self.clock.advance(0)
        self.assertEqual(self.store.calls[0][0], [b'{"n":1}'])
        self.put(2, 3, 4, 5)
        self.store.calls[0][1].callback({})
        self.assertEqual(len(self.store.calls[1][0]), 3)
        self.assertEqual(self.origin.settled, [(1, 1, [])])

    def test_lightTrafficSharesCommits(self) -> None:
        """
        While one write is in flight, a second lane waits for a backlog of a
        full batch, so a trickle of lines is written one batch at a time,
        and a backlog is written in parallel.
        """
        sink = BatchSink(self.clock, self.queue, self.store, batchSize=4, concurrency=2)
        sink.startService()
        self.put(1)
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 1)
        self.put(2, 3, 4)
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 1)
        self.put(5)
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 2)
        self.assertEqual(len(self.store.calls[1][0]), 4)

    def test_closingServesEveryLane(self) -> None:
        """
        Closing the queue hands what is left to a waiting lane whatever its
        minimum, so shutdown writes everything.
        """
        sink = BatchSink(self.clock, self.queue, self.store, batchSize=4, concurrency=2)
        sink.startService()
        self.put(1)
        self.clock.advance(0)
        self.put(2)
        self.queue.close()
        self.assertEqual([lines for lines, _ in self.store.calls][1], [b'{"n":2}'])

    def test_retryUntilLanded(self) -> None:
        """
        A failing write is retried with growing delays until it lands; the
        outage is logged once when it starts and once when it ends.
        """
        sink = BatchSink(
            self.clock, self.queue, self.store, concurrency=1, minDelay=1, maxDelay=4
        )
        sink.startService()
        self.put(1, 2)
        self.clock.advance(0)
        delays = []
        for _ in range(5):
            self.store.calls[-1][1].errback(ConnectionError("down"))
            before = len(self.store.calls)
            waited = 0.0
            while len(self.store.calls) == before:
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1, 2, 4, 4, 4])
        self.assertEqual(self.origin.settled, [])
        self.store.calls[-1][1].callback({})
        self.assertEqual(self.origin.settled, [(2, 2, [])])
        warnings = [e for e in self.events if e.get("log_level") == LogLevel.warn]
        recovered = [e for e in self.events if "recovered" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(len(recovered), 1)
        self.assertEqual(sink.written, 2)

    def test_rejectionsPassedOn(self) -> None:
        """
        Lines the store refuses are reported to their origin.
        """
        sink = BatchSink(self.clock, self.queue, self.store, concurrency=1)
        sink.startService()
        self.put(1, 2, 3)
        self.clock.advance(0)
        self.store.calls[0][1].callback({1: "bad bytes"})
        self.assertEqual(self.origin.settled, [(3, 3, [(2, "bad bytes")])])

    def test_stopsAfterDrain(self) -> None:
        """
        Once the queue is closed, the sink writes what is left and then its
        L{stopService} fires.
        """
        sink = BatchSink(self.clock, self.queue, self.store, batchSize=2, concurrency=2)
        sink.startService()
        self.put(1, 2, 3)
        self.clock.advance(0)
        self.queue.close()
        stopped = sink.stopService()
        self.assertNoResult(stopped)
        for _, d in list(self.store.calls):
            d.callback({})
        self.successResultOf(stopped)
        self.assertEqual(sum(c for c, _, _ in self.origin.settled), 3)

    def test_abandon(self) -> None:
        """
        After L{BatchSink.abandon}, a failing batch is given up: the sink
        stops, and the batch is never settled (so never acknowledged).
        """
        sink = BatchSink(self.clock, self.queue, self.store, concurrency=1)
        sink.startService()
        self.put(1)
        self.clock.advance(0)
        self.queue.close()
        stopped = sink.stopService()
        sink.abandon()
        self.store.calls[0][1].errback(ConnectionError("down"))
        self.successResultOf(stopped)
        self.assertEqual(self.origin.settled, [])

    def test_waitsForReady(self) -> None:
        """
        Nothing is taken from the queue before the store is ready.
        """
        ready: Deferred[object] = Deferred()
        sink = BatchSink(self.clock, self.queue, self.store, ready=ready)
        sink.startService()
        self.put(1)
        self.clock.advance(0)
        self.assertEqual(self.store.calls, [])
        ready.callback(None)
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 1)
