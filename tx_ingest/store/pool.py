# -*- test-case-name: tests.test_pool -*-
"""
A pool of txpostgres connections that heals itself after the server goes away.

Each pooled L{Connection} has its own L{DeadConnectionDetector}: when one
notices that its server connection died (a restart, C{pg_terminate_backend},
a network cut) it reconnects in the background with a short backoff, while
calls made on it meanwhile fail at once.  The pool never retries a call
itself: a failure for which L{isConnectionFailure} is true reaches the caller
unchanged, and the caller decides whether and when to try again.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

from psycopg2 import InterfaceError, OperationalError, ProgrammingError
from psycopg2.extensions import parse_dsn
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from txpostgres.txpostgres import Connection, RollbackFailed

from tx_ingest.store.dsn import redactDsn

_T = TypeVar("_T")

_CONNECTION_FAILURES = (
    OperationalError,
    InterfaceError,
    ConnectionDead,
    RollbackFailed,
)


class PoolClosed(Exception):
    """
    The pool was closed: it takes no more calls, and calls still waiting for a
    connection when it closed fail with this.
    """


def isConnectionFailure(reason: Failure | BaseException) -> bool:
    """
    Tell whether a failure says nothing about the work itself, so that the
    same call may succeed if it is made again later.

    True for C{psycopg2.OperationalError} (a lost or refused connection, and
    also its subclasses for deadlocks, serialization failures and cancelled
    statements), C{psycopg2.InterfaceError}, txpostgres' L{ConnectionDead} (a
    pooled connection is reconnecting) and L{RollbackFailed}.  Whatever the
    failed call wrote was rolled back.

    @param reason: A failure, or the exception it wraps.

    @return: C{True} if the caller should retry after a pause.
    """
    error = reason.value if isinstance(reason, Failure) else reason
    return isinstance(error, _CONNECTION_FAILURES)


def fastReconnectionDelays() -> Iterator[float]:
    """
    The pauses between reconnection attempts: the first attempt at once, then
    from 0.1 seconds growing to at most 2 seconds, with a little jitter so
    that pooled connections do not all knock at the same instant.

    @return: An endless iterator of delays in seconds.
    """
    yield 0.0
    delay = 0.1
    while True:
        yield delay * random.uniform(0.8, 1.0)
        delay = min(delay * 1.6, 2.0)


# These are the only failures that mean the server connection itself is gone.
# Other OperationalErrors (deadlock, statement timeout) leave it usable.
def _diedFrom(reason: Failure, connection: Connection | None) -> bool:
    if reason.check(InterfaceError, RollbackFailed):
        return True
    if not reason.check(OperationalError):
        return False
    code = getattr(reason.value, "pgcode", None)
    if code is None or code.startswith("08") or code.startswith("57P"):
        return True
    return connection is None or bool(getattr(connection, "closed", True))


def _describe(reason: Failure) -> str:
    # psycopg2 messages span several indented lines; a log line should not.
    return " ".join(str(reason.value).split()) or type(reason.value).__name__


class _DescriptorGuard:
    """
    The reactor as a pooled connection sees it: adding and removing its
    socket survive libpq closing that socket on its own.

    When the server goes away, libpq closes the connection's socket itself
    and reports its descriptor as -1.  The epoll reactor keeps the old number
    registered (the kernel has already dropped it from the epoll set), so a
    new connection that is given the same number is never polled, and its
    start-up never finishes.  This guard drops such stale registrations.  It
    reads the epoll reactor's own tables; other reactors, which key their
    tables by object, are left alone.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def addReader(self, selectable: Any) -> None:
        """
        Watch C{selectable} for reading; see the class docstring.
        """
        self._add(self._reactor.addReader, selectable)

    def addWriter(self, selectable: Any) -> None:
        """
        Watch C{selectable} for writing; see the class docstring.
        """
        self._add(self._reactor.addWriter, selectable)

    def removeReader(self, selectable: Any) -> None:
        """
        Stop watching C{selectable} for reading; see the class docstring.
        """
        self._remove(self._reactor.removeReader, selectable)

    def removeWriter(self, selectable: Any) -> None:
        """
        Stop watching C{selectable} for writing; see the class docstring.
        """
        self._remove(self._reactor.removeWriter, selectable)

    def _add(self, add: Callable[[Any], None], selectable: Any) -> None:
        fd = selectable.fileno()
        if fd < 0:
            raise OperationalError("connection to PostgreSQL lost (socket closed)")
        owner = getattr(self._reactor, "_selectables", {}).get(fd)
        if owner is not None and owner is not selectable:
            self._forget(fd)
        add(selectable)

    def _remove(self, remove: Callable[[Any], None], selectable: Any) -> None:
        try:
            remove(selectable)
        except OSError:
            fd = getattr(selectable, "lastDescriptor", -1)
            if fd >= 0:
                self._forget(fd)

    def _forget(self, fd: int) -> None:
        """
        Drop every trace of descriptor number C{fd} from the reactor.
        """
        reactor = self._reactor
        for table in ("_reads", "_writes"):
            getattr(reactor, table, set()).discard(fd)
        getattr(reactor, "_selectables", {}).pop(fd, None)
        poller = getattr(reactor, "_poller", None)
        if poller is not None:
            try:
                poller.unregister(fd)
            except (OSError, ValueError):
                pass


