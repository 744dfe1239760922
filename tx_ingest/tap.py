# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin's options and service: C{twistd -n ingest --help}.

The C{.tac} file reads the same options from environment variables named
C{TX_INGEST_} followed by the option's name in upper case with C{_} for
C{-} (C{TX_INGEST_MAX_CONNECTIONS=50}); see L{optionsFromEnvironment}.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

if TYPE_CHECKING:
    from tx_ingest.service import DatabaseService

log = Logger()

DEFAULT_LISTEN = "tcp:5000:interface=127.0.0.1"
ENVIRONMENT_PREFIX = "TX_INGEST_"


def _bounded(kind: Callable[[str], float], low: float, what: str) -> Callable:
    """
    A coerce function that parses with C{kind} and refuses values below
    C{low}.
    """

    def coerce(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{value!r} is not {what}")
        if number < low:
            raise ValueError(f"{value!r} is not {what}")
        return number

    coerce.coerceDoc = f"Must be {what}."  # type: ignore[attr-defined]
    return coerce


positiveInt = _bounded(int, 1, "a whole number of at least 1")
nonNegativeSeconds = _bounded(float, 0, "a number of seconds, 0 or more")
positiveSeconds = _bounded(float, 0.001, "a positive number of seconds")


def identifier(value: str) -> str:
    """
    Coerce a PostgreSQL identifier (schema name): lower-case letters, digits
    and underscores.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        raise ValueError(
            f"{value!r} is not a schema name (lower-case letters, digits, _)"
        )
    return value


identifier.coerceDoc = "Lower-case letters, digits and _."  # type: ignore[attr-defined]


def fieldName(value: str) -> str:
    """
    Coerce a top-level JSON field name.
    """
    if not value:
        raise ValueError("a field name cannot be empty")
    return value


class Options(usage.Options):
    """
    Command-line options of C{twistd ingest}.
    """

    synopsis = "[options]"
    longdesc = (
        "Accept newline-delimited JSON over TCP and store every line as a job "
        "in PostgreSQL; with --tasks, run the jobs too. Listens on "
        "tcp:5000:interface=127.0.0.1 unless --listen says otherwise. Without "
        "--dsn or DATABASE_URL, an embedded PostgreSQL runs in --data-dir."
    )

    optFlags = [
        ["ack", None, 'Send {"ack": N} once lines 1..N are stored.'],
        ["no-worker", None, "Do not run jobs (an ingest node only)."],
        ["no-ingest", None, "Do not listen for lines (a worker only)."],
        ["no-notify", None, "Poll for jobs only, without LISTEN (PgBouncer)."],
    ]

    optParameters = [
        ["max-connections", None, 100, "Most clients served at once.", positiveInt],
        [
            "max-line-bytes",
            None,
            8192,
            "Longest accepted line, in bytes, without its newline.",
            positiveInt,
        ],
        [
            "queue-size",
            None,
            1024,
            "Most accepted lines held in memory before clients are paused.",
            positiveInt,
        ],
        [
            "idle-timeout",
            None,
            300.0,
            "Seconds a silent client may stay connected (0: for ever).",
            nonNegativeSeconds,
        ],
        [
            "shutdown-timeout",
            None,
            30.0,
            "Seconds to write accepted lines, and for running jobs to end, at "
            "shutdown.",
            nonNegativeSeconds,
        ],
        [
            "dsn",
            None,
            None,
            "PostgreSQL libpq string or URL (default: $DATABASE_URL, else "
            "an embedded server).",
        ],
        ["schema", None, "tx_ingest", "PostgreSQL schema of the tables.", identifier],
        ["job-type", None, "default", "Job type of ingested lines.", fieldName],
        [
            "type-field",
            None,
            None,
            "Take a line's job type from this field when it is a string.",
            fieldName,
        ],
        [
            "dedupe-field",
            None,
            None,
            "Store a line once per job type and value of this field.",
            fieldName,
        ],
        ["batch-size", None, 1000, "Most lines per INSERT.", positiveInt],
        ["pool-size", None, 4, "PostgreSQL connections for writing.", positiveInt],
        [
            "data-dir",
            None,
            "tx_ingest-data",
            "Directory of the embedded PostgreSQL.",
        ],
        [
            "concurrency",
            None,
            10,
            "Most jobs run at once by this process.",
            positiveInt,
        ],
        [
            "poll-interval",
            None,
            1.0,
            "Seconds between looks for due jobs when nothing announces any.",
            positiveSeconds,
        ],
        [
            "orphan-after",
            None,
            60.0,
            "Seconds without a heartbeat before a worker's jobs are taken back.",
            positiveSeconds,
        ],
        [
            "keep-done",
            None,
            86400.0,
            "Seconds done jobs are kept (0: deleted at once).",
            nonNegativeSeconds,
        ],
        [
            "max-attempts",
            None,
            5,
            "Attempts a job gets when neither its row nor its handler says.",
            positiveInt,
        ],
        [
            "job-timeout",
            None,
            300.0,
            "Seconds an attempt may take when its handler does not say (0: no limit).",
            nonNegativeSeconds,
        ],
        [
            "worker-name",
            None,
            None,
            "Name locking this worker's jobs; unique among live processes "
            "(default: <host>-<pid>).",
            fieldName,
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []
        self["tasks"] = []

    def opt_tasks(self, module: str) -> None:
        """Module of job handlers to import (repeatable)."""
        self["tasks"].append(module)

    def opt_listen(self, endpoint: str) -> None:
        """Twisted server endpoint to listen on (repeatable)."""
        try:
            from twisted.internet import reactor

            serverFromString(reactor, endpoint)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--listen {endpoint!r}: {e}")
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        """
        Fill in defaults that depend on other options or the environment.
        """
        if self["no-ingest"]:
            if self["no-worker"]:
                raise usage.UsageError(
                    "--no-ingest and --no-worker leave nothing to run"
                )
            if self["listen"]:
                raise usage.UsageError("--listen makes no sense with --no-ingest")
            if not self["tasks"]:
                raise usage.UsageError("--no-ingest needs --tasks")
        elif not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["tasks"] and not self["no-worker"]:
            from tx_ingest.tasks import importTaskModules

            try:
                importTaskModules(self["tasks"])
            except ImportError as e:
                raise usage.UsageError(str(e))
        if self["dsn"] is None:
            self["dsn"] = os.environ.get("DATABASE_URL") or None
        if self["dsn"] is None:
            from tx_ingest.embedded import EmbeddedUnavailable, requireEmbedded

            try:
                requireEmbedded()
            except EmbeddedUnavailable as e:
                raise usage.UsageError(str(e))


def optionsFromEnvironment(environ: Mapping[str, str]) -> Options:
    """
    Parse L{Options} from C{TX_INGEST_*} environment variables, for C{.tac}
    deployments.  C{TX_INGEST_LISTEN} may hold several endpoints separated by
    spaces, and C{TX_INGEST_TASKS} several modules; a flag is on when its
    variable is C{1}, C{true} or C{yes}.  Variables naming no option (such
    as C{TX_INGEST_TEST_DSN}, which the tests read) are ignored, with a
    warning.

    @raise usage.UsageError: For a bad value, as on the command line.
    """
    options = Options()
    flags = {flag[0] for flag in options.optFlags}
    parameters = {str(parameter[0]) for parameter in options.optParameters}  # type: ignore[index]
    argv: list[str] = []
    for key, value in sorted(environ.items()):
        if not key.startswith(ENVIRONMENT_PREFIX):
            continue
        name = key[len(ENVIRONMENT_PREFIX) :].lower().replace("_", "-")
        if name not in flags | parameters | {"listen", "tasks"}:
            log.warn("ignoring {variable}: no such option", variable=key)
        elif name in ("listen", "tasks"):
            for item in value.split():
                argv += [f"--{name}", item]
        elif name in flags:
            if value.lower() in ("1", "true", "yes"):
                argv.append(f"--{name}")
        else:
            argv.append(f"--{name}={value}")
    options.parseOptions(argv)
    return options


def makeService(options: Options) -> IService:
    """
    Build the service from parsed options, with the global reactor.
    """
    from twisted.internet import reactor

    from tx_ingest.service import DatabaseService, IngestService
    from tx_ingest.sink import BatchSink
    from tx_ingest.stream import IngestStream

    stream = IngestStream(
        reactor,
        maxConnections=options["max-connections"],
        maxLineBytes=options["max-line-bytes"],
        queueSize=options["queue-size"],
        idleTimeout=options["idle-timeout"],
        ack=options["ack"],
    )
    ingest = not options["no-ingest"]
    endpoints = [serverFromString(reactor, e) for e in options["listen"]]

    dsn = options["dsn"]
    embedded = None
    if dsn is None:
        from tx_ingest.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(options["data-dir"])

    def currentDsn() -> str:
        """
        The DSN to connect to: the embedded server's, once it has started.
        """
        if embedded is not None:
            assert embedded.dsn is not None, "embedded PostgreSQL not started"
            return embedded.dsn
        return str(dsn)

    database = DatabaseService(
        reactor,
        currentDsn,
        options["pool-size"],
        options["schema"],
        {
            "jobType": options["job-type"],
            "typeField": options["type-field"],
            "dedupeField": options["dedupe-field"],
        },
    )
    sink = None
    if ingest:
        sink = BatchSink(
            reactor,
            stream.queue,
            _DeferredStore(database),
            batchSize=options["batch-size"],
            concurrency=options["pool-size"],
            ready=database.ready,
        )
    service = IngestService(
        reactor, stream, endpoints, sink, options["shutdown-timeout"]
    )
    if embedded is not None:
        embedded.setServiceParent(service)
    database.setServiceParent(service)
    worker = _makeWorker(reactor, options, database)
    if worker is not None:
        # Added after the database, so that it stops before it.
        worker.setServiceParent(service)
    if not ingest:
        log.info("ingest off (--no-ingest): no listener, no sink")
    log.info(
        "tx_ingest starting: listen={listen} max-connections={maxConnections} "
        "max-line-bytes={maxLineBytes} queue-size={queueSize} "
        "idle-timeout={idleTimeout} ack={ack} batch-size={batchSize} "
        "pool-size={poolSize}",
        listen=" ".join(options["listen"]),
        maxConnections=options["max-connections"],
        maxLineBytes=options["max-line-bytes"],
        queueSize=options["queue-size"],
        idleTimeout=options["idle-timeout"],
        ack=options["ack"],
        batchSize=options["batch-size"],
        poolSize=options["pool-size"],
    )
    return service


def _makeWorker(reactor: object, options: Options, database: object) -> IService | None:
    """
    The worker service the options ask for, if any.
    """
    if options["no-worker"]:
        log.info("worker off (--no-worker)")
        return None
    from tx_ingest.tasks import defaultRegistry

    if not options["tasks"]:
        log.info("worker off: no --tasks module names job handlers")
        return None
    if not len(defaultRegistry):
        log.warn(
            "worker off: the --tasks modules {modules} register no handler",
            modules=" ".join(options["tasks"]),
        )
        return None

    from tx_ingest.worker import WorkerService, WorkerSettings, defaultWorkerName

    settings = WorkerSettings(
        name=options["worker-name"] or defaultWorkerName(),
        concurrency=options["concurrency"],
        pollInterval=options["poll-interval"],
        notify=not options["no-notify"],
        orphanAfter=options["orphan-after"],
        keepDone=options["keep-done"],
        maxAttempts=options["max-attempts"],
        jobTimeout=options["job-timeout"],
        shutdownTimeout=options["shutdown-timeout"],
    )
    return WorkerService(reactor, database, defaultRegistry, settings)


class _DeferredStore:
    """
    The database service's job store, looked up at each write (it exists
    only once the service has started).
    """

    def __init__(self, database: DatabaseService) -> None:
        self._database = database

    def insertLines(self, lines: Sequence[bytes]) -> Deferred[dict[int, str]]:
        """
        Write through the job store of the started database service.
        """
        store = self._database.store
        assert store is not None, "the database service has not started"
        return store.insertLines(lines)
