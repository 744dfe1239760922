# -*- test-case-name: tests.test_store -*-
"""
Writing jobs: the only place with SQL that inserts into the jobs table.

Two ways in.  L{JobStore.insertLines} takes raw NDJSON lines from the network
front end and stores a whole batch in one round trip: the lines are joined
into one JSON array, sent as one parameter and expanded by PostgreSQL, which
also works out each job's type and dedupe key.  L{JobStore.push} and
L{JobStore.pushMany} are for Python code that enqueues jobs it built itself.

Every insert announces itself with C{NOTIFY} on L{notifyChannel} in the same
transaction, so a listening worker wakes only for committed jobs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import simplejson
from psycopg2 import Error as DatabaseError
from twisted.internet.defer import Deferred, succeed

from tx_ingest.store.pool import HealingPool
from tx_ingest.store.schema import notifyChannel, quoteSchema

# SQLSTATE classes meaning "this data cannot be stored": data exceptions
# (bad JSON, NUL characters, numeric overflow) and exceeded limits.
_REFUSED_DATA_CLASSES = ("22", "54")

# An escape in a JSON string: a \uXXXX escape, or a backslash and the
# character it escapes (so that "\\u0000" is read as "\\" then "u0000").
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


@dataclass(frozen=True)
class NewJob:
    """
    A job to enqueue with L{JobStore.pushMany}.

    @ivar payload: Anything simplejson can encode (without NaN or infinity).
    @ivar jobType: The job's type; L{None} for the store's default.
    @ivar priority: Higher runs first.
    @ivar runAt: When the job becomes due (timezone-aware); L{None} for now.
    @ivar maxAttempts: How many times it may be tried; L{None} for the
        worker's default.
    @ivar dedupeKey: If set, the job is dropped when a job of the same type
        with the same key already exists.
    """

    payload: Any
    jobType: str | None = None
    priority: int = 0
    runAt: datetime | None = None
    maxAttempts: int | None = None
    dedupeKey: str | None = None


def _isRefusedData(error: BaseException) -> bool:
    code = getattr(error, "pgcode", None)
    return isinstance(error, DatabaseError) and (code or "")[:2] in (
        _REFUSED_DATA_CLASSES
    )


def _refusalDetail(error: BaseException) -> str:
    diag = getattr(error, "diag", None)
    message = getattr(diag, "message_primary", None) or str(error)
    return "PostgreSQL refused it: " + " ".join(message.split())


def findUnstorableEscape(line: bytes) -> str | None:
    """
    Look in a JSON text for C{\\u} escapes that PostgreSQL's jsonb refuses:
    C{\\u0000} and surrogates that are not part of a pair.

    @param line: One JSON text, already known to be valid JSON.

    @return: Why the line cannot be stored, or L{None} if it can.
    """
    if b"\\u" not in line:
        return None
    pendingHigh: tuple[int, int] | None = None
    for match in _ESCAPE.finditer(line):
        hexDigits = match.group(1)
        code = int(hexDigits, 16) if hexDigits is not None else -1
        if pendingHigh is not None:
            high, end = pendingHigh
            pendingHigh = None
            if match.start() == end and 0xDC00 <= code <= 0xDFFF:
                continue
            return f"lone surrogate escape \\u{high:04x} (not a character)"
        if code == 0:
            return "\\u0000 escape (PostgreSQL cannot store NUL characters)"
        if 0xD800 <= code <= 0xDBFF:
            pendingHigh = (code, match.end())
        elif 0xDC00 <= code <= 0xDFFF:
            return f"lone surrogate escape \\u{code:04x} (not a character)"
    if pendingHigh is not None:
        return f"lone surrogate escape \\u{pendingHigh[0]:04x} (not a character)"
    return None


class JobStore:
    """
    Inserts jobs into C{<schema>.jobs} through a L{HealingPool}.

    @ivar pool: The connections used.
    @ivar schema: The schema holding the tables (already migrated).
    @ivar jobType: The type of lines and jobs that name none.
    @ivar typeField: The field of a line's object naming its job type, used
        when its value is a JSON string.
    @ivar dedupeField: The field of a line's object holding its dedupe key,
        used when its value is a JSON string or number.
    @ivar channel: The channel notified of new jobs.
    """

    def __init__(
        self,
        pool: HealingPool,
        schema: str = "tx_ingest",
        jobType: str = "default",
        typeField: str | None = None,
        dedupeField: str | None = None,
    ) -> None:
        """
        @param pool: See L{JobStore.pool}.
        @param schema: See L{JobStore.schema}.
        @param jobType: See L{JobStore.jobType}.
        @param typeField: See L{JobStore.typeField}; L{None} to give every
            line the type C{jobType}.
        @param dedupeField: See L{JobStore.dedupeField}; L{None} for no
            deduplication of lines.

        @raise ValueError: If C{schema} is not a valid schema name.
        """
        quoted = quoteSchema(schema)
        self.pool = pool
        self.schema = schema
        self.jobType = jobType
        self.typeField = typeField
        self.dedupeField = dedupeField
        self.channel = notifyChannel(schema)
        notify = f'NOTIFY "{self.channel}"'
        self._linesSql = _linesInsertSql(quoted, typeField, dedupeField)
        self._linesSqlNotify = self._linesSql + ";\n" + notify
        self._notifySql = notify
        self._pushSql = notify + ";\n" + _pushSql(quoted)
        self._table = f"{quoted}.jobs"

    def _linesParameters(self, batch: str) -> dict[str, str | None]:
        return {
            "batch": batch,
            "jobType": self.jobType,
            "typeField": self.typeField,
            "dedupeField": self.dedupeField,
        }

    def insertLines(self, lines: Sequence[bytes]) -> Deferred[dict[int, str]]:
        """
        Store a batch of NDJSON lines as jobs, in one transaction.

        Lines whose C{dedupeField} key already exists for their job type (in
        the table, or earlier in the batch) are dropped silently.  Lines that
        PostgreSQL refuses are left out and reported; every other line is
        stored, in order.

        @param lines: Each a UTF-8 JSON object, already checked to be valid
            JSON, without its line ending.

        @return: Fires with C{{index: reason}} for each refused line (usually
            empty).  Fails with the original failure if the batch could not
            be written at all (see L{isConnectionFailure}); nothing of the
            batch was stored then.
        """
        if not lines:
            return succeed({})
        return Deferred.fromCoroutine(self._insertLines(lines))

    async def _insertLines(self, lines: Sequence[bytes]) -> dict[int, str]:
        joined = b"[" + b",".join(lines) + b"]"
        refused: dict[int, str] = {}

        # The cheap checks first: most batches have no escape at all.
        if b"\\u" in joined:
            for index, line in enumerate(lines):
                reason = findUnstorableEscape(line)
                if reason is not None:
                    refused[index] = reason
        try:
            batch = joined.decode("utf-8")
        except UnicodeDecodeError:
            for index, line in enumerate(lines):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    refused[index] = f"invalid UTF-8: {e.reason}"

        kept = [(i, line) for i, line in enumerate(lines) if i not in refused]
        if not kept:
            return refused
        if refused:
            batch = _jsonArray([line for _, line in kept])

        try:
            await self.pool.runOperation(
                self._linesSqlNotify, self._linesParameters(batch)
            )
        except DatabaseError as e:
            if not _isRefusedData(e):
                raise
            if len(kept) == 1:
                refused[kept[0][0]] = _refusalDetail(e)
                return refused
            await self.pool.runInteraction(
                lambda cursor: Deferred.fromCoroutine(
                    self._insertIsolating(cursor, kept, refused)
                )
            )
        return refused

    async def _insertIsolating(
        self, cursor: Any, kept: list[tuple[int, bytes]], refused: dict[int, str]
    ) -> None:
        """
        Inside a transaction, insert the halves of a refused batch under
        savepoints, halving again whatever is refused, down to single lines.
        """
        middle = len(kept) // 2
        chunks = [kept[:middle], kept[middle:]]
        while chunks:
            chunk = chunks.pop(0)
            batch = _jsonArray([line for _, line in chunk])
            try:
                await cursor.execute(
                    "SAVEPOINT chunk;\n"
                    + self._linesSql
                    + ";\nRELEASE SAVEPOINT chunk",
                    self._linesParameters(batch),
                )
            except DatabaseError as e:
                if not _isRefusedData(e):
                    raise
                await cursor.execute(
                    "ROLLBACK TO SAVEPOINT chunk; RELEASE SAVEPOINT chunk"
                )
                if len(chunk) == 1:
                    refused[chunk[0][0]] = _refusalDetail(e)
                else:
                    middle = len(chunk) // 2
                    chunks[:0] = [chunk[:middle], chunk[middle:]]
        await cursor.execute(self._notifySql)

    def push(
        self,
        payload: Any,
        jobType: str | None = None,
        priority: int = 0,
        runAt: datetime | None = None,
        maxAttempts: int | None = None,
        dedupeKey: str | None = None,
    ) -> Deferred[int | None]:
        """
        Enqueue one job.

        @param payload: See L{NewJob.payload}.
        @param jobType: See L{NewJob.jobType}.
        @param priority: See L{NewJob.priority}.
        @param runAt: See L{NewJob.runAt}.
        @param maxAttempts: See L{NewJob.maxAttempts}.
        @param dedupeKey: See L{NewJob.dedupeKey}.

        @return: Fires with the new job's id, or L{None} if it was dropped
            as a duplicate.
        """
        job = NewJob(payload, jobType, priority, runAt, maxAttempts, dedupeKey)
        return self.pushMany([job]).addCallback(lambda ids: ids[0])

    def pushMany(self, jobs: Iterable[NewJob]) -> Deferred[list[int | None]]:
        """
        Enqueue several jobs in one transaction, with one round trip and one
        notification.

        @param jobs: The jobs, in the order their ids are given.

        @return: Fires with each job's new id, or L{None} for a job dropped as
            a duplicate (of an existing job or of an earlier one in C{jobs}).
            Fails with L{ValueError} or L{TypeError} for a payload simplejson
            cannot encode or a naive C{runAt}.
        """
        return Deferred.fromCoroutine(self._pushMany(list(jobs)))

    async def _pushMany(self, jobs: list[NewJob]) -> list[int | None]:
        if not jobs:
            return []
        specs = [self._encodeSpec(job) for job in jobs]
        document = simplejson.dumps(specs, allow_nan=False, separators=(",", ":"))
        rows = await self.pool.runQuery(
            self._pushSql, {"jobs": document, "table": self._table}
        )
        return [row[0] for row in rows]

    def _encodeSpec(self, job: NewJob) -> dict[str, Any]:
        runAt = None
        if job.runAt is not None:
            if job.runAt.utcoffset() is None:
                raise ValueError(f"runAt must be timezone-aware, not {job.runAt!r}")
            runAt = job.runAt.isoformat()
        return {
            "t": self.jobType if job.jobType is None else job.jobType,
            "p": job.payload,
            "pr": job.priority,
            "r": runAt,
            "m": job.maxAttempts,
            "k": job.dedupeKey,
        }


def _jsonArray(lines: list[bytes]) -> str:
    """
    Join JSON texts, known to be UTF-8, into the text of one JSON array.
    """
    return (b"[" + b",".join(lines) + b"]").decode("utf-8")


def _linesInsertSql(quoted: str, typeField: str | None, dedupeField: str | None) -> str:
    """
    The statement inserting the lines of a batch (parameter C{batch}, a JSON
    array), in order; field names and the default type are parameters too.
    """
    if typeField is None:
        jobType = "%(jobType)s"
    else:
        jobType = (
            "CASE WHEN jsonb_typeof(e.value -> %(typeField)s) = 'string'"
            " THEN e.value ->> %(typeField)s ELSE %(jobType)s END"
        )
    columns, values, conflict = "job_type, payload", f"{jobType}, e.value", ""
    if dedupeField is not None:
        # Only then can rows conflict: without it, leaving ON CONFLICT out
        # saves the arbiter-index check on every row.
        columns += ", dedupe_key"
        values += (
            ", CASE WHEN jsonb_typeof(e.value -> %(dedupeField)s)"
            " IN ('string', 'number') THEN e.value ->> %(dedupeField)s END"
        )
        conflict = (
            "ON CONFLICT (job_type, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING"
        )
    return f"""
        INSERT INTO {quoted}.jobs ({columns})
        SELECT {values}
        FROM jsonb_array_elements(%(batch)s::jsonb) WITH ORDINALITY AS e(value, n)
        ORDER BY e.n
        {conflict}
    """


def _pushSql(quoted: str) -> str:
    """
    The statement inserting L{NewJob}s encoded as a JSON array (parameter
    C{jobs}) and returning, in their order, each one's id or NULL.

    Ids are drawn from the table's own identity sequence before inserting, so
    that a job dropped by C{ON CONFLICT} can be told from one inserted.
    """
    return f"""
        WITH input AS MATERIALIZED (
            SELECT s.n, s.t, s.p, s.pr, s.r, s.m, s.k,
                nextval(pg_get_serial_sequence(%(table)s, 'id')::regclass) AS id
            FROM ROWS FROM (
                jsonb_to_recordset(%(jobs)s::jsonb)
                    AS (t text, p jsonb, pr int, r timestamptz, m int, k text)
            ) WITH ORDINALITY AS s(t, p, pr, r, m, k, n)
        ), inserted AS (
            INSERT INTO {quoted}.jobs (
                id, job_type, payload, priority, run_at, max_attempts, dedupe_key
            )
            OVERRIDING SYSTEM VALUE
            SELECT id, t, p, pr, coalesce(r, now()), m, k FROM input ORDER BY n
            ON CONFLICT (job_type, dedupe_key) WHERE dedupe_key IS NOT NULL
            DO NOTHING
            RETURNING id
        )
        SELECT inserted.id FROM input LEFT JOIN inserted USING (id)
        ORDER BY input.n
    """
