# -*- test-case-name: tests.test_pool -*-
"""
Tests for L{tx_ingest.store.pool}, against a real PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any, cast

import psycopg2
from psycopg2 import OperationalError
from psycopg2.errors import LockNotAvailable
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txpostgres.reconnection import ConnectionDead
from txpostgres.txpostgres import RollbackFailed

from tests.pgfixture import (
    DatabaseTestCase,
    allowConnections,
    createDatabase,
    dropDatabase,
    terminateBackends,
)
from tx_ingest.store.pool import (
    HealingPool,
    PoolClosed,
    _DescriptorGuard,
    fastReconnectionDelays,
    isConnectionFailure,
)


async def sleep(seconds: float) -> None:
    """
    Wait a while without blocking the reactor.

    @param seconds: How long.
    """
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """
    Retry C{check} until it succeeds.

    @param check: Returns an awaitable that fails until the expected state
        is reached.
    @param timeout: How long to keep trying, in seconds.

    @return: What C{check} finally returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except Exception:
            if time.monotonic() > deadline:
                raise
        await sleep(0.05)


def backendPid(pool: HealingPool) -> Deferred[int]:
    """
    Ask the server which process serves one of C{pool}'s connections.

    @param pool: The pool.

    @return: Fires with the backend's process id.
    """
    return pool.runQuery("SELECT pg_backend_pid()").addCallback(lambda r: r[0][0])


def collectingLogger(events: list[LogEvent]) -> Logger:
    """
    Make a logger for a pool under test.

    @param events: Where the logger's events go.

    @return: The logger.
    """
    return Logger(observer=cast(ILogObserver, events.append))


class ConnectionFailureTests(SynchronousTestCase):
    """
    Tests for L{isConnectionFailure} and L{fastReconnectionDelays}.
    """

    def test_connectionFailures(self) -> None:
        """
        Lost connections, a reconnecting pool and failed rollbacks are
        connection failures, whether given as exceptions or failures.
        """
        for error in [
            psycopg2.OperationalError("server closed the connection"),
            psycopg2.InterfaceError("connection already closed"),
            ConnectionDead(),
            RollbackFailed(None, None),
        ]:
            self.assertTrue(isConnectionFailure(error), error)
            self.assertTrue(isConnectionFailure(Failure(error)), error)

    def test_otherFailures(self) -> None:
        """
        Errors about the statement or the data are not connection failures,
        and neither is a closed pool.
        """
        for error in [
            psycopg2.DataError("bad json"),
            psycopg2.ProgrammingError("syntax error"),
            psycopg2.IntegrityError("duplicate key"),
            PoolClosed(),
            ValueError("no"),
        ]:
            self.assertFalse(isConnectionFailure(error), error)
            self.assertFalse(isConnectionFailure(Failure(error)), error)

    def test_delays(self) -> None:
        """
        The first reconnection attempt is immediate, the next comes within
        0.1 seconds, and pauses grow but never beyond 2 seconds.
        """
        delays = list(islice(fastReconnectionDelays(), 30))
        self.assertEqual(delays[0], 0.0)
        self.assertTrue(0 < delays[1] <= 0.1, delays[1])
        self.assertTrue(delays[5] > delays[1], delays)
        self.assertTrue(all(d <= 2.0 for d in delays), delays)
        self.assertTrue(delays[-1] > 1.5, delays)

    def test_badArguments(self) -> None:
        """
        A pool refuses a malformed DSN (without showing its password) and a
        size below one.
        """
        error = self.assertRaises(
            ValueError, HealingPool, reactor, "host=x password=secret nonsense", 1
        )
        self.assertNotIn("secret", str(error))
        self.assertRaises(ValueError, HealingPool, reactor, "host=x", 0)


