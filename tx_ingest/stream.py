# -*- test-case-name: tests.test_stream -*-
"""
The listener as a stream, for library users: listen on endpoints and consume
the accepted messages with C{async for}.

    stream = await listen(reactor, "tcp:5000:interface=127.0.0.1", ack=True)
    async for batch in stream.batches(500):
        await store(batch.messages)
        batch.settle()

Each L{Message} carries its line's bytes, its line number and its origin, so
a consumer can answer the client later: settling a batch sends the
acknowledgements and the replies for refused lines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger

from tx_ingest.listener import IngestFactory
from tx_ingest.protocol import ProtocolSettings
from tx_ingest.queue import Batch, Message, MessageQueue, QueueClosed

#: Seconds connections get to flush their last replies when the stream stops.
CLOSE_GRACE = 5.0


class IngestStream:
    """
    Accepted messages from every connection of one or more listeners, in one
    bounded queue.

    @ivar queue: The shared L{MessageQueue}.
    @ivar factory: The L{IngestFactory} building the connections.
    @ivar ports: The listening ports, once L{listenOn} has been called.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        maxConnections: int = 100,
        maxLineBytes: int = 8192,
        queueSize: int = 1024,
        idleTimeout: float = 300.0,
        ack: bool = False,
    ) -> None:
        """
        @param clock: The reactor (its clock schedules wake-ups and timeouts).
        @param maxConnections: The most clients served at once.
        @param maxLineBytes: The longest line accepted, without its newline.
        @param queueSize: The most messages held between sockets and consumer.
        @param idleTimeout: Seconds of silence before a client is dropped.
        @param ack: Whether clients get cumulative acknowledgements.
        """
        self.clock = clock
        self.queue = MessageQueue(clock, queueSize)
        self.factory = IngestFactory(
            self.queue,
            clock,
            ProtocolSettings(maxLineBytes, idleTimeout, ack),
            maxConnections,
        )
        self.ports: list[IListeningPort] = []

    async def listenOn(self, endpoint: IStreamServerEndpoint) -> IListeningPort:
        """
        Accept connections on C{endpoint} too.

        @return: The listening port.
        """
        port: IListeningPort = await endpoint.listen(self.factory)
        self.ports.append(port)
        return port

    def batches(self, most: int = 1000) -> AsyncIterator[Batch]:
        """
        Iterate over batches of at most C{most} messages until the stream is
        stopped and drained.  Settle each batch when it is handled.
        """
        return self._iterBatches(most)

    async def _iterBatches(self, most: int) -> AsyncIterator[Batch]:
        while True:
            try:
                batch = await self.queue.take(most)
            except QueueClosed:
                return
            yield batch

    async def __aiter__(self) -> AsyncIterator[Message]:
        """
        Iterate over single messages.  A message counts as handled (and is
        acknowledged) when the consumer asks for the next one.
        """
        async for batch in self.batches(100):
            for message in batch.messages:
                yield message
            batch.settle()

    async def stop(self, timeout: float = 30.0) -> int:
        """
        Stop accepting and reading, wait (up to C{timeout} seconds) for the
        consumer to settle what was accepted, then close every connection.

        @return: How many accepted messages were left unsettled.
        """
        await DeferredList([maybeDeferred(port.stopListening) for port in self.ports])
        self.factory.stopReading()
        self.queue.close()
        drained = self.queue.whenSettled()
        drained.addTimeout(timeout, self.clock)
        try:
            await drained
        except TimeoutError:
            pass
        left = len(self.queue) + self.queue.inFlight

        # Close once the replies written so far (the final acks) are out;
        # a client that does not read them is cut off after a short grace.
        closed = self.factory.closeAll()
        closed.addTimeout(CLOSE_GRACE, self.clock)
        try:
            await closed
        except TimeoutError:
            self.factory.abortAll()
        return left


async def listen(
    reactor: IReactorCore,
    endpoint: str | IStreamServerEndpoint,
    **settings: object,
) -> IngestStream:
    """
    Listen for NDJSON clients on C{endpoint}.

    @param reactor: The reactor to listen with.
    @param endpoint: A server endpoint or endpoint string, such as
        C{"tcp:5000:interface=127.0.0.1"}.
    @param settings: Keyword arguments for L{IngestStream}.
    @return: The stream, already listening.
    """
    stream = IngestStream(reactor, **settings)  # type: ignore[arg-type]
    if isinstance(endpoint, str):
        endpoint = serverFromString(reactor, endpoint)
    await stream.listenOn(endpoint)  # type: ignore[arg-type]
    return stream


def deferredListen(
    reactor: IReactorCore, endpoint: str | IStreamServerEndpoint, **settings: object
) -> Deferred[IngestStream]:
    """
    L{listen}, for callers that want a L{Deferred}.
    """
    return Deferred.fromCoroutine(listen(reactor, endpoint, **settings))
