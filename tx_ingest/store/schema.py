# -*- test-case-name: tests.test_store -*-
"""
The database schema of the job queue, and the migrations that build it.

Every object lives in one PostgreSQL schema whose name is chosen at run time
(C{tx_ingest} by default), so several queues can share a database.  That name
is checked by L{quoteSchema} and always written double-quoted; values never go
into SQL text.

To change the schema, append a L{Migration} to L{MIGRATIONS} with the next
version number.  Never edit or reorder one that has shipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tx_ingest.store.pool import HealingPool

log = Logger()

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# The first key of the advisory lock taken while migrating ("txin"); the
# second key is derived from the schema name.
_MIGRATION_LOCK_CLASS = 0x7478696E

# PostgreSQL truncates identifiers to this many bytes.
_IDENTIFIER_LIMIT = 63


def quoteSchema(schema: str) -> str:
    """
    Check a schema name and quote it for SQL text.

    @param schema: A lowercase name: a letter or underscore, then up to 62
        letters, digits or underscores.

    @return: The name in double quotes.

    @raise ValueError: If the name is not of that form.
    """
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"invalid schema name {schema!r}: use 1 to 63 lowercase letters, "
            "digits and underscores, not starting with a digit"
        )
    return f'"{schema}"'


def notifyChannel(schema: str) -> str:
    """
    The channel on which new jobs in C{schema} are announced with C{NOTIFY}.

    @param schema: A schema name (see L{quoteSchema}).

    @return: C{<schema>_jobs}, cut to PostgreSQL's 63-byte identifier limit
        as the server itself would; quote it as an identifier in C{LISTEN}.

    @raise ValueError: If the schema name is invalid.
    """
    quoteSchema(schema)
    return f"{schema}_jobs"[:_IDENTIFIER_LIMIT]


@dataclass(frozen=True)
class Migration:
    """
    One step of the schema's history.

    @ivar version: Its number: one more than the previous migration's.
    @ivar description: What it does, recorded with the version.
    @ivar statements: Given the quoted schema name, returns the SQL
        statements to run, in order.
    """

    version: int
    description: str
    statements: Callable[[str], Sequence[str]]


def _createJobs(schema: str) -> Sequence[str]:
    return [
        f"CREATE SCHEMA IF NOT EXISTS {schema}",
        f"""
        CREATE TABLE {schema}.jobs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_type text NOT NULL,
            payload jsonb NOT NULL,
            status text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'running', 'done', 'failed')),
            attempts int NOT NULL DEFAULT 0,
            max_attempts int NULL,
            priority int NOT NULL DEFAULT 0,
            run_at timestamptz NOT NULL DEFAULT now(),
            created_at timestamptz NOT NULL DEFAULT now(),
            locked_by text,
            locked_at timestamptz,
            finished_at timestamptz,
            last_error text,
            dedupe_key text
        )
        """,
        f"""
        COMMENT ON COLUMN {schema}.jobs.max_attempts IS
            'NULL: the worker''s default for the job type, or its global one'
        """,
        f"""
        CREATE INDEX jobs_claim ON {schema}.jobs (priority DESC, run_at, id)
            WHERE status = 'pending'
        """,
        f"""
        CREATE UNIQUE INDEX jobs_dedupe ON {schema}.jobs (job_type, dedupe_key)
            WHERE dedupe_key IS NOT NULL
        """,
        f"""
        CREATE INDEX jobs_running ON {schema}.jobs (locked_by)
            WHERE status = 'running'
        """,
        f"""
        CREATE TABLE {schema}.workers (
            name text PRIMARY KEY,
            host text,
            pid int,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        )
        """,
    ]


def _indexDone(schema: str) -> Sequence[str]:
    # Retention deletes the oldest done jobs in small batches; without this
    # index each batch would scan the whole table.
    return [
        f"""
        CREATE INDEX jobs_done ON {schema}.jobs (finished_at)
            WHERE status = 'done'
        """,
    ]


#: Every migration, oldest first.  Append new ones at the end.
MIGRATIONS: list[Migration] = [
    Migration(1, "jobs and workers tables", _createJobs),
    Migration(2, "index of done jobs, for retention", _indexDone),
]


async def _migrate(
    cursor: Any, schema: str, migrations: Sequence[Migration]
) -> list[int]:
    quoted = quoteSchema(schema)

    # Serialise migrations of this schema across processes; released at
    # commit or rollback.
    await cursor.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
        (_MIGRATION_LOCK_CLASS, schema),
    )
    await cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    await cursor.execute(
        f"""
        CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations (
            version int PRIMARY KEY,
            description text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    await cursor.execute(f"SELECT version FROM {quoted}.schema_migrations")
    done = {version for (version,) in cursor.fetchall()}

    applied = []
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in done:
            continue
        for statement in migration.statements(quoted):
            await cursor.execute(statement)
        await cursor.execute(
            f"INSERT INTO {quoted}.schema_migrations (version, description)"
            " VALUES (%s, %s)",
            (migration.version, migration.description),
        )
        applied.append(migration.version)
    return applied


def migrate(
    pool: HealingPool, schema: str, migrations: Sequence[Migration] = MIGRATIONS
) -> Deferred[list[int]]:
    """
    Bring C{schema} up to date, in one transaction.

    An advisory lock makes processes that start at once take turns: the
    first applies what is missing, the others then find nothing to do.

    @param pool: Where to run it.

    @param schema: The schema to create or update (see L{quoteSchema}).

    @param migrations: The schema's history; L{MIGRATIONS} unless testing.

    @return: Fires with the versions applied now, oldest first (empty if the
        schema was already up to date); fails with L{ValueError} for an
        invalid schema name.
    """

    async def migrateWithLog() -> list[int]:
        quoteSchema(schema)
        applied: list[int] = await pool.runInteraction(
            lambda cursor: Deferred.fromCoroutine(_migrate(cursor, schema, migrations))
        )
        if applied:
            log.info(
                "schema {schema}: applied migrations {versions}",
                schema=schema,
                versions=applied,
            )
        return applied

    return Deferred.fromCoroutine(migrateWithLog())