class PoolTests(DatabaseTestCase):
    """
    Tests for L{HealingPool} with a reachable server.
    """

    poolSize = 2

    async def test_runPassesResult(self) -> None:
        """
        L{HealingPool.run} gives C{fn} a connection and passes on what its
        Deferred fires with.
        """
        result = await self.pool.run(lambda c: c.runQuery("SELECT 40 + 2"))
        self.assertEqual(result, [(42,)])

    async def test_runPassesFailure(self) -> None:
        """
        A failing call reaches the caller with its original exception, and
        the connection is released for the next call.
        """
        for _ in range(self.poolSize + 1):
            with self.assertRaises(psycopg2.errors.UndefinedTable):
                await self.pool.runQuery("SELECT * FROM nowhere")
        self.assertEqual(await self.pool.runQuery("SELECT 1"), [(1,)])

    async def test_runReleasesAfterSynchronousError(self) -> None:
        """
        If C{fn} raises instead of returning a Deferred, the call fails with
        that exception and the connection is still released.
        """

        def broken(connection: object) -> Deferred[None]:
            raise ZeroDivisionError()

        for _ in range(self.poolSize + 1):
            with self.assertRaises(ZeroDivisionError):
                await self.pool.run(broken)

    async def test_waitersServedInOrder(self) -> None:
        """
        Callers beyond the pool's size wait, and are served in the order
        they called.
        """
        order: list[int] = []
        gate: Deferred[None] = Deferred()

        def hold(connection: object) -> Deferred[None]:
            return gate

        holders = [self.pool.run(hold) for _ in range(self.poolSize)]

        def record(number: int) -> Callable[[Any], Deferred[None]]:
            def use(connection: Any) -> Deferred[None]:
                order.append(number)
                return connection.runOperation("SELECT 1")

            return use

        waiters = [self.pool.run(record(n)) for n in range(5)]
        self.assertEqual(order, [])
        gate.callback(None)
        await DeferredList(holders + waiters, fireOnOneErrback=True)
        self.assertEqual(order, [0, 1, 2, 3, 4])

    async def test_cancelledWaiter(self) -> None:
        """
        A caller that cancels while waiting gives up its place in line.
        """
        gate: Deferred[None] = Deferred()
        holders = [self.pool.run(lambda c: gate) for _ in range(self.poolSize)]
        cancelled = self.pool.runQuery("SELECT 1")
        waiting = self.pool.runQuery("SELECT 2")
        cancelled.cancel()
        self.failureResultOf(cancelled)
        gate.callback(None)
        await DeferredList(holders)
        self.assertEqual(await waiting, [(2,)])

    async def test_statementErrorKeepsConnection(self) -> None:
        """
        An OperationalError about the statement (here a row lock that is not
        available) reaches the caller, but leaves the connection open: the
        pool does not reconnect it.
        """
        await self.pool.runOperation("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        pids = {await backendPid(self.pool) for _ in range(self.poolSize)}
        gate: Deferred[None] = Deferred()
        locked: Deferred[None] = Deferred()

        async def holdLock(cursor: Any) -> None:
            await cursor.execute("SELECT x FROM t FOR UPDATE")
            locked.callback(None)
            await gate

        holder = self.pool.runInteraction(
            lambda cursor: Deferred.fromCoroutine(holdLock(cursor))
        )

        def release() -> None:
            if not gate.called:
                gate.callback(None)

        self.addCleanup(release)
        await locked
        with self.assertRaises(LockNotAvailable) as caught:
            await self.pool.runQuery("SELECT x FROM t FOR UPDATE NOWAIT")
        self.assertTrue(isConnectionFailure(caught.exception))
        gate.callback(None)
        await holder

        self.assertEqual(self.pool.openConnections, self.poolSize)
        after = {await backendPid(self.pool) for _ in range(self.poolSize)}
        self.assertEqual(after, pids)

    async def test_healsAfterTerminate(self) -> None:
        """
        After every backend of the pool is killed, the pool reconnects by
        itself and calls succeed again, on new backends.
        """
        before = {await backendPid(self.pool) for _ in range(self.poolSize)}
        self.assertEqual(terminateBackends(self.dsn), self.poolSize)

        async def check() -> int:
            return await backendPid(self.pool)

        after = await eventually(check)
        self.assertNotIn(after, before)
        await eventually(self._allOpen)
        self.flushLoggedErrors(psycopg2.OperationalError)

    async def _allOpen(self) -> None:
        if self.pool.openConnections != self.poolSize:
            raise AssertionError(self.pool.openConnections)

    async def test_outage(self) -> None:
        """
        While the server refuses connections, calls fail with a connection
        failure at once; once it accepts them again, calls succeed.
        """
        events: list[LogEvent] = []
        self.pool.log = collectingLogger(events)
        allowConnections(self.dsn, False)
        self.addCleanup(allowConnections, self.dsn, True)
        terminateBackends(self.dsn)

        for _ in range(3):
            try:
                await self.pool.runQuery("SELECT 1")
            except Exception as e:
                self.assertTrue(isConnectionFailure(e), repr(e))
            else:
                self.fail("call succeeded during the outage")
            await sleep(0.2)
        self.assertEqual(self.pool.openConnections, 0)

        allowConnections(self.dsn, True)

        async def check() -> Any:
            return await self.pool.runQuery("SELECT 1")

        self.assertEqual(await eventually(check), [(1,)])
        await eventually(self._allOpen)
        messages = [formatEvent(e) for e in events]
        self.assertEqual(
            len([m for m in messages if m.startswith("waiting for PostgreSQL")]),
            1,
            messages,
        )
        self.assertEqual(
            len([m for m in messages if m.startswith("lost PostgreSQL")]),
            self.poolSize,
            messages,
        )
        self.flushLoggedErrors(psycopg2.OperationalError)

    async def test_transactionDuringTerminate(self) -> None:
        """
        A transaction whose backend is killed fails with a connection
        failure, and the pool heals afterwards.
        """
        gate: Deferred[None] = Deferred()

        async def interaction(cursor: Any) -> None:
            await cursor.execute("SELECT 1")
            await gate
            await cursor.execute("SELECT 2")

        call = self.pool.runInteraction(
            lambda cursor: Deferred.fromCoroutine(interaction(cursor))
        )
        await sleep(0.05)
        terminateBackends(self.dsn)
        await sleep(0.05)
        gate.callback(None)
        try:
            await call
        except Exception as e:
            self.assertTrue(isConnectionFailure(e), repr(e))
        else:
            self.fail("transaction succeeded on a killed backend")

        async def check() -> Any:
            return await self.pool.runQuery("SELECT 1")

        self.assertEqual(await eventually(check), [(1,)])
        self.flushLoggedErrors(psycopg2.OperationalError, psycopg2.InterfaceError)

    async def test_closeFailsWaiters(self) -> None:
        """
        Closing the pool fails waiting callers with L{PoolClosed}, waits for
        the calls in progress, and later calls fail with L{PoolClosed}.
        """
        gate: Deferred[None] = Deferred()
        holders = [self.pool.run(lambda c: gate) for _ in range(self.poolSize)]
        waiting = self.pool.runQuery("SELECT 1")
        closed = self.pool.close()
        self.failureResultOf(waiting, PoolClosed)
        self.assertNoResult(closed)
        gate.callback(None)
        await DeferredList(holders)
        await closed
        self.failureResultOf(self.pool.runQuery("SELECT 1"), PoolClosed)
        self.assertEqual(self.pool.openConnections, 0)


class StartTests(SynchronousTestCase):
    """
    Tests for starting a L{HealingPool} before its server accepts
    connections.
    """

    def test_noCallsBeforeStart(self) -> None:
        """
        Before L{HealingPool.start}, calls fail with L{ConnectionDead}.
        """
        pool = HealingPool(reactor, "host=127.0.0.1 dbname=nowhere", 1)
        self.failureResultOf(pool.runQuery("SELECT 1"), ConnectionDead)
        self.successResultOf(pool.close())


class WaitingStartTests(DatabaseTestCase):
    """
    Tests for a pool started while the server refuses connections.
    """

    async def test_waitsForServer(self) -> None:
        """
        L{HealingPool.start} keeps trying until the server accepts
        connections, logging once that it is waiting (without the password);
        calls made meanwhile fail with L{ConnectionDead}.
        """
        allowConnections(self.dsn, False)
        self.addCleanup(allowConnections, self.dsn, True)
        pool = HealingPool(reactor, self.dsn + " password=hunter2", 2)
        events: list[LogEvent] = []
        pool.log = collectingLogger(events)
        self.addCleanup(pool.close)
        started = pool.start()

        await sleep(0.5)
        self.assertNoResult(started)
        with self.assertRaises(ConnectionDead):
            await pool.runQuery("SELECT 1")

        allowConnections(self.dsn, True)
        await started
        self.assertEqual(await pool.runQuery("SELECT 1"), [(1,)])
        messages = [formatEvent(e) for e in events]
        waiting = [m for m in messages if m.startswith("waiting for PostgreSQL")]
        self.assertEqual(len(waiting), 1, messages)
        self.assertIn("password=***", waiting[0])
        self.assertNotIn("hunter2", "\n".join(messages))

    async def test_closeWhileWaiting(self) -> None:
        """
        Closing a pool that is still waiting for its server stops the
        attempts (no timer is left behind) and fires C{start}'s Deferred.
        """
        allowConnections(self.dsn, False)
        self.addCleanup(allowConnections, self.dsn, True)
        pool = HealingPool(reactor, self.dsn, 2)
        pool.log = collectingLogger([])
        started = pool.start()
        await sleep(0.3)
        await pool.close()
        self.assertIsNone(self.successResultOf(started))


class SeparateDatabaseTests(SynchronousTestCase):
    """
    Tests for the test database helpers themselves.
    """

    def test_createAndDrop(self) -> None:
        """
        L{createDatabase} makes a database one can connect to, and
        L{dropDatabase} removes it even while a connection is open.
        """
        dsn = createDatabase()
        connection = psycopg2.connect(dsn)
        self.addCleanup(connection.close)
        dropDatabase(dsn)
        self.assertRaises(psycopg2.OperationalError, psycopg2.connect, dsn)


class _FakePoller:
    """
    Records unregistrations; refuses descriptors it was told are closed.
    """

    def __init__(self) -> None:
        self.closed: set[int] = set()
        self.unregistered: list[int] = []

    def unregister(self, fd: int) -> None:
        if fd in self.closed:
            raise OSError(9, "Bad file descriptor")
        self.unregistered.append(fd)


class _FakeEpollReactor:
    """
    Just the tables and behaviour of the epoll reactor that matter to
    L{_DescriptorGuard}.
    """

    def __init__(self) -> None:
        self._reads: set[int] = set()
        self._writes: set[int] = set()
        self._selectables: dict[int, object] = {}
        self._poller = _FakePoller()

    def addReader(self, selectable: Any) -> None:
        fd = selectable.fileno()
        if fd not in self._reads:
            self._reads.add(fd)
            self._selectables[fd] = selectable

    def addWriter(self, selectable: Any) -> None:
        fd = selectable.fileno()
        self._writes.add(fd)
        self._selectables[fd] = selectable

    def removeReader(self, selectable: Any) -> None:
        fd = selectable.fileno()
        if fd == -1:
            owned = [n for n, owner in self._selectables.items() if owner is selectable]
            if not owned:
                return
            fd = owned[0]
        del self._selectables[fd]
        self._poller.unregister(fd)
        self._reads.discard(fd)

    def removeWriter(self, selectable: Any) -> None:
        self.removeReader(selectable)


class _Socket:
    """
    A selectable whose descriptor can be closed under it, as libpq does.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lastDescriptor = fd

    def fileno(self) -> int:
        return self.fd


class DescriptorGuardTests(SynchronousTestCase):
    """
    L{_DescriptorGuard} keeps a descriptor number that libpq closed from
    stopping a new connection given the same number from being polled.
    """

    def test_staleOwnerForgottenOnAdd(self) -> None:
        """
        A new socket with the number of a dead connection that is still
        registered replaces it, instead of being silently ignored.
        """
        reactor = _FakeEpollReactor()
        guard = _DescriptorGuard(reactor)
        old, new = _Socket(7), _Socket(7)
        guard.addReader(old)
        old.fd = -1
        guard.addReader(new)
        self.assertIs(reactor._selectables[7], new)
        self.assertEqual(reactor._reads, {7})

    def test_removeAfterClose(self) -> None:
        """
        Removing a connection whose socket is closed, when the poller
        refuses the number, still forgets the number.
        """
        reactor = _FakeEpollReactor()
        guard = _DescriptorGuard(reactor)
        dead = _Socket(9)
        guard.addReader(dead)
        dead.fd = -1
        reactor._poller.closed.add(9)
        guard.removeReader(dead)
        self.assertEqual(reactor._reads, set())
        self.assertNotIn(9, reactor._selectables)

    def test_addClosedIsConnectionFailure(self) -> None:
        """
        Adding a socket libpq has already closed raises a connection failure
        (which the pool treats as a lost connection), not a reactor error.
        """
        guard = _DescriptorGuard(_FakeEpollReactor())
        error = self.assertRaises(OperationalError, guard.addReader, _Socket(-1))
        self.assertTrue(isConnectionFailure(error))
