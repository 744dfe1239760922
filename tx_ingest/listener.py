# -*- test-case-name: tests.test_listener -*-
"""
Where connections are counted: the factory that builds one L{NDJSONProtocol}
per client and refuses clients beyond the connection cap.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from tx_ingest.protocol import (
    TOO_MANY_CONNECTIONS,
    NDJSONProtocol,
    ProtocolSettings,
    encodeReply,
)
from tx_ingest.queue import MessageQueue
from tx_ingest.throttle import WarningThrottle


class RefusingProtocol(Protocol):
    """
    Tells a client that the server is full, then closes.
    """

    transport: ITransport  # type: ignore[assignment]

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connectionMade(self) -> None:
        """
        Reply with the limit and close; whatever the client sent is ignored.
        """
        self.transport.write(
            encodeReply({"error": TOO_MANY_CONNECTIONS, "limit": self.limit})
        )
        self.transport.loseConnection()


class IngestFactory(Factory):
    """
    Builds connections that feed one L{MessageQueue}, at most
    C{maxConnections} of them alive at once.

    @ivar connections: The live connections.
    @ivar refused: How many connections were refused so far.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        queue: MessageQueue,
        clock: IReactorTime,
        settings: ProtocolSettings,
        maxConnections: int = 100,
        warnings: WarningThrottle | None = None,
    ) -> None:
        self.queue = queue
        self.clock = clock
        self.settings = settings
        self.maxConnections = maxConnections
        self.warnings = warnings or WarningThrottle(self.log, clock)
        self.connections: set[NDJSONProtocol] = set()
        self._whenEmpty: list[Deferred[None]] = []
        self.refused = 0
        self.reading = True

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """
        A new L{NDJSONProtocol}, or a L{RefusingProtocol} when full or no
        longer reading.
        """
        if len(self.connections) >= self.maxConnections or not self.reading:
            self.refused += 1
            self.warnings.warn(
                "refused {peer}: {live} live connections (limit {limit})",
                peer=getattr(addr, "host", addr),
                live=len(self.connections),
                limit=self.maxConnections,
            )
            return RefusingProtocol(self.maxConnections)
        protocol = NDJSONProtocol(self.queue, self.settings, self.clock, self.warnings)
        protocol.factory = self
        return protocol

    def connectionOpened(self, protocol: NDJSONProtocol) -> None:
        """
        Count a connection that has started.
        """
        self.connections.add(protocol)

    def connectionClosed(self, protocol: NDJSONProtocol) -> None:
        """
        Stop counting a connection that has ended, however it ended.
        """
        self.connections.discard(protocol)
        if not self.connections:
            waiting, self._whenEmpty = self._whenEmpty, []
            for d in waiting:
                if not d.called:  # not already timed out
                    d.callback(None)

    def stopReading(self) -> None:
        """
        Stop reading from every connection and build no new ones.
        """
        self.reading = False
        for protocol in list(self.connections):
            protocol.stopReading()

    def closeAll(self) -> Deferred[None]:
        """
        Close every connection once its replies are written.

        @return: Fires once every connection is gone.
        """
        closed: Deferred[None] = Deferred()
        if not self.connections:
            closed.callback(None)
            return closed
        self._whenEmpty.append(closed)
        for protocol in list(self.connections):
            protocol.closeConnection()
        return closed

    def abortAll(self) -> None:
        """
        Drop every connection at once, unsent replies and all.
        """
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
