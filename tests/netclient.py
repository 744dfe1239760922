"""
A minimal NDJSON test client over real loopback sockets.
"""

from __future__ import annotations

import simplejson
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class ReplyCollector(Protocol):
    """
    Collects the server's reply lines; C{closed} fires with them when the
    server closes the connection.

    @ivar replies: The parsed replies so far.
    """

    def __init__(self) -> None:
        self.replies: list[dict] = []
        self.closed: Deferred[list[dict]] = Deferred()
        self._buffer = b""
        self._waiters: list[tuple[object, Deferred[dict]]] = []

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            reply = simplejson.loads(line)
            self.replies.append(reply)
            for waiter in list(self._waiters):
                predicate, d = waiter
                if predicate(reply):  # type: ignore[operator]
                    self._waiters.remove(waiter)
                    d.callback(reply)

    def waitFor(self, predicate) -> Deferred[dict]:  # type: ignore[no-untyped-def]
        """
        @return: A L{Deferred} firing with the first reply (past or future)
            for which C{predicate} is true.
        """
        for reply in self.replies:
            if predicate(reply):
                d: Deferred[dict] = Deferred()
                d.callback(reply)
                return d
        d = Deferred()
        self._waiters.append((predicate, d))
        return d

    def send(self, data: bytes, halfClose: bool = False) -> None:
        """
        Write C{data}, then optionally half-close.
        """
        self.transport.write(data)
        if halfClose:
            self.transport.loseWriteConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.closed.called:
            self.closed.callback(self.replies)


async def connect(port: int) -> ReplyCollector:
    """
    Connect a L{ReplyCollector} to 127.0.0.1:C{port}.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = ReplyCollector()
    await connectProtocol(endpoint, client)
    return client
