# -*- test-case-name: tests.test_queue -*-
"""
The bounded queue between the sockets and the sink: where backpressure is
decided.

Every accepted line becomes a L{Message} in one L{MessageQueue} shared by all
connections.  The queue never holds more than its capacity: when it reaches
its high-water mark it pauses every registered reader, and when consumers
take it down to its low-water mark it resumes them.  Consumers take messages
in L{Batch}es and settle each batch once its messages are handled; batches
are settled to their readers in the order they were taken, so cumulative
acknowledgements stay true even when several batches are written at once.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, Protocol

import simplejson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class MessageOrigin(Protocol):
    """
    What a message knows of the connection it came from: how to pause and
    resume reading it, and how to tell it that its lines were handled.
    """

    def pauseReading(self) -> None:
        """
        Stop reading: the queue is full.
        """

    def resumeReading(self) -> None:
        """
        Read again: the queue has room.
        """

    def linesSettled(
        self, count: int, highest: int, rejected: list[tuple[int, str]]
    ) -> None:
        """
        C{count} of this origin's accepted lines were handled, the highest of
        them line C{highest}; C{rejected} lists C{(line, detail)} for those the
        consumer refused.
        """


class Message(NamedTuple):
    """
    One accepted line.

    @ivar line: The line's bytes as received, without its delimiter: one
        UTF-8 JSON object, already validated.
    @ivar number: The 1-based number of the line on its connection.
    @ivar origin: The connection it came from.
    """

    line: bytes
    number: int
    origin: MessageOrigin

    def json(self) -> dict:
        """
        Parse the line again.  Messages keep only their bytes, so that the
        queue's memory bound is a bound on bytes; parsing is the consumer's.

        @return: The JSON object.
        """
        result: dict = simplejson.loads(self.line)
        return result


#: What the queue holds per line: a plain tuple laid out as L{Message}
#: (building one costs a fraction of building a L{Message}).
Entry = tuple[bytes, int, MessageOrigin]


class QueueClosed(Exception):
    """
    The queue was closed and holds nothing more.
    """


class Batch:
    """
    Messages taken from a L{MessageQueue} together.  Call L{settle} exactly
    once, when every message is handled (stored, or refused).

    @ivar entries: The messages as plain tuples, in the order they were
        queued.
    """

    def __init__(self, queue: MessageQueue, entries: list[Entry]) -> None:
        self.entries = entries
        self._messages: list[Message] | None = None
        self._queue = queue
        self._settled = False
        self._rejected: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def messages(self) -> list[Message]:
        """
        The messages, in the order they were queued.
        """
        if self._messages is None:
            self._messages = [Message(*entry) for entry in self.entries]
        return self._messages

    @property
    def lines(self) -> list[bytes]:
        """
        The messages' lines, in order.
        """
        return [entry[0] for entry in self.entries]

    def settle(self, rejected: dict[int, str] | None = None) -> None:
        """
        Mark the batch handled.

        @param rejected: Maps an index into L{messages} to the reason that
            message was refused; the others count as stored.
        """
        if self._settled:
            raise RuntimeError("batch settled twice")
        self._settled = True
        self._rejected = rejected or {}
        self._queue._batchSettled(self)


def _notifyOrigins(batches: list[Batch]) -> None:
    """
    Tell each origin how many of its lines these batches (taken one after
    another) handled, once per origin however many batches.
    """
    counts: dict[MessageOrigin, list] = {}
    for batch in batches:
        entries = batch.entries
        for _, number, origin in entries:
            count = counts.get(origin)
            if count is None:
                counts[origin] = [1, number, []]
            else:
                count[0] += 1
                count[1] = number
        for index, detail in sorted(batch._rejected.items()):
            _, number, origin = entries[index]
            counts[origin][2].append((number, detail))
    for origin, (count, highest, rejected) in counts.items():
        origin.linesSettled(count, highest, rejected)


class MessageQueue:
    """
    A FIFO of L{Message}s with a hard capacity, shared by every connection.

    Readers register themselves; when the number of queued messages reaches
    C{highWater} every reader is paused, and when it falls to C{lowWater}
    every reader is resumed.  A reader must check L{paused} after each
    L{put} and stop putting while it is true, which makes C{capacity} (equal
    to C{highWater}) a hard bound.

    @ivar capacity: The most messages ever queued at once.
    @ivar paused: Whether readers are paused now.
    @ivar highestSize: The largest number of messages ever queued at once,
        for tests and metrics.
    """

    log = Logger()

    def __init__(
        self, clock: IReactorTime, capacity: int, lowWater: int | None = None
    ) -> None:
        """
        @param clock: Used to wake consumers on the next reactor turn, so a
            consumer takes a whole received chunk rather than its first line.
        @param capacity: The high-water mark and hard cap, at least 1.
        @param lowWater: Where readers resume; half the capacity by default.
        """
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.lowWater = capacity // 2 if lowWater is None else lowWater
        self.paused = False
        self.highestSize = 0
        self.pauses = 0
        self._clock = clock
        self._messages: deque[Entry] = deque()
        self._readers: set[MessageOrigin] = set()
        self._waiters: deque[tuple[Deferred[Batch], int, int]] = deque()
        self._wakeCall: IDelayedCall | None = None
        self._closed = False
        self._unsettled: deque[Batch] = deque()
        self._doneBatches: set[Batch] = set()
        self._drained: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def inFlight(self) -> int:
        """
        The number of messages taken but not yet settled.
        """
        return sum(len(batch) for batch in self._unsettled)

    def addReader(self, reader: MessageOrigin) -> None:
        """
        Register a reader to pause and resume with the queue.  A reader added
        while the queue is paused is paused at once.
        """
        self._readers.add(reader)
        if self.paused:
            reader.pauseReading()

    def removeReader(self, reader: MessageOrigin) -> None:
        """
        Forget a reader (its connection is gone).
        """
        self._readers.discard(reader)

    def put(self, message: Message) -> None:
        """
        Queue one message.  The caller checks L{paused} afterwards.

        @raise QueueClosed: If the queue no longer accepts messages.
        """
        self.putMany([message])

    def putMany(self, messages: list[Entry]) -> None:
        """
        Queue several messages at once; the caller never passes more than
        the room left (C{capacity - len(queue)}) and checks L{paused}
        afterwards.

        @raise QueueClosed: If the queue no longer accepts messages.
        """
        if self._closed:
            raise QueueClosed()
        queued = self._messages
        queued.extend(messages)
        size = len(queued)
        if size >= self.capacity:
            if size > self.capacity:
                raise RuntimeError("message queue over its capacity")
            self._pause()
        if size > self.highestSize:
            self.highestSize = size
        if self._waiters and self._wakeCall is None:
            self._wakeCall = self._clock.callLater(0, self._wakeWaiters)

    def take(self, most: int, atLeast: int = 1) -> Deferred[Batch]:
        """
        Take up to C{most} messages, waiting until at least C{atLeast} are
        queued (or the queue is closed and anything is left).  Waiting
        consumers are served in the order they asked.

        @return: A L{Deferred} firing with a non-empty L{Batch}, or failing
            with L{QueueClosed} once the queue is closed and empty.
        """
        if self._closed and not self._messages:
            return fail(QueueClosed())
        waiter: Deferred[Batch] = Deferred()
        self._waiters.append((waiter, most, atLeast))
        if self._messages:
            self._wakeWaiters()
        return waiter

    def close(self) -> None:
        """
        Accept no more messages.  Consumers still take what is queued, then
        their L{take} fails with L{QueueClosed}.
        """
        self._closed = True
        self._wakeWaiters()

    def whenSettled(self) -> Deferred[None]:
        """
        @return: A L{Deferred} that fires once nothing is queued or in flight.
        """
        if not self._messages and not self._unsettled:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def _takeNow(self, most: int) -> Batch:
        """
        Move up to C{most} queued messages into a new unsettled batch.
        """
        messages = self._messages
        if len(messages) <= most:
            taken = list(messages)
            messages.clear()
        else:
            taken = [messages.popleft() for _ in range(most)]
        batch = Batch(self, taken)
        self._unsettled.append(batch)
        if self.paused and len(messages) <= self.lowWater:
            self._resume()
        return batch

    def _wakeWaiters(self) -> None:
        """
        Hand queued messages to waiting consumers whose minimum is met (any
        of them once closed), oldest waiter first.
        """
        self._wakeCall = None
        for entry in list(self._waiters):
            waiter, most, atLeast = entry
            if not self._messages:
                break
            if entry not in self._waiters:
                continue  # served by a nested call from a callback
            if len(self._messages) >= atLeast or self._closed:
                self._waiters.remove(entry)
                waiter.callback(self._takeNow(most))
        if self._closed and not self._messages:
            self._failWaiters()

    def _failWaiters(self) -> None:
        """
        Tell every waiting consumer that nothing more will come.
        """
        while self._waiters:
            waiter, _, _ = self._waiters.popleft()
            waiter.errback(QueueClosed())
        self._checkDrained()

    def _batchSettled(self, batch: Batch) -> None:
        """
        Settle finished batches to their origins, in the order taken.
        """
        self._doneBatches.add(batch)
        unsettled = self._unsettled
        released = []
        while unsettled and unsettled[0] in self._doneBatches:
            head = unsettled.popleft()
            self._doneBatches.discard(head)
            released.append(head)
        if released:
            _notifyOrigins(released)
        self._checkDrained()

    def _checkDrained(self) -> None:
        """
        Fire L{whenSettled} waiters if nothing is queued or in flight.
        """
        if self._messages or self._unsettled or not self._drained:
            return
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def _pause(self) -> None:
        """
        Pause every reader.
        """
        if self.paused:
            return
        self.paused = True
        self.pauses += 1
        for reader in list(self._readers):
            reader.pauseReading()

    def _resume(self) -> None:
        """
        Resume every reader.
        """
        self.paused = False
        for reader in list(self._readers):
            if self.paused:
                break
            reader.resumeReading()
