# -*- test-case-name: tests.test_worker_db -*-
"""
The worker's SQL: claiming jobs, writing their outcomes, heartbeats, crash
recovery, retention, and the C{LISTEN} connection that wakes workers up.

The hot path is one round trip per cycle (L{ClaimStore.cycle}): the outcomes
of the jobs that finished since the last cycle and the claim of the next
batch travel in one statement, so a worker's drain rate is bounded by its
round trips, not by the number of jobs.

Every status change of a running job is fenced: it applies only while the
row is still C{running}, locked by this worker and at the attempt the worker
claimed.  A job taken back from a worker presumed dead is therefore never
completed by it as well.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import simplejson
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure

from tx_ingest.store.pool import HealingPool, _describe, _HealingDetector
from tx_ingest.store.pool import _PooledConnection as _QuietConnection
from tx_ingest.store.schema import notifyChannel, quoteSchema

#: What C{last_error} says of a job taken back from a worker presumed dead.
WORKER_LOST = "WorkerLost: worker {name} stopped while running this attempt"


@dataclass(frozen=True)
class ClaimedJob:
    """
    A job this worker claimed: it is C{running}, locked by the worker.

    @ivar jobId: Its id.
    @ivar jobType: Its type.
    @ivar payload: Its payload, decoded.
    @ivar attempt: Its C{attempts} after the claim (1 the first time).
    @ivar maxAttempts: Its row's C{max_attempts}; L{None} for the default.
    """

    jobId: int
    jobType: str
    payload: Any
    attempt: int
    maxAttempts: int | None


@dataclass(frozen=True)
class Outcome:
    """
    How one attempt of a job ended.

    @ivar jobId: The job.
    @ivar attempt: The attempt (fences the update).
    @ivar status: C{done}, C{failed}, or C{pending} to retry.
    @ivar error: For C{last_error}: the exception's type and message.
    @ivar retryDelay: For C{pending}: seconds from now until it is due.
    """

    jobId: int
    attempt: int
    status: str
    error: str | None = None
    retryDelay: float = 0.0


@dataclass(frozen=True)
class AttemptLimits:
    """
    The attempts a job gets when its row does not say: per job type, else a
    global default.  Used when jobs of a dead worker are taken back, so that
    a job that kills its worker every time ends C{failed} instead of looping.

    @ivar default: For job types not in C{byType}.
    @ivar byType: Per job type.
    """

    default: int
    byType: Mapping[str, int]

    def forJob(self, jobType: str, rowLimit: int | None) -> int:
        """
        @return: The attempts a job gets: its row's own limit, else its type's,
            else the default.
        """
        if rowLimit is not None:
            return rowLimit
        return self.byType.get(jobType, self.default)


def _takeBackSet(jobs: str) -> str:
    """
    The C{SET} clause taking back a running job whose worker is gone: the
    attempt counts, so it is C{failed} if that was its last one, else
    C{pending} again at once.
    """
    exhausted = (
        f"{jobs}.attempts >= coalesce({jobs}.max_attempts,"
        f" (%(limits)s::jsonb ->> {jobs}.job_type)::int, %(default)s)"
    )
    return f"""
        status = CASE WHEN {exhausted} THEN 'failed' ELSE 'pending' END,
        finished_at = CASE WHEN {exhausted} THEN now() END,
        locked_by = CASE WHEN {exhausted} THEN {jobs}.locked_by END,
        locked_at = CASE WHEN {exhausted} THEN {jobs}.locked_at END,
        last_error = replace(%(lost)s, '{{name}}', {jobs}.locked_by)
    """


class ClaimStore:
    """
    The SQL of one worker, run through a L{HealingPool}.

    @ivar pool: The connections used.
    @ivar schema: The schema of the tables.
    @ivar workerName: The name this worker locks jobs with.
    @ivar keepDone: Seconds a C{done} job is kept; 0 deletes it at once.
    """

    def __init__(
        self,
        pool: HealingPool,
        schema: str,
        workerName: str,
        keepDone: float = 86400.0,
    ) -> None:
        """
        @raise ValueError: For an invalid schema name.
        """
        self.pool = pool
        self.schema = schema
        self.workerName = workerName
        self.keepDone = keepDone
        self._jobs = f"{quoteSchema(schema)}.jobs"
        self._workers = f"{quoteSchema(schema)}.workers"

    def _limitParameters(self, limits: AttemptLimits) -> dict[str, Any]:
        return {
            "limits": simplejson.dumps(dict(limits.byType)),
            "default": limits.default,
            "lost": WORKER_LOST,
        }

    def register(self, host: str, pid: int, limits: AttemptLimits) -> Deferred[int]:
        """
        Record this worker in the workers table, and take back the jobs a
        previous process of the same name still held (it died, since a name
        is used by one live process at a time).

        @return: Fires with the number of jobs taken back.
        """
        sql = f"""
            WITH me AS (
                INSERT INTO {self._workers} AS w (name, host, pid)
                VALUES (%(name)s, %(host)s, %(pid)s)
                ON CONFLICT (name) DO UPDATE SET host = excluded.host,
                    pid = excluded.pid, started_at = now(), heartbeat_at = now()
            ), released AS (
                UPDATE {self._jobs} AS j SET {_takeBackSet("j")}
                WHERE j.status = 'running' AND j.locked_by = %(name)s
                RETURNING 1
            )
            SELECT count(*) FROM released
        """
        parameters = {
            "name": self.workerName,
            "host": host,
            "pid": pid,
            **self._limitParameters(limits),
        }
        return self._count(sql, parameters)

    def heartbeat(self, host: str, pid: int) -> Deferred[None]:
        """
        Say this worker is alive (recording it again if it was presumed dead
        and removed).
        """
        sql = f"""
            INSERT INTO {self._workers} (name, host, pid)
            VALUES (%(name)s, %(host)s, %(pid)s)
            ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()
        """
        return self.pool.runOperation(
            sql, {"name": self.workerName, "host": host, "pid": pid}
        )

    def recoverOrphans(
        self, orphanAfter: float, limits: AttemptLimits
    ) -> Deferred[tuple[int, list[str]]]:
        """
        Take back the running jobs of workers whose last heartbeat is older
        than C{orphanAfter} seconds (or who are not recorded at all), and
        forget those workers.

        @return: Fires with the number of jobs taken back and the names of
            the workers forgotten.
        """
        sql = f"""
            WITH alive AS (
                SELECT name FROM {self._workers}
                WHERE heartbeat_at >= now() - %(after)s * interval '1 second'
            ), gone AS (
                DELETE FROM {self._workers}
                WHERE heartbeat_at < now() - %(after)s * interval '1 second'
                RETURNING name
            ), recovered AS (
                UPDATE {self._jobs} AS j SET {_takeBackSet("j")}
                WHERE j.status = 'running'
                    AND j.locked_by NOT IN (SELECT name FROM alive)
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM recovered),
                (SELECT coalesce(array_agg(name ORDER BY name), '{{}}') FROM gone)
        """
        parameters = {"after": orphanAfter, **self._limitParameters(limits)}
        d = self.pool.runQuery(sql, parameters)
        return d.addCallback(lambda rows: (int(rows[0][0]), list(rows[0][1])))

    def cycle(
        self,
        outcomes: Sequence[Outcome],
        claimLimit: int,
        jobTypes: Sequence[str],
        known: Sequence[int] | None = None,
    ) -> Deferred[tuple[list[ClaimedJob], int]]:
        """
        In one round trip and one transaction: write C{outcomes}, then claim
        up to C{claimLimit} due C{pending} jobs of C{jobTypes}, highest
        priority first, then oldest C{run_at}, then oldest id.

        @param outcomes: Attempts that ended; each applies only if its job is
            still running under this worker at that attempt.
        @param claimLimit: The most jobs to claim (0 for none).
        @param jobTypes: The job types to claim.
        @param known: If given, every job running under this worker's name
            whose id is not in it goes back to C{pending}, its attempt not
            counted: after a round trip whose answer was lost, jobs claimed
            by it may be held without this worker knowing.

        @return: Fires with the claimed jobs, in that order, and the number
            of outcomes written (fewer than given if some jobs were taken
            back from this worker meanwhile).
        """
        done = [o for o in outcomes if o.status == "done"]
        others = [o for o in outcomes if o.status != "done"]
        parameters: dict[str, Any] = {
            "name": self.workerName,
            "doneIds": [o.jobId for o in done],
            "doneAttempts": [o.attempt for o in done],
            "ids": [o.jobId for o in others],
            "attempts": [o.attempt for o in others],
            "statuses": [o.status for o in others],
            "errors": [o.error for o in others],
            "delays": [o.retryDelay for o in others],
            "limit": claimLimit,
            "types": list(jobTypes),
            "known": list(known or ()),
        }
        return self.pool.runQuery(
            self._cycleSql(bool(done), bool(others), known is not None), parameters
        ).addCallback(self._readCycle)

    def _cycleSql(self, done: bool, others: bool, reconcile: bool) -> str:
        jobs = self._jobs
        fence = (
            "j.id = o.id AND j.attempts = o.attempt AND j.status = 'running'"
            " AND j.locked_by = %(name)s"
        )
        steps = []
        if reconcile:
            steps.append(
                f"""reconciled AS (
                    UPDATE {jobs} SET status = 'pending', locked_by = NULL,
                        locked_at = NULL, attempts = greatest(attempts - 1, 0)
                    WHERE status = 'running' AND locked_by = %(name)s
                        AND id <> ALL(%(known)s::bigint[])
                )"""
            )
        if done and self.keepDone == 0:
            steps.append(
                f"""done AS (
                    DELETE FROM {jobs} AS j USING unnest(
                        %(doneIds)s::bigint[], %(doneAttempts)s::int[]
                    ) AS o(id, attempt)
                    WHERE {fence}
                    RETURNING 1
                )"""
            )
        elif done:
            steps.append(
                f"""done AS (
                    UPDATE {jobs} AS j SET status = 'done', finished_at = now()
                    FROM unnest(%(doneIds)s::bigint[], %(doneAttempts)s::int[])
                        AS o(id, attempt)
                    WHERE {fence}
                    RETURNING 1
                )"""
            )
        if others:
            retry = "o.status = 'pending'"
            steps.append(
                f"""others AS (
                    UPDATE {jobs} AS j SET status = o.status,
                        finished_at = CASE WHEN {retry} THEN NULL ELSE now() END,
                        run_at = CASE WHEN {retry}
                            THEN now() + o.delay * interval '1 second'
                            ELSE j.run_at END,
                        locked_by = CASE WHEN {retry} THEN NULL ELSE j.locked_by END,
                        locked_at = CASE WHEN {retry} THEN NULL ELSE j.locked_at END,
                        last_error = coalesce(o.error, j.last_error)
                    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[],
                        %(statuses)s::text[], %(errors)s::text[],
                        %(delays)s::float8[]) AS o(id, attempt, status, error, delay)
                    WHERE {fence}
                    RETURNING 1
                )"""
            )

        # The claim scans the pending index in its order and stops at the
        # limit.  Right after a bulk load, before the table is analysed, the
        # planner may prefer sorting every pending row instead: enable_sort
        # off (for this transaction only) keeps it on the index.
        steps.append(
            f"""picked AS (
                SELECT id FROM {jobs}
                WHERE status = 'pending' AND run_at <= now()
                    AND job_type = ANY(%(types)s::text[])
                ORDER BY priority DESC, run_at, id
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            )"""
        )
        steps.append(
            f"""claimed AS (
                UPDATE {jobs} AS j SET status = 'running', locked_by = %(name)s,
                    locked_at = now(), attempts = j.attempts + 1
                FROM picked WHERE j.id = picked.id
                RETURNING j.id, j.job_type, j.payload, j.attempts, j.max_attempts,
                    j.priority, j.run_at
            )"""
        )
        counted = [name for name, on in (("done", done), ("others", others)) if on]
        settled = " + ".join(f"(SELECT count(*) FROM {name})" for name in counted)
        return (
            "SET LOCAL enable_sort = off; SET LOCAL jit = off;"
            " SET LOCAL synchronous_commit = off;\n"
            f"WITH {', '.join(steps)}\n"
            f"SELECT s.settled, c.id, c.job_type, c.payload, c.attempts,"
            f" c.max_attempts\n"
            f"FROM (SELECT {settled or 0} AS settled) AS s\n"
            "LEFT JOIN claimed AS c ON true\n"
            "ORDER BY c.priority DESC, c.run_at, c.id"
        )

    @staticmethod
    def _readCycle(rows: list[tuple[Any, ...]]) -> tuple[list[ClaimedJob], int]:
        settled = int(rows[0][0]) if rows else 0
        claimed = [
            ClaimedJob(row[1], row[2], row[3], row[4], row[5])
            for row in rows
            if row[1] is not None
        ]
        return claimed, settled

    def claimPlan(self, claimLimit: int, jobTypes: Sequence[str]) -> Deferred[str]:
        """
        Explain (without running it) the claim of L{cycle}, for checking
        that it follows the pending index.

        @return: Fires with the plan's text.
        """
        sql = self._cycleSql(False, False, False).replace("WITH ", "EXPLAIN WITH ", 1)
        d = self.pool.runQuery(
            sql, {"name": self.workerName, "limit": claimLimit, "types": list(jobTypes)}
        )
        return d.addCallback(lambda rows: "\n".join(row[0] for row in rows))

    def release(self) -> Deferred[int]:
        """
        At shutdown: put every job still running under this worker's name
        back to C{pending}, its attempt not counted, and remove the worker
        from the workers table.

        @return: Fires with the number of jobs put back.
        """
        sql = f"""
            WITH released AS (
                UPDATE {self._jobs} SET status = 'pending', locked_by = NULL,
                    locked_at = NULL, attempts = greatest(attempts - 1, 0)
                WHERE status = 'running' AND locked_by = %(name)s
                RETURNING 1
            ), gone AS (
                DELETE FROM {self._workers} WHERE name = %(name)s
            )
            SELECT count(*) FROM released
        """
        return self._count(sql, {"name": self.workerName})

    def deleteDone(self, olderThan: float, batchSize: int = 1000) -> Deferred[int]:
        """
        Delete up to C{batchSize} C{done} jobs that finished more than
        C{olderThan} seconds ago, skipping rows locked by others, so that
        each call holds few locks for a short time.

        @return: Fires with the number deleted.
        """
        sql = f"""
            WITH doomed AS (
                SELECT id FROM {self._jobs}
                WHERE status = 'done'
                    AND finished_at < now() - %(keep)s * interval '1 second'
                ORDER BY finished_at
                LIMIT %(batch)s
                FOR UPDATE SKIP LOCKED
            ), deleted AS (
                DELETE FROM {self._jobs} AS j USING doomed WHERE j.id = doomed.id
                RETURNING 1
            )
            SELECT count(*) FROM deleted
        """
        return self._count(sql, {"keep": olderThan, "batch": batchSize})

    def _count(self, sql: str, parameters: Mapping[str, Any]) -> Deferred[int]:
        return self.pool.runQuery(sql, parameters).addCallback(
            lambda rows: int(rows[0][0])
        )


class JobListener:
    """
    A connection of its own that C{LISTEN}s on the schema's channel and calls
    back on every notification.  It reconnects by itself after losing the
    server and then C{LISTEN}s again, calling back once more (jobs may have
    been announced while it was away).

    @ivar channel: The channel listened on.
    @ivar listening: Whether C{LISTEN} is in effect right now.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, dsn: str, schema: str, onNotify: Callable[[], None]
    ) -> None:
        """
        @param reactor: An L{IReactorFDSet} and L{IReactorTime} provider.
        @param dsn: Where to connect.
        @param schema: Whose channel to listen on (see L{notifyChannel}).
        @param onNotify: Called with no argument for each notification, and
            after each successful C{LISTEN}.
        """
        self.channel = notifyChannel(schema)
        self.listening = False
        self._dsn = dsn
        self._onNotify = onNotify
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self._detector = _HealingDetector(reactor, self._lost, self._attemptFailed)
        self._connection = _QuietConnection(
            reactor=reactor, cooperator=self._cooperator, detector=self._detector
        )
        self._detector.addRecoveryHandler(self._listen)
        self._connection.addNotifyObserver(lambda notify: self._onNotify())
        self._waitingLogged = False

    def start(self) -> None:
        """
        Connect (retrying until the server answers) and C{LISTEN}.
        """
        self._detector.setReconnectable(self._connection, self._dsn)
        self._detector.connectUntilOpen()

    def _listen(self) -> Deferred[None]:
        d = self._connection.runOperation(f'LISTEN "{self.channel}"')

        def listening(_: object) -> None:
            self.listening = True
            self._waitingLogged = False
            self.log.info("listening for new jobs on {channel}", channel=self.channel)
            self._onNotify()

        def failed(reason: Failure) -> None:
            # The detector reconnects if the connection died; otherwise the
            # poll keeps the worker going without notifications.
            self.log.warn(
                "LISTEN {channel} failed: {error}; polling only",
                channel=self.channel,
                error=_describe(reason),
            )

        return d.addCallbacks(listening, failed)

    def _lost(self, reason: Failure) -> None:
        self.listening = False
        self.log.warn(
            "lost the LISTEN connection ({error}); polling until it is back",
            error=_describe(reason),
        )

    def _attemptFailed(self, reason: Failure) -> None:
        if not self._waitingLogged:
            self._waitingLogged = True
            self.log.warn(
                "cannot open the LISTEN connection yet: {error}",
                error=_describe(reason),
            )

    def stop(self) -> Deferred[None]:
        """
        Stop reconnecting and close the connection.

        @return: Fires once closed.
        """
        self.listening = False

        async def stop() -> None:
            await self._detector.stopReconnecting()
            if self._connection.pollable() is not None:
                self._connection.close()
            self._cooperator.stop()

        return Deferred.fromCoroutine(stop())


__all__ = [
    "WORKER_LOST",
    "AttemptLimits",
    "ClaimStore",
    "ClaimedJob",
    "JobListener",
    "Outcome",
]
