# -*- test-case-name: tests.test_sink -*-
"""
The sink: drains the message queue into the job store in batches.

Several drain loops run at once (one per pooled database connection).  Each
takes whatever is queued, up to a batch size, and writes it in one round
trip, so a lone line is written at once and a flood fills its batches by
itself.  A batch that cannot be written because the database is away is
retried with backoff until it lands: meanwhile the queue fills and
backpressure pauses the clients.  Nothing accepted is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from tx_ingest.queue import Batch, MessageQueue, QueueClosed


class LineStore(Protocol):
    """
    What the sink writes to (see L{tx_ingest.store.JobStore}).
    """

    def insertLines(self, lines: Sequence[bytes]) -> Deferred[dict[int, str]]:
        """
        Store validated JSON object lines as jobs, in one transaction.

        @return: A L{Deferred} firing with C{{index: reason}} for lines the
            database refused; failing if the batch could not be written.
        """


class OutageLog:
    """
    Logs a database outage once when it starts and once when it ends, however
    many retries it takes.

    @ivar failures: Failed attempts in the current outage.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._since: float | None = None
        self.failures = 0
        self.outages = 0

    @property
    def inOutage(self) -> bool:
        """
        Whether writes are failing now.
        """
        return self._since is not None

    def failed(self, failure: Failure) -> None:
        """
        A write failed.
        """
        self.failures += 1
        if self._since is None:
            self._since = self._clock.seconds()
            self.outages += 1
            self.log.warn(
                "database writes failing ({error}); holding accepted lines and "
                "retrying",
                error=failure.getErrorMessage() or repr(failure.value),
            )

    def succeeded(self) -> None:
        """
        A write succeeded.
        """
        if self._since is not None:
            self.log.info(
                "database writes recovered after {seconds:.1f} s and "
                "{failures} failed attempts",
                seconds=self._clock.seconds() - self._since,
                failures=self.failures,
            )
            self._since = None
            self.failures = 0


class BatchSink(Service):
    """
    Drains a L{MessageQueue} into a L{LineStore}.

    @ivar written: Messages written (stored or refused) so far.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        queue: MessageQueue,
        store: LineStore,
        batchSize: int = 1000,
        concurrency: int = 4,
        ready: Deferred[Any] | None = None,
        minDelay: float = 0.05,
        maxDelay: float = 2.0,
    ) -> None:
        """
        @param clock: Schedules retries.
        @param queue: Where messages come from.
        @param store: Where they go.
        @param batchSize: The most messages per write.
        @param concurrency: How many batches are written at once.
        @param ready: Fires when the store can take writes (schema migrated);
            nothing is taken from the queue before.
        @param minDelay: The first retry delay, doubling up to C{maxDelay}.
        """
        self.clock = clock
        self.queue = queue
        self.store = store
        self.batchSize = batchSize
        self.concurrency = concurrency
        self.outage = OutageLog(clock)
        self.written = 0
        self._ready = ready
        self._minDelay = minDelay
        self._maxDelay = maxDelay
        self._loops: list[Deferred[None]] = []
        self._abandoned = False

    def startService(self) -> None:
        """
        Start the drain loops, once the store is ready.
        """
        Service.startService(self)
        if self._ready is None:
            self._startLoops()
        else:
            self._ready.addCallback(lambda _: self._startLoops())
            self._ready.addErrback(
                lambda f: self.log.failure("job store never became ready", f)
            )

    def _startLoops(self) -> None:
        """
        Start C{concurrency} drain loops.
        """
        if not self.running:
            return
        self._loops = [
            Deferred.fromCoroutine(self._drain(lane))
            for lane in range(self.concurrency)
        ]

    def stopService(self) -> Deferred[object]:  # type: ignore[override]
        """
        Wait for the loops to end: they end once the queue is closed and
        empty.  Close the queue before stopping the sink, or call
        L{abandon} to give up on what is still unwritten.
        """
        Service.stopService(self)
        stopped: Deferred[object] = DeferredList(self._loops).addCallback(
            lambda _: None
        )
        return stopped

    def abandon(self) -> None:
        """
        Stop retrying failed writes (the shutdown timeout has passed).  The
        batches concerned stay unsettled, so their clients never get an
        acknowledgement for them.
        """
        self._abandoned = True

    async def _drain(self, lane: int) -> None:
        """
        One drain loop: take a batch, write it until it lands, settle it.

        The first lane takes whatever is queued.  The others wait for a
        backlog (half the queue, or a full batch), so under light traffic
        one write is in flight at a time and lines arriving meanwhile share
        the next commit instead of each paying for its own.
        """
        atLeast = 1
        if lane:
            atLeast = max(1, min(self.batchSize, self.queue.capacity // 2))
        while not self._abandoned:
            try:
                batch = await self.queue.take(self.batchSize, atLeast)
            except QueueClosed:
                return
            rejected = await self._writeGuarded(batch)
            if rejected is None:
                return
            self.written += len(batch)
            batch.settle(rejected)

    async def _writeGuarded(self, batch: Batch) -> dict[int, str] | None:
        """
        L{_write}, surviving a bug in it: the batch is logged and tried
        again later rather than lost or left to block later acknowledgements.
        """
        while True:
            try:
                return await self._write(batch)
            except Exception:
                self.log.failure("unexpected error writing a batch")
                if self._abandoned:
                    return None
                await deferLater(self.clock, self._maxDelay, lambda: None)

    async def _write(self, batch: Batch) -> dict[int, str] | None:
        """
        Write one batch, retrying with backoff while it fails.

        @return: The refused lines by index, or L{None} if abandoned.
        """
        lines = batch.lines
        delay = self._minDelay
        while True:
            try:
                rejected = await self.store.insertLines(lines)
            except Exception:
                self.outage.failed(Failure())
            else:
                self.outage.succeeded()
                return rejected
            if self._abandoned:
                return None
            await deferLater(self.clock, delay, lambda: None)
            delay = min(delay * 2, self._maxDelay)
