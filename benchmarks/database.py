"""
Fresh databases on the local PostgreSQL, one per run of a scenario, and the
blocking SQL the orchestrator itself needs (counting rows, loading pending
jobs, taking locks).

The server is named by C{TX_INGEST_BENCH_DSN} (a libpq DSN of a role that may
create databases), else C{127.0.0.1:5432} as user C{postgres}.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions

from tx_ingest.store import withDatabase
from tx_ingest.store.schema import quoteSchema

#: The environment variable naming the server to benchmark on.
SERVER_DSN_VARIABLE = "TX_INGEST_BENCH_DSN"

#: Used when L{SERVER_DSN_VARIABLE} is unset.
LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

#: The schema tx_ingest's tables live in, in every benchmark database.
SCHEMA = "tx_ingest"

#: The name every benchmark database starts with.
DATABASE_PREFIX = "tx_ingest_bench_"

_counter = itertools.count(1)


def serverDsn() -> str:
    """
    @return: The DSN of the server to create databases on.
    """
    return os.environ.get(SERVER_DSN_VARIABLE) or LOCAL_DSN


def connect(dsn: str, autocommit: bool = True) -> psycopg2.extensions.connection:
    """
    Open a blocking connection.

    @param dsn: Where.
    @param autocommit: Whether each statement commits by itself.
    @return: The connection.
    """
    connection = psycopg2.connect(dsn)
    connection.autocommit = autocommit
    return connection


@contextmanager
def freshDatabase(server: str | None = None) -> Iterator[str]:
    """
    Create an empty database, and drop it (with its sessions) afterwards.
    A checkpoint first flushes what earlier runs left dirty, so that no run
    pays for the writes of the one before it.

    @param server: The server's DSN; L{serverDsn} if L{None}.
    @return: A context manager giving the new database's DSN.
    """
    server = server or serverDsn()
    name = f"{DATABASE_PREFIX}{os.getpid()}_{next(_counter)}"
    admin = connect(server)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
            cursor.execute("CHECKPOINT")
        try:
            yield withDatabase(server, name)
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def dropLeftovers(server: str | None = None) -> list[str]:
    """
    Drop benchmark databases left by an interrupted run of this suite.

    @param server: The server's DSN; L{serverDsn} if L{None}.
    @return: The names dropped.
    """
    admin = connect(server or serverDsn())
    try:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s",
                (DATABASE_PREFIX + "%",),
            )
            names = [name for (name,) in cursor.fetchall()]
            for name in names:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return names
    finally:
        admin.close()


def scalar(dsn: str, sql: str, parameters: Sequence[object] = ()) -> object:
    """
    Run one query and return the first column of its first row.
    """
    connection = connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, parameters)
            row = cursor.fetchone()
            return None if row is None else row[0]
    finally:
        connection.close()


def copyJobs(dsn: str, lines: Sequence[bytes], jobType: str = "default") -> float:
    """
    Load lines as pending jobs with one C{COPY} stream, in one transaction.

    @param dsn: A database with the migrated schema L{SCHEMA}.
    @param lines: JSON texts free of backslashes, tabs and newlines.
    @param jobType: The C{job_type} of every row.
    @return: Seconds from the start of the C{COPY} to its commit.
    """
    import io

    prefix = jobType.encode("utf-8") + b"\t"
    data = io.BytesIO(b"".join(prefix + line + b"\n" for line in lines))
    connection = connect(dsn, autocommit=False)
    try:
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.copy_expert(
                f"COPY {quoteSchema(SCHEMA)}.jobs (job_type, payload) FROM STDIN",
                data,
                size=1 << 20,
            )
        connection.commit()
        return time.perf_counter() - started
    finally:
        connection.close()


def analyze(dsn: str) -> None:
    """
    Refresh the planner's statistics of every table of the database.
    """
    connection = connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    finally:
        connection.close()


def serverVersion(server: str | None = None) -> str:
    """
    @return: The server's C{version()} string, up to its first comma.
    """
    version = str(scalar(server or serverDsn(), "SELECT version()"))
    return version.split(",")[0]
