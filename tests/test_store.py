# -*- test-case-name: tests.test_store -*-
"""
Tests for L{tx_ingest.store}: DSNs, the schema and its migrations, and
L{JobStore}, against a real PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase
from txpostgres.txpostgres import Connection

from tests.pgfixture import DatabaseTestCase, allowConnections, terminateBackends
from tx_ingest.store import (
    HealingPool,
    JobStore,
    Migration,
    NewJob,
    dsnFromEnvironment,
    isConnectionFailure,
    migrate,
    notifyChannel,
    redactDsn,
    withDatabase,
)
from tx_ingest.store.jobs import findUnstorableEscape
from tx_ingest.store.schema import MIGRATIONS, quoteSchema


class DsnTests(SynchronousTestCase):
    """
    Tests for L{redactDsn}, L{dsnFromEnvironment} and L{withDatabase}.
    """

    def test_redactUrl(self) -> None:
        """
        The password of a URL is hidden; user, host, port, database and
        options are kept.
        """
        self.assertEqual(
            redactDsn("postgresql://u:secret@db.example:5433/jobs?sslmode=require"),
            "postgresql://u:***@db.example:5433/jobs?sslmode=require",
        )

    def test_redactUrlPasswordWithAt(self) -> None:
        """
        A password containing C{@}, C{:} or C{/} is hidden entirely.
        """
        redacted = redactDsn("postgres://u:p@ss:w@h/db")
        self.assertEqual(redacted, "postgres://u:***@h/db")
        redacted = redactDsn("postgres://u:p/ss@h/db")
        self.assertEqual(redacted, "postgres://u:***@h/db")

    def test_redactUrlQueryPassword(self) -> None:
        """
        A password given as a URL query parameter is hidden too.
        """
        self.assertEqual(
            redactDsn("postgresql://h/db?user=u&password=secret&sslmode=off"),
            "postgresql://h/db?user=u&password=***&sslmode=off",
        )

    def test_redactUrlWithoutPassword(self) -> None:
        """
        A URL without a password is returned unchanged.
        """
        for dsn in ["postgresql://u@h/db", "postgresql:///db", "postgresql://h"]:
            self.assertEqual(redactDsn(dsn), dsn)

    def test_redactKeywords(self) -> None:
        """
        In the C{key=value} form a plain or quoted password (with spaces,
        escaped quotes, or spaces around C{=}) is hidden; the rest is kept.
        """
        cases = {
            "host=h password=secret user=u": "host=h password=*** user=u",
            "host=h password='se cr\\'et' user=u": "host=h password=*** user=u",
            "host=h password = secret": "host=h password = ***",
            "password=secret": "password=***",
            "host=h PASSWORD=secret": "host=h PASSWORD=***",
            "host=h user=u": "host=h user=u",
            "host=h mypassword=x": "host=h mypassword=x",
        }
        for dsn, expected in cases.items():
            self.assertEqual(redactDsn(dsn), expected, dsn)

    def test_redactMalformed(self) -> None:
        """
        A malformed DSN is still redacted, not refused.
        """
        self.assertNotIn("secret", redactDsn("host=h password='secret"))

    def test_fromEnvironment(self) -> None:
        """
        C{DATABASE_URL} is the DSN; unset or empty means none.
        """
        self.assertEqual(
            dsnFromEnvironment({"DATABASE_URL": "postgresql:///x"}), "postgresql:///x"
        )
        self.assertIsNone(dsnFromEnvironment({}))
        self.assertIsNone(dsnFromEnvironment({"DATABASE_URL": ""}))

    def test_withDatabase(self) -> None:
        """
        L{withDatabase} changes only the database, in either DSN form.
        """
        for dsn in [
            "host=h port=5 user=u password=p dbname=old",
            "postgresql://u:p@h:5/old",
        ]:
            self.assertEqual(
                psycopg2.extensions.parse_dsn(withDatabase(dsn, "new")),
                {
                    "host": "h",
                    "port": "5",
                    "user": "u",
                    "password": "p",
                    "dbname": "new",
                },
            )


class SchemaNameTests(SynchronousTestCase):
    """
    Tests for L{quoteSchema} and L{notifyChannel}.
    """

    def test_valid(self) -> None:
        """
        Lowercase names with digits and underscores are quoted.
        """
        self.assertEqual(quoteSchema("tx_ingest"), '"tx_ingest"')
        self.assertEqual(quoteSchema("_a1"), '"_a1"')
        self.assertEqual(quoteSchema("a" * 63), '"' + "a" * 63 + '"')

    def test_invalid(self) -> None:
        """
        Anything else is refused with a L{ValueError} naming the problem.
        """
        for name in ["", "1abc", "Jobs", 'a"b', "a-b", "a b", "a" * 64, "a;drop"]:
            error = self.assertRaises(ValueError, quoteSchema, name)
            self.assertIn("invalid schema name", str(error))
        self.assertRaises(ValueError, notifyChannel, "Bad")

    def test_channel(self) -> None:
        """
        The channel is the schema name and C{_jobs}, cut to 63 bytes.
        """
        self.assertEqual(notifyChannel("tx_ingest"), "tx_ingest_jobs")
        self.assertEqual(len(notifyChannel("a" * 63)), 63)


class EscapeTests(SynchronousTestCase):
    """
    Tests for L{findUnstorableEscape}.
    """

    def test_storable(self) -> None:
        """
        Ordinary escapes, surrogate pairs and an escaped backslash followed
        by the text C{u0000} are storable.
        """
        for line in [
            b'{"a": "plain"}',
            b'{"a": "\\u00e9\\n\\t"}',
            b'{"a": "\\ud83d\\ude00"}',
            b'{"a": "\\\\u0000"}',
            b'{"a": "\\\\\\\\u0000"}',
            b'{"a": "\\"\\u0041"}',
        ]:
            self.assertIsNone(findUnstorableEscape(line), line)

    def test_unstorable(self) -> None:
        """
        NUL escapes (also after an escaped backslash), lone high or low
        surrogates, and a high surrogate followed by a non-surrogate escape
        are reported.
        """
        cases = {
            b'{"a": "\\u0000"}': "\\u0000",
            b'{"a": "\\\\\\u0000"}': "\\u0000",
            b'{"a": "\\ud800"}': "lone surrogate",
            b'{"a": "\\ud800x"}': "lone surrogate",
            b'{"a": "\\udc00"}': "lone surrogate",
            b'{"a": "\\ud800\\u0041"}': "lone surrogate",
            b'{"a": "\\ud800\\ud800\\udc00"}': "lone surrogate",
            b'{"\\uDFFF": 1}': "lone surrogate",
        }
        for line, reason in cases.items():
            self.assertIn(reason, findUnstorableEscape(line) or "", line)


class MigrationTests(DatabaseTestCase):
    """
    Tests for L{migrate}.
    """

    async def test_tables(self) -> None:
        """
        The first migration creates the jobs and workers tables with their
        columns and indexes, and records itself.
        """
        columns = await self.pool.runQuery(
            "SELECT table_name, column_name, is_nullable, data_type"
            " FROM information_schema.columns WHERE table_schema = 'tx_ingest'"
            " ORDER BY table_name, ordinal_position"
        )
        jobs = [(c, n, t) for table, c, n, t in columns if table == "jobs"]
        self.assertEqual(
            [c for c, _, _ in jobs],
            [
                "id",
                "job_type",
                "payload",
                "status",
                "attempts",
                "max_attempts",
                "priority",
                "run_at",
                "created_at",
                "locked_by",
                "locked_at",
                "finished_at",
                "last_error",
                "dedupe_key",
            ],
        )
        self.assertIn(("payload", "NO", "jsonb"), jobs)
        self.assertIn(("max_attempts", "YES", "integer"), jobs)
        workers = [c for table, c, _, _ in columns if table == "workers"]
        self.assertEqual(workers, ["name", "host", "pid", "started_at", "heartbeat_at"])
        indexes = await self.pool.runQuery(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'tx_ingest'"
            " AND tablename = 'jobs' ORDER BY indexname"
        )
        self.assertEqual(
            [name for (name,) in indexes],
            ["jobs_claim", "jobs_dedupe", "jobs_done", "jobs_pkey", "jobs_running"],
        )
        versions = await self.pool.runQuery(
            "SELECT version FROM tx_ingest.schema_migrations"
        )
        self.assertEqual(sorted(versions), [(1,), (2,)])

    async def test_statusChecked(self) -> None:
        """
        The jobs table refuses an unknown status.
        """
        with self.assertRaises(psycopg2.IntegrityError):
            await self.pool.runOperation(
                "INSERT INTO tx_ingest.jobs (job_type, payload, status)"
                " VALUES ('t', '{}', 'lost')"
            )

    async def test_idempotent(self) -> None:
        """
        Migrating an up-to-date schema applies nothing.
        """
        self.assertEqual(await migrate(self.pool, self.schema), [])
        self.assertEqual(await migrate(self.pool, self.schema), [])

    async def test_concurrent(self) -> None:
        """
        Two processes migrating a new schema at once both succeed; the
        migration is applied exactly once.
        """
        other = HealingPool(reactor, self.dsn, 1)
        self.addCleanup(other.close)
        await other.start()
        results = await gatherResults(
            [migrate(self.pool, "second"), migrate(other, "second")]
        )
        self.assertEqual(sorted(results), [[], [m.version for m in MIGRATIONS]])

    async def test_appendedMigration(self) -> None:
        """
        A migration appended to the list is applied on the next run, after
        those already recorded.
        """
        extra = Migration(
            len(MIGRATIONS) + 1,
            "a test column",
            lambda schema: [f"ALTER TABLE {schema}.workers ADD COLUMN note text"],
        )
        applied = await migrate(self.pool, self.schema, [*MIGRATIONS, extra])
        self.assertEqual(applied, [extra.version])
        await self.pool.runOperation(
            "INSERT INTO tx_ingest.workers (name, note) VALUES ('w', 'n')"
        )

    async def test_failedMigrationRollsBack(self) -> None:
        """
        A migration that fails leaves nothing behind: neither its earlier
        statements nor its version.
        """
        bad = Migration(
            len(MIGRATIONS) + 1,
            "broken",
            lambda schema: [f"CREATE TABLE {schema}.half (x int)", "SELECT 1/0"],
        )
        with self.assertRaises(psycopg2.DataError):
            await migrate(self.pool, self.schema, [*MIGRATIONS, bad])
        rows = await self.pool.runQuery("SELECT to_regclass('tx_ingest.half')")
        self.assertEqual(rows, [(None,)])

    def test_invalidSchema(self) -> None:
        """
        An invalid schema name fails the returned Deferred with a
        L{ValueError}, without raising.
        """
        self.failureResultOf(migrate(self.pool, 'x"; DROP'), ValueError)


class InsertLinesTests(DatabaseTestCase):
    """
    Tests for L{JobStore.insertLines}.
    """

    async def jobs(self) -> list[tuple[Any, ...]]:
        """
        Read back the stored jobs.

        @return: C{(job_type, payload, dedupe_key)} of each job, by id.
        """
        return await self.pool.runQuery(
            "SELECT job_type, payload, dedupe_key FROM tx_ingest.jobs ORDER BY id"
        )

    async def test_inOrder(self) -> None:
        """
        Lines are stored as pending jobs of the default type, in order, with
        their payloads as given.
        """
        store = JobStore(self.pool, jobType="mail")
        lines = [b'{"n": %d, "s": "\\u00e9"}' % n for n in range(50)]
        self.assertEqual(await store.insertLines(lines), {})
        self.assertEqual(
            await self.jobs(), [("mail", {"n": n, "s": "é"}, None) for n in range(50)]
        )
        rows = await self.pool.runQuery(
            "SELECT DISTINCT status, attempts, priority, max_attempts"
            " FROM tx_ingest.jobs"
        )
        self.assertEqual(rows, [("pending", 0, 0, None)])

    async def test_typeField(self) -> None:
        """
        With a type field, a JSON string in it names the job's type; any
        other value (number, null, object) or a missing field gives the
        default type.
        """
        store = JobStore(self.pool, jobType="fallback", typeField="kind")
        lines = [
            b'{"kind": "resize"}',
            b'{"kind": 7}',
            b'{"kind": null}',
            b'{"kind": {"a": 1}}',
            b'{"other": "x"}',
            b'{"kind": ""}',
        ]
        self.assertEqual(await store.insertLines(lines), {})
        types = [jobType for jobType, _, _ in await self.jobs()]
        self.assertEqual(
            types, ["resize", "fallback", "fallback", "fallback", "fallback", ""]
        )

    async def test_fieldNamesAreValues(self) -> None:
        """
        Field names are passed as values, so any text works as one,
        quotes included.
        """
        store = JobStore(self.pool, typeField="it's", dedupeField="%(batch)s")
        await store.insertLines([b'{"it\'s": "odd", "%(batch)s": "k"}'])
        self.assertEqual(
            await self.jobs(), [("odd", {"it's": "odd", "%(batch)s": "k"}, "k")]
        )

    async def test_dedupe(self) -> None:
        """
        A line whose dedupe key (a string or number) its job type already
        has, earlier in the batch or in an earlier batch, is dropped; other
        values of the field do not deduplicate.
        """
        store = JobStore(self.pool, typeField="t", dedupeField="k")
        first = [
            b'{"t": "a", "k": "x", "n": 1}',
            b'{"t": "a", "k": "x", "n": 2}',
            b'{"t": "b", "k": "x", "n": 3}',
            b'{"t": "a", "k": 5, "n": 4}',
            b'{"t": "a", "k": null, "n": 5}',
            b'{"t": "a", "k": null, "n": 6}',
            b'{"t": "a", "k": [1], "n": 7}',
            b'{"t": "a", "k": [1], "n": 8}',
            b'{"t": "a", "n": 9}',
        ]
        self.assertEqual(await store.insertLines(first), {})
        second = [
            b'{"t": "a", "k": "x", "n": 10}',
            b'{"t": "a", "k": "5", "n": 11}',
            b'{"t": "a", "k": "y", "n": 12}',
        ]
        self.assertEqual(await store.insertLines(second), {})
        stored = [(t, p["n"], k) for t, p, k in await self.jobs()]
        self.assertEqual(
            stored,
            [
                ("a", 1, "x"),
                ("b", 3, "x"),
                ("a", 4, "5"),
                ("a", 5, None),
                ("a", 6, None),
                ("a", 7, None),
                ("a", 8, None),
                ("a", 9, None),
                ("a", 12, "y"),
            ],
        )

    async def test_poisonRows(self) -> None:
        """
        Lines PostgreSQL cannot store (a NUL escape, a lone surrogate, a
        number beyond numeric's range, NaN) are reported by index with a
        reason, and every other line of the batch is stored in order.
        """
        store = JobStore(self.pool)
        lines = [b'{"n": %d}' % n for n in range(40)]
        lines[3] = b'{"bad": "\\u0000"}'
        lines[10] = b'{"bad": "\\ud800"}'
        lines[11] = b'{"bad": 1e1000000}'
        lines[25] = b'{"bad": NaN}'
        lines[39] = b'{"fine": "\\\\u0000"}'
        refused = await store.insertLines(lines)
        self.assertEqual(sorted(refused), [3, 10, 11, 25])
        self.assertIn("NUL", refused[3])
        self.assertIn("surrogate", refused[10])
        self.assertIn("numeric", refused[11])
        self.assertIn("PostgreSQL refused it", refused[25])
        payloads = [p for _, p, _ in await self.jobs()]
        expected = [{"n": n} for n in range(39) if n not in refused]
        self.assertEqual(payloads, expected + [{"fine": "\\u0000"}])

    async def test_poisonOnly(self) -> None:
        """
        A batch of nothing but unstorable lines stores nothing and reports
        every line.
        """
        store = JobStore(self.pool)
        refused = await store.insertLines([b'{"a": "\\u0000"}', b'{"a": 1e999999}'])
        self.assertEqual(sorted(refused), [0, 1])
        self.assertEqual(await self.jobs(), [])

    async def test_invalidUtf8(self) -> None:
        """
        A line that is not UTF-8 is reported; the others are stored.
        """
        store = JobStore(self.pool)
        refused = await store.insertLines([b'{"a": 1}', b'{"a": "\xff"}'])
        self.assertEqual(list(refused), [1])
        self.assertIn("UTF-8", refused[1])
        self.assertEqual([p for _, p, _ in await self.jobs()], [{"a": 1}])

    def test_empty(self) -> None:
        """
        An empty batch stores nothing and makes no round trip: it works even
        on a closed pool.
        """
        self.successResultOf(self.pool.close())
        self.assertEqual(self.successResultOf(JobStore(self.pool).insertLines([])), {})

    async def test_connectionFailure(self) -> None:
        """
        When the server cannot be reached, the batch fails with a connection
        failure (nothing is reported as refused).
        """
        allowConnections(self.dsn, False)
        self.addCleanup(allowConnections, self.dsn, True)
        terminateBackends(self.dsn)
        await deferLater(reactor, 0.2, lambda: None)
        store = JobStore(self.pool)
        with self.assertRaises(Exception) as caught:
            await store.insertLines([b'{"a": 1}'])
        self.assertTrue(isConnectionFailure(caught.exception))
        self.flushLoggedErrors(psycopg2.OperationalError)


class NotificationTests(DatabaseTestCase):
    """
    Tests for the notifications sent with new jobs.
    """

    async def _setUp(self) -> None:
        await super()._setUp()
        self.notifications: list[str] = []
        self.listener = Connection(reactor=reactor)
        await self.listener.connect(self.dsn)
        self.addCleanup(self.listener.close)
        self.listener.addNotifyObserver(
            lambda notify: self.notifications.append(notify.channel)
        )
        await self.listener.runOperation(f'LISTEN "{notifyChannel(self.schema)}"')

    async def settle(self) -> None:
        """
        Give notifications time to arrive, by a round trip on the listening
        connection after a short pause.
        """
        await deferLater(reactor, 0.1, lambda: None)
        await self.listener.runOperation("SELECT 1")
        await deferLater(reactor, 0.05, lambda: None)

    async def test_oncePerBatch(self) -> None:
        """
        Each batch of lines sends one notification.
        """
        store = JobStore(self.pool)
        await store.insertLines([b"{}"] * 10)
        await store.insertLines([b"{}"] * 3)
        await self.settle()
        self.assertEqual(self.notifications, ["tx_ingest_jobs"] * 2)

    async def test_refusedBatchSendsNothing(self) -> None:
        """
        When the statement fails, nothing is stored and no notification is
        sent: the insert and the NOTIFY share one transaction.
        """
        store = JobStore(self.pool)
        refused = await store.insertLines([b'{"a": 1e999999}'])
        self.assertEqual(list(refused), [0])
        await self.settle()
        self.assertEqual(self.notifications, [])
        self.assertEqual(
            await self.pool.runQuery("SELECT count(*) FROM tx_ingest.jobs"), [(0,)]
        )

    async def test_multiStatementAtomic(self) -> None:
        """
        PostgreSQL runs the store's multi-statement string as one implicit
        transaction: a failing later statement undoes the insert and the
        notification before it.
        """
        store = JobStore(self.pool)
        with self.assertRaises(psycopg2.DataError):
            await self.pool.runOperation(
                store._linesSqlNotify + "; SELECT 1/0",
                store._linesParameters("[{}]"),
            )
        await self.settle()
        self.assertEqual(self.notifications, [])
        self.assertEqual(
            await self.pool.runQuery("SELECT count(*) FROM tx_ingest.jobs"), [(0,)]
        )

    async def test_pushManyOnce(self) -> None:
        """
        L{JobStore.pushMany} sends one notification for all its jobs, and
        L{JobStore.push} one for its job.
        """
        store = JobStore(self.pool)
        await store.pushMany([NewJob({"n": n}) for n in range(5)])
        await store.push({"n": 5})
        await self.settle()
        self.assertEqual(self.notifications, ["tx_ingest_jobs"] * 2)


class PushTests(DatabaseTestCase):
    """
    Tests for L{JobStore.push} and L{JobStore.pushMany}.
    """

    async def test_push(self) -> None:
        """
        L{JobStore.push} stores a job with the given settings and returns
        its id; unset settings take the defaults.
        """
        store = JobStore(self.pool, jobType="dflt")
        runAt = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
        first = await store.push(
            {"to": "x"}, jobType="mail", priority=3, runAt=runAt, maxAttempts=7
        )
        second = await store.push([1, 2])
        rows = await self.pool.runQuery(
            "SELECT id, job_type, payload, priority, run_at, max_attempts,"
            " run_at <= now() FROM tx_ingest.jobs ORDER BY id"
        )
        self.assertEqual(rows[0][:6], (first, "mail", {"to": "x"}, 3, runAt, 7))
        self.assertEqual(rows[1][:4], (second, "dflt", [1, 2], 0))
        self.assertEqual(rows[1][5:], (None, True))

    async def test_pushManyIds(self) -> None:
        """
        L{JobStore.pushMany} returns each job's id in order, and L{None} for
        jobs dropped as duplicates of an existing job or an earlier one.
        """
        store = JobStore(self.pool)
        existing = await store.push({"n": 0}, dedupeKey="k0")
        ids = await store.pushMany(
            [
                NewJob({"n": 1}, dedupeKey="k1"),
                NewJob({"n": 2}, dedupeKey="k0"),
                NewJob({"n": 3}, dedupeKey="k1"),
                NewJob({"n": 4}, jobType="other", dedupeKey="k1"),
                NewJob({"n": 5}),
            ]
        )
        self.assertIsNone(ids[1])
        self.assertIsNone(ids[2])
        rows = await self.pool.runQuery(
            "SELECT id, payload->>'n' FROM tx_ingest.jobs ORDER BY id"
        )
        self.assertEqual(
            rows,
            [(existing, "0"), (ids[0], "1"), (ids[3], "4"), (ids[4], "5")],
        )
        self.assertIsNone(await store.push({"n": 6}, dedupeKey="k0"))
        self.assertEqual(await store.pushMany([]), [])

    def test_badInput(self) -> None:
        """
        A naive C{runAt} or a payload simplejson cannot encode fails the
        returned Deferred, without raising.
        """
        store = JobStore(self.pool)
        self.failureResultOf(store.push({}, runAt=datetime(2030, 1, 1)), ValueError)
        self.failureResultOf(store.push({"x": float("nan")}), ValueError)
        self.failureResultOf(store.push({"x": object()}), TypeError)

    async def test_unstorablePayload(self) -> None:
        """
        A payload PostgreSQL refuses fails the call with the database's
        error, and stores nothing.
        """
        store = JobStore(self.pool)
        with self.assertRaises(psycopg2.DataError):
            await store.pushMany([NewJob({"a": 1}), NewJob({"a": "\x00"})])
        self.assertEqual(
            await self.pool.runQuery("SELECT count(*) FROM tx_ingest.jobs"), [(0,)]
        )

    async def test_otherSchema(self) -> None:
        """
        A store on another (migrated) schema writes there and notifies on
        that schema's channel.
        """
        await migrate(self.pool, "other")
        store = JobStore(self.pool, schema="other")
        self.assertEqual(store.channel, "other_jobs")
        await store.insertLines([b"{}"])
        await store.push({})
        rows = await self.pool.runQuery("SELECT count(*) FROM other.jobs")
        self.assertEqual(rows, [(2,)])

    def test_invalidSchema(self) -> None:
        """
        A store refuses an invalid schema name at once.
        """
        self.assertRaises(ValueError, JobStore, self.pool, schema="Other")
