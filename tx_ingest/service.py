# -*- test-case-name: tests.test_service -*-
"""
The running service: listeners, sink, database and worker, started together
and stopped in order, so that nothing accepted is lost on the way down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from tx_ingest.sink import BatchSink
from tx_ingest.stream import IngestStream

if TYPE_CHECKING:
    from tx_ingest.store import HealingPool, JobStore


class DatabaseService(Service):
    """
    Owns the connection pool and the job store; prepares the schema at start.

    @ivar ready: Fires once the pool is connected and the schema migrated.
    @ivar store: The L{tx_ingest.store.JobStore}, once started.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorCore,
        dsn: Callable[[], str],
        poolSize: int,
        schema: str,
        storeOptions: dict[str, Any],
    ) -> None:
        """
        @param dsn: Returns the DSN to connect to; called at start, so that an
            embedded server started just before can supply it.
        @param storeOptions: Keyword arguments for the job store.
        """
        self.reactor = reactor
        self._dsn = dsn
        self.poolSize = poolSize
        self.schema = schema
        self.storeOptions = storeOptions
        self.pool: HealingPool | None = None
        self.store: JobStore | None = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        """
        Connect and migrate in the background; L{ready} fires when done.
        """
        from tx_ingest.store import HealingPool, JobStore, redactDsn

        Service.startService(self)
        dsn = self._dsn()
        self.log.info(
            "job store: {dsn}, schema {schema}, {size} connections",
            dsn=redactDsn(dsn),
            schema=self.schema,
            size=self.poolSize,
        )
        self.pool = HealingPool(self.reactor, dsn, self.poolSize)
        self.store = JobStore(self.pool, schema=self.schema, **self.storeOptions)
        Deferred.fromCoroutine(self._prepare()).chainDeferred(self.ready)

    async def _prepare(self) -> None:
        """
        Connect the pool and bring the schema up to date.
        """
        from tx_ingest.store import migrate

        assert self.pool is not None
        await self.pool.start()
        await migrate(self.pool, self.schema)
        self.log.info("job store ready")

    def stopService(self) -> Deferred[None]:
        """
        Close the pool.
        """
        Service.stopService(self)
        if self.pool is None:
            return succeed(None)
        return self.pool.close()


class IngestService(MultiService):
    """
    The whole service.  Children (the embedded database, the database
    service, the worker) start in the order added and stop in reverse, one
    after another; the front end stops first: it stops accepting and
    reading, the sink writes everything accepted (up to C{shutdownTimeout}),
    and only then are connections closed and children stopped.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorCore,
        stream: IngestStream,
        endpoints: list[IStreamServerEndpoint],
        sink: BatchSink | None,
        shutdownTimeout: float = 30.0,
    ) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.stream = stream
        self.endpoints = endpoints
        self.sink = sink
        self.shutdownTimeout = shutdownTimeout

    def privilegedStartService(self) -> None:
        """
        Listen (ports below 1024 need privileges); an address that cannot be
        listened on fails start-up at once.
        """
        MultiService.privilegedStartService(self)
        failures: list[Failure] = []
        for endpoint in self.endpoints:
            listening = Deferred.fromCoroutine(self.stream.listenOn(endpoint))
            listening.addErrback(failures.append)  # type: ignore[call-overload]
            if failures:
                failures[0].raiseException()

    def startService(self) -> None:
        """
        Start the children, then the sink.
        """
        MultiService.startService(self)
        if self.sink is not None:
            self.sink.startService()
        for port in self.stream.ports:
            self.log.info("listening on {address}", address=port.getHost())

    def stopService(self) -> Deferred[None]:
        """
        Stop in order; see the class docstring.
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        before = self.sink.written if self.sink is not None else 0
        self.log.info(
            "shutting down: no new connections or lines; writing the "
            "{queued} accepted lines not yet written",
            queued=len(self.stream.queue) + self.stream.queue.inFlight,
        )
        left = await self.stream.stop(self.shutdownTimeout)
        if self.sink is not None:
            if left:
                self.sink.abandon()
                self.log.warn(
                    "{left} accepted messages were not written within "
                    "{timeout} s; their clients got no acknowledgement",
                    left=left,
                    timeout=self.shutdownTimeout,
                )
            await self.sink.stopService()
            self.log.info(
                "flushed {count} messages at shutdown",
                count=self.sink.written - before,
            )
        children: list[IService] = list(self)
        for child in reversed(children):
            if child.running:
                await maybeDeferred(child.stopService)