class _PooledConnection(Connection):  # type: ignore[misc]
    """
    A txpostgres connection that reports a dead idle connection as a lost
    connection rather than as an unhandled error, and whose reactor
    registrations survive libpq closing its socket (see L{_DescriptorGuard}).

    txpostgres raises from C{doRead} when the server closes an idle
    connection, so the reactor logs a traceback before it calls
    C{connectionLost}.  Returning the error instead makes the reactor call
    C{connectionLost} with it quietly; the pool logs one line about it.

    @ivar lastDescriptor: The socket's descriptor number when last open.
    """

    lastDescriptor = -1

    def __init__(self, reactor: Any, **kwargs: Any) -> None:
        super().__init__(reactor=_DescriptorGuard(reactor), **kwargs)

    def fileno(self) -> int:
        """
        @return: The socket's descriptor, or -1 once libpq has closed it.
        """
        fd: int = Connection.fileno(self)
        if fd >= 0:
            self.lastDescriptor = fd
        return fd

    def doRead(self) -> BaseException | None:
        """
        Read what the server sent (results or notifications).

        @return: The error that ended the connection, if one did.
        """
        try:
            Connection.doRead(self)
        except (OperationalError, InterfaceError) as error:
            return error
        return None


class _HealingDetector(DeadConnectionDetector):  # type: ignore[misc]
    """
    A dead-connection detector whose reconnection loop can be stopped and
    waited for, so that a pool can close without leaving timers behind.

    @ivar connectionIsDead: Whether calls on the connection currently fail at
        once with L{ConnectionDead}.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        onLost: Callable[[Failure], None],
        onAttemptFailed: Callable[[Failure], None],
    ) -> None:
        """
        @param reactor: Schedules the pauses between attempts.

        @param onLost: Called with the failure that showed the connection
            dead, when the detector starts reconnecting.

        @param onAttemptFailed: Called with the failure of each connection
            attempt that did not succeed.
        """
        super().__init__(
            deathChecker=self._isDeath,
            reconnectionIterator=fastReconnectionDelays,
            reactor=reactor,
        )
        self._onLost = onLost
        self._onAttemptFailed = onAttemptFailed
        self._stopping = False
        self._pause: Deferred[None] | None = None
        self._loop: Deferred[None] | None = None

    def _isDeath(self, reason: Failure) -> bool:
        if self._stopping:
            return False
        return _diedFrom(reason, self.reconnectable)

    def connectUntilOpen(self) -> None:
        """
        Make the first connection: the connection counts as dead until an
        attempt succeeds.
        """
        self.connectionIsDead = True
        self._startLoop()

    def startReconnecting(self, f: Failure) -> None:
        """
        Start reconnecting, after C{f} showed the connection dead.

        @param f: The failure that showed it.
        """
        self._onLost(f)
        self._startLoop()

    def _startLoop(self) -> None:
        loop = self._loop = Deferred.fromCoroutine(self._reconnectUntilOpen())

        def done(result: object) -> object:
            if self._loop is loop:
                self._loop = None
            return result

        loop.addBoth(done)

    async def _reconnectUntilOpen(self) -> None:
        for delay in self.reconnectionIterator():
            if delay:
                self._pause = deferLater(self.reactor, delay, lambda: None)
                try:
                    await self._pause
                except CancelledError:
                    return
                finally:
                    self._pause = None
            if self._stopping:
                return
            try:
                await self.reconnect()
            except Exception:
                if self._stopping:
                    return
                self._onAttemptFailed(Failure())
                continue
            if not self._stopping:
                await self.connectionRecovered()
            return

    def stopReconnecting(self) -> Deferred[None]:
        """
        Stop reconnecting for good.

        @return: Fires once no connection attempt is in progress.
        """
        self._stopping = True
        if self._pause is not None:
            self._pause.cancel()
        if self._loop is None:
            return succeed(None)
        stopped: Deferred[None] = Deferred()
        self._loop.addBoth(lambda result: stopped.callback(None))
        return stopped


class HealingPool:
    """
    A fixed number of txpostgres connections to one database, handed out one
    caller at a time, which reconnect by themselves when the server comes
    back.

    @ivar size: How many connections the pool holds.
    @ivar dsn: The DSN it connects with.
    """

    log = Logger()

    def __init__(self, reactor: Any, dsn: str, size: int = 4) -> None:
        """
        @param reactor: An L{IReactorFDSet}, L{IReactorTime} and
            L{IReactorCore} provider.

        @param dsn: Where to connect, as a URL or C{key=value} DSN.

        @param size: The number of connections (at least 1).

        @raise ValueError: If C{size} is not positive or C{dsn} is malformed.
        """
        if size < 1:
            raise ValueError(f"pool size must be at least 1, not {size!r}")
        try:
            parse_dsn(dsn)
        except ProgrammingError as e:
            raise ValueError(f"malformed DSN {redactDsn(dsn)!r}: {e}") from None

        self.size = size
        self.dsn = dsn
        self._reactor: IReactorCore = reactor
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self._connections: list[Connection] = []
        self._open: set[Connection] = set()
        self._free: deque[Connection] = deque()
        self._busy: set[Connection] = set()
        self._waiters: deque[Deferred[Connection]] = deque()
        self._started: Deferred[None] | None = None
        self._waitingLogged = False
        self._closing = False
        self._closed = False
        self._closeObservers: list[Deferred[None]] = []
        self._idleObservers: list[Deferred[None]] = []

        for number in range(1, size + 1):
            detector = _HealingDetector(
                reactor,
                partial(self._connectionLost, number),
                self._attemptFailed,
            )
            connection = _PooledConnection(
                reactor=reactor, cooperator=self._cooperator, detector=detector
            )
            detector.addRecoveryHandler(partial(self._connectionOpened, connection))
            self._connections.append(connection)
            self._free.append(connection)

    @property
    def openConnections(self) -> int:
        """
        The number of connections that are open right now.
        """
        return len(self._open)

    def start(self) -> Deferred[None]:
        """
        Connect every pooled connection.

        If the server cannot be reached, keep trying with backoff (and log
        that once), so that a service may start before its database.  Calls
        made meanwhile fail with L{ConnectionDead}.

        @return: Fires with L{None} once every connection is open, or when
            L{close} is called before that.  It never fails.
        """
        if self._started is not None or self._closing:
            return fail(RuntimeError("HealingPool.start called twice"))
        self._started = Deferred()
        started = self._started
        for connection in self._connections:
            connection.detector.setReconnectable(connection, self.dsn)
            connection.detector.connectUntilOpen()
        return started

    def run(self, fn: Callable[[Connection], Deferred[_T]]) -> Deferred[_T]:
        """
        Call C{fn} with a connection of its own.

        Callers wait in order for a free open connection.  If no connection
        is open at all, the call fails at once with L{ConnectionDead}
        instead, so that callers can back off while the pool reconnects.

        @param fn: Given the connection; returns a L{Deferred}.  The
            connection is released once that fires; C{fn} must not use it
            afterwards.

        @return: Fires with C{fn}'s result or failure, passed on unchanged.
        """
        if self._closing:
            return fail(PoolClosed())

        def use(connection: Connection) -> Deferred[_T]:
            result = maybeDeferred(fn, connection)

            def release(outcome: object) -> object:
                self._release(connection)
                return outcome

            return result.addBoth(release)

        return self._acquire().addCallback(use)

    def runQuery(self, *args: Any, **kwargs: Any) -> Deferred[list[tuple[Any, ...]]]:
        """
        Run one query in its own transaction.

        @param args: Passed on to L{Connection.runQuery}.
        @param kwargs: Passed on to L{Connection.runQuery}.

        @return: Fires with all result rows.
        """
        return self.run(lambda connection: connection.runQuery(*args, **kwargs))

    def runOperation(self, *args: Any, **kwargs: Any) -> Deferred[None]:
        """
        Run one statement (or several, separated by semicolons, in one
        implicit transaction) and discard any result.

        @param args: Passed on to L{Connection.runOperation}.
        @param kwargs: Passed on to L{Connection.runOperation}.

        @return: Fires with L{None}.
        """
        return self.run(lambda connection: connection.runOperation(*args, **kwargs))

    def runInteraction(
        self, interaction: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Deferred[Any]:
        """
        Run C{interaction} with a cursor inside a transaction, committed if
        it succeeds and rolled back otherwise.

        @param interaction: Called with a txpostgres cursor and C{args} and
            C{kwargs}; may return a L{Deferred}.
        @param args: Passed on to C{interaction}.
        @param kwargs: Passed on to C{interaction}.

        @return: Fires with C{interaction}'s result.
        """
        return self.run(
            lambda connection: connection.runInteraction(interaction, *args, **kwargs)
        )

    def close(self) -> Deferred[None]:
        """
        Stop reconnecting, fail the calls still waiting for a connection with
        L{PoolClosed}, wait for the calls in progress, then close every
        connection.

        @return: Fires once everything is closed.
        """
        if self._closed:
            return succeed(None)
        observer: Deferred[None] = Deferred()
        self._closeObservers.append(observer)
        if not self._closing:
            self._closing = True
            Deferred.fromCoroutine(self._close()).addBoth(self._notifyClosed)
        return observer

    async def _close(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(PoolClosed())
        if self._started is not None and not self._started.called:
            self._started.callback(None)

        for connection in self._connections:
            await connection.detector.stopReconnecting()
        if self._busy:
            idle: Deferred[None] = Deferred()
            self._idleObservers.append(idle)
            await idle
        for connection in self._connections:
            if connection.pollable() is not None:
                connection.close()
        self._open.clear()
        self._cooperator.stop()

    def _notifyClosed(self, result: object) -> None:
        self._closed = True
        observers, self._closeObservers = self._closeObservers, []
        for observer in observers:
            if isinstance(result, Failure):
                observer.errback(result)
            else:
                observer.callback(None)

    def _isOpen(self, connection: Connection) -> bool:
        return connection in self._open and not connection.detector.connectionIsDead

    def _acquire(self) -> Deferred[Connection]:
        for connection in self._free:
            if self._isOpen(connection):
                self._free.remove(connection)
                self._busy.add(connection)
                return succeed(connection)
        if not self._open:
            return fail(ConnectionDead())
        waiter: Deferred[Connection] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def _handOver(self, connection: Connection) -> None:
        self._busy.add(connection)
        self._waiters.popleft().callback(connection)

    def _release(self, connection: Connection) -> None:
        self._busy.discard(connection)
        if self._waiters and self._isOpen(connection):
            self._handOver(connection)
            return
        self._free.append(connection)
        if not self._busy and self._idleObservers:
            observers, self._idleObservers = self._idleObservers, []
            for observer in observers:
                observer.callback(None)
        self._failWaitersIfHopeless()

    def _failWaitersIfHopeless(self) -> None:
        if self._open or not self._waiters:
            return
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(ConnectionDead())

    def _connectionOpened(self, connection: Connection) -> None:
        self._open.add(connection)
        if self._started is not None and self._started.called:
            if not self._waitingLogged:
                self.log.info(
                    "reopened PostgreSQL connection {number} of {size}",
                    number=self._connections.index(connection) + 1,
                    size=self.size,
                )
        if len(self._open) == self.size:
            if self._waitingLogged:
                self.log.info(
                    "all {size} connections to PostgreSQL at {dsn} are open",
                    size=self.size,
                    dsn=redactDsn(self.dsn),
                )
            elif self._started is not None and not self._started.called:
                self.log.info(
                    "connected to PostgreSQL at {dsn} ({size} connections)",
                    size=self.size,
                    dsn=redactDsn(self.dsn),
                )
            self._waitingLogged = False
            if self._started is not None and not self._started.called:
                self._started.callback(None)
        if connection in self._free and self._waiters:
            self._free.remove(connection)
            self._handOver(connection)

    def _connectionLost(self, number: int, reason: Failure) -> None:
        self._open.discard(self._connections[number - 1])
        self.log.warn(
            "lost PostgreSQL connection {number} of {size} ({live} open): {error}",
            number=number,
            size=self.size,
            live=len(self._open),
            error=_describe(reason),
        )
        self._failWaitersIfHopeless()

    def _attemptFailed(self, reason: Failure) -> None:
        if self._waitingLogged:
            return
        self._waitingLogged = True
        self.log.warn(
            "waiting for PostgreSQL at {dsn}: {error}",
            dsn=redactDsn(self.dsn),
            error=_describe(reason),
        )
