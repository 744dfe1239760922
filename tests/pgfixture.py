# -*- test-case-name: tests.test_store -*-
"""
A real PostgreSQL for integration tests: one fresh database per test.

The server is the one named by C{TX_INGEST_TEST_DSN} (any libpq DSN of a
role allowed to create databases), else one at 127.0.0.1:5432 as user
C{postgres}.  When neither is reachable, an embedded PostgreSQL (the
C{embedded} extra) is started for the test run; without it, tests using a
database are skipped.

Setting up a database here is blocking (plain psycopg2): it is test set-up,
done before the reactor has anything else to do.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import uuid
from functools import lru_cache
from unittest import SkipTest

import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tx_ingest.store import HealingPool, migrate, withDatabase

#: The environment variable naming the server tests may create databases on.
TEST_DSN_VARIABLE = "TX_INGEST_TEST_DSN"

#: Tried when L{TEST_DSN_VARIABLE} is unset.
LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

_DATABASE_PREFIX = "tx_ingest_test_"
_counter = itertools.count(1)


def _reachable(dsn: str) -> str | None:
    """
    Try a DSN.

    @return: L{None} if a connection succeeded, else why it failed.
    """
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
    except psycopg2.Error as e:
        return " ".join(str(e).split())
    return None


def _fallbackServerDsn(why: str) -> str:
    """
    Provide a server when neither the configured nor the local one answers:
    an embedded PostgreSQL in a temporary directory, started once for this
    test process and stopped when it exits.

    @param why: Why the local server could not be used.

    @raise SkipTest: If the embedded server is not installed either.
    """
    try:
        from tx_ingest.embedded import EmbeddedPostgres, EmbeddedUnavailable
    except ImportError as e:
        raise SkipTest(f"no PostgreSQL for integration tests ({why}): {e}")
    directory = tempfile.mkdtemp(prefix="tx_ingest-test-pg-")
    try:
        server = EmbeddedPostgres(os.path.join(directory, "data"))
    except EmbeddedUnavailable as e:
        raise SkipTest(
            f"no PostgreSQL for integration tests: {LOCAL_DSN!r} failed ({why})"
            f" and {e}; set {TEST_DSN_VARIABLE} to the DSN of a server where"
            " databases may be created"
        )
    server.startService()

    def stop() -> None:
        server.stopService()
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    assert server.dsn is not None
    return server.dsn


@lru_cache(maxsize=1)
def adminDsn() -> str:
    """
    The DSN of a role that may create and drop test databases.

    @return: C{TX_INGEST_TEST_DSN} if set, else L{LOCAL_DSN} if reachable.

    @raise SkipTest: If no server can be used.
    """
    configured = os.environ.get(TEST_DSN_VARIABLE)
    if configured:
        return configured
    why = _reachable(LOCAL_DSN)
    if why is None:
        return LOCAL_DSN
    return _fallbackServerDsn(why)


def _adminConnection() -> psycopg2.extensions.connection:
    connection = psycopg2.connect(adminDsn())
    connection.autocommit = True
    return connection


def createDatabase() -> str:
    """
    Create an empty database with a name of its own.

    @return: The DSN of the new database (the admin DSN pointing at it).

    @raise SkipTest: If no server can be used.
    """
    name = f"{_DATABASE_PREFIX}{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:8]}"
    connection = _adminConnection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        connection.close()
    return withDatabase(adminDsn(), name)


def terminateBackends(dsn: str) -> int:
    """
    Kill every server process connected to the database of C{dsn}, as an
    administrator or a crash would.

    @param dsn: A DSN made by L{createDatabase}.

    @return: How many were killed.
    """
    name = parse_dsn(dsn)["dbname"]
    connection = _adminConnection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            (killed,) = cursor.fetchone()
    finally:
        connection.close()
    return int(killed)


def allowConnections(dsn: str, allowed: bool) -> None:
    """
    Let clients connect to a test database, or refuse them all (superusers
    too), to simulate an unreachable server.

    @param dsn: A DSN made by L{createDatabase}.
    @param allowed: Whether new connections are accepted.
    """
    name = parse_dsn(dsn)["dbname"]
    connection = _adminConnection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS %s', (allowed,)
            )
    finally:
        connection.close()


def dropDatabase(dsn: str) -> None:
    """
    Drop a database made by L{createDatabase}, killing any connection still
    open to it first.

    @param dsn: The DSN L{createDatabase} returned.
    """
    name = parse_dsn(dsn)["dbname"]
    if not name.startswith(_DATABASE_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    terminateBackends(dsn)
    connection = _adminConnection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        connection.close()


class DatabaseTestCase(TestCase):
    """
    A test with a fresh, migrated database and a L{HealingPool} on it.

    @ivar dsn: The test database's DSN.
    @ivar pool: An open pool of L{poolSize} connections to it.
    @ivar schema: The migrated schema.
    """

    poolSize = 2
    schema = "tx_ingest"

    async def _setUp(self) -> None:
        self.dsn = createDatabase()
        self.addCleanup(dropDatabase, self.dsn)
        self.pool = HealingPool(reactor, self.dsn, self.poolSize)
        self.addCleanup(self.pool.close)
        await self.pool.start()
        await migrate(self.pool, self.schema)

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        """
        Create the database and pool, and migrate the schema.
        """
        return Deferred.fromCoroutine(self._setUp())
