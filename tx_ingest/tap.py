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
from collections.abc import Callable, Mapping

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

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
        "in PostgreSQL. Without --dsn or DATABASE_URL, an embedded PostgreSQL "
        "runs in --data-dir."
    )

    optFlags = [
        ["ack", None, 'Send {"ack": N} once lines 1..N are stored.'],
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
            "Seconds to write accepted lines at shutdown before giving up.",
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
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        Listen on this Twisted server endpoint (repeatable; default
        tcp:5000:interface=127.0.0.1).
        """
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
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["dsn"] is None:
            self["dsn"] = os.environ.get("DATABASE_URL") or None


def optionsFromEnvironment(environ: Mapping[str, str]) -> Options:
    """
    Parse L{Options} from C{TX_INGEST_*} environment variables, for C{.tac}
    deployments.  C{TX_INGEST_LISTEN} may hold several endpoints separated by
    spaces; a flag is on when its variable is C{1}, C{true} or C{yes}.

    @raise usage.UsageError: For a bad value, as on the command line.
    """
    options = Options()
    flags = {flag[0] for flag in options.optFlags}
    argv: list[str] = []
    for key, value in sorted(environ.items()):
        if not key.startswith(ENVIRONMENT_PREFIX):
            continue
        name = key[len(ENVIRONMENT_PREFIX) :].lower().replace("_", "-")
        if name == "listen":
            for endpoint in value.split():
                argv += ["--listen", endpoint]
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
    endpoints = [serverFromString(reactor, e) for e in options["listen"]]

    dsn = options["dsn"]
    embedded = None
    if dsn is None:
        from tx_ingest.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(options["data-dir"])

    database = DatabaseService(
        reactor,
        (lambda: embedded.dsn) if embedded is not None else (lambda: dsn),
        options["pool-size"],
        options["schema"],
        {
            "jobType": options["job-type"],
            "typeField": options["type-field"],
            "dedupeField": options["dedupe-field"],
        },
    )
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


class _DeferredStore:
    """
    The database service's job store, looked up at each write (it exists
    only once the service has started).
    """

    def __init__(self, database: object) -> None:
        self._database = database

    def insertLines(self, lines):  # type: ignore[no-untyped-def]
        return self._database.store.insertLines(lines)  # type: ignore[attr-defined]
