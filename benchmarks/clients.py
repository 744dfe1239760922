"""
The client processes of the benchmarks: C{python -m benchmarks.clients KIND
JSON}, started by L{benchmarks.processes.Client}.

Each client prepares (imports, generates its lines, opens what it may open
early), prints C{ready}, waits for C{go} on its standard input, does the
measured work and prints one JSON object.  Times that other processes
compare are wall-clock (C{time.time()}), durations inside one process use
C{time.perf_counter()}.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from benchmarks.database import SCHEMA, copyJobs
from benchmarks.payloads import payloadLines, splitEvenly

#: The pgqueuer entrypoint of every benchmark job.
PGQUEUER_ENTRYPOINT = "noop"


def _readyThenWait() -> None:
    """
    Say we are ready, then block until the orchestrator says C{go}.
    """
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go")


def _runTwisted(main: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """
    Run C{main(reactor)} on the global reactor until it finishes (unlike
    L{twisted.internet.task.react}, without exiting the process).

    @raise Exception: Whatever C{main} raised.
    """
    from twisted.internet import defer, reactor
    from twisted.python.failure import Failure

    outcome: list[object] = []

    def start() -> None:
        done = defer.Deferred.fromCoroutine(main(reactor))
        done.addBoth(outcome.append)
        done.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if outcome and isinstance(outcome[0], Failure):
        outcome[0].raiseException()


def migrate(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    Bring the tx_ingest schema of a database up to date with the project's
    own migrations (what the service does when it starts).

    @param arguments: C{dsn}.
    @return: The versions applied.
    """
    from tx_ingest.store import HealingPool
    from tx_ingest.store import migrate as migrateSchema

    _readyThenWait()
    applied: list[int] = []

    async def main(reactor: Any) -> None:
        pool = HealingPool(reactor, arguments["dsn"], 1)
        await pool.start()
        try:
            applied.extend(await migrateSchema(pool, SCHEMA))
        finally:
            await pool.close()

    _runTwisted(main)
    return {"applied": applied}


def txSend(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    Send lines to tx_ingest servers over several connections with
    L{tx_ingest.send.Sender} (one per connection, each with its own share of
    the lines) and wait until every line is acked.

    @param arguments: C{ports} (connection I{i} goes to
        C{ports[i % len(ports)]}), C{connections}, C{count}, C{first} (the
        number of the first line).
    @return: C{started} and C{lastAck} (wall clock), C{seconds} between
        them, and the counts C{lines}, C{sent}, C{acked}, C{rejected},
        C{reconnects}.
    """
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from tx_ingest.send import Sender

    ports: list[int] = arguments["ports"]
    pieces = splitEvenly(arguments["count"], arguments["connections"])
    sources = [
        payloadLines(size, arguments.get("first", 0) + first) for first, size in pieces
    ]
    total = sum(len(s) for s in sources)
    acked = [0]
    times: dict[str, float] = {}

    class TimedSender(Sender):
        """
        A sender that notes when the last of all lines is acked.
        """

        def ackReceived(self, inputLine: int) -> None:
            before = self.result.acked
            Sender.ackReceived(self, inputLine)
            acked[0] += self.result.acked - before
            if acked[0] >= total and "lastAck" not in times:
                times["lastAck"] = time.time()
                times["lastAckPerf"] = time.perf_counter()

    _readyThenWait()
    results = []

    async def main(reactor: Any) -> None:
        senders = [
            TimedSender(
                reactor,
                TCP4ClientEndpoint(reactor, "127.0.0.1", ports[i % len(ports)]),
                source,
                retries=3,
            )
            for i, source in enumerate(sources)
        ]
        times["started"] = time.time()
        times["startedPerf"] = time.perf_counter()
        times["cpu"] = time.process_time()
        results.extend(await defer.gatherResults([sender.send() for sender in senders]))

    _runTwisted(main)
    lastAck = times.get("lastAckPerf", time.perf_counter())
    return {
        "started": times["started"],
        "lastAck": times.get("lastAck"),
        "seconds": lastAck - times["startedPerf"],
        "clientCpu": (time.process_time() - times["cpu"])
        / (lastAck - times["startedPerf"]),
        "lines": total,
        "sent": sum(r.sent for r in results),
        "acked": sum(r.acked for r in results),
        "rejected": sum(len(r.rejected) for r in results),
        "reconnects": sum(r.reconnects for r in results),
        "gaveUp": any(r.gaveUp for r in results),
    }


def copy(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    Load lines into the jobs table with one C{COPY} stream (the ceiling).

    @param arguments: C{dsn}, C{count}.
    @return: C{seconds} from the start of the C{COPY} to its commit.
    """
    lines = payloadLines(arguments["count"])
    _readyThenWait()
    return {"seconds": copyJobs(arguments["dsn"], lines), "lines": len(lines)}


async def _pgqueuerQueries(dsn: str) -> Any:
    """
    Connect asyncpg and wrap the connection in pgqueuer's L{Queries}.
    """
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries
    from psycopg2.extensions import parse_dsn

    settings = parse_dsn(dsn)
    names = {"host": "host", "port": "port", "user": "user", "password": "password"}
    connection = await asyncpg.connect(
        database=settings.get("dbname"),
        **{names[key]: value for key, value in settings.items() if key in names},
    )
    return connection, Queries(AsyncpgDriver(connection))


def pgqueuerInstall(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    Install pgqueuer's schema (C{Queries.install}, as C{pgq install} does).

    @param arguments: C{dsn}.
    """
    _readyThenWait()

    async def main() -> None:
        connection, queries = await _pgqueuerQueries(arguments["dsn"])
        try:
            await queries.install()
        finally:
            await connection.close()

    asyncio.run(main())
    return {}


def pgqueuerEnqueue(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    Enqueue lines with pgqueuer's batched C{Queries.enqueue} (lists of
    entrypoints, payloads and priorities), one batch after another on one
    asyncpg connection.

    @param arguments: C{dsn}, C{count}, C{batch}.
    @return: C{seconds} from the first batch sent to the last one answered.
    """
    lines = payloadLines(arguments["count"])
    batch: int = arguments["batch"]
    _readyThenWait()

    async def main() -> float:
        connection, queries = await _pgqueuerQueries(arguments["dsn"])
        try:
            started = time.perf_counter()
            for first in range(0, len(lines), batch):
                payloads = lines[first : first + batch]
                await queries.enqueue(
                    [PGQUEUER_ENTRYPOINT] * len(payloads),
                    payloads,
                    [0] * len(payloads),
                )
            return time.perf_counter() - started
        finally:
            await connection.close()

    return {"seconds": asyncio.run(main()), "lines": len(lines)}


def pgqueuerWorker(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    Run pgqueuer's C{QueueManager} with a no-op entrypoint until stopped
    (SIGTERM), noting when the first job started.

    @param arguments: C{dsn}, C{batchSize} (jobs per dequeue), C{markFile}
        (where the wall-clock time of the first job is written).
    """
    import signal

    from pgqueuer import QueueManager
    from pgqueuer.types import QueueExecutionMode

    markFile: str = arguments["markFile"]
    _readyThenWait()

    async def main() -> None:
        connection, queries = await _pgqueuerQueries(arguments["dsn"])
        manager = QueueManager(queries)
        first = [True]

        @manager.entrypoint(PGQUEUER_ENTRYPOINT)
        async def noop(job: Any) -> None:
            if first[0]:
                first[0] = False
                with open(markFile, "w") as f:
                    f.write(repr(time.time()))

        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, manager.shutdown.set
        )
        try:
            await manager.run(
                batch_size=arguments["batchSize"],
                mode=QueueExecutionMode.continuous,
            )
        finally:
            if not connection.is_closed():
                await connection.close()

    asyncio.run(main())
    return {}


def paced(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    Send lines at a steady rate on one connection and time each from its
    send to the ack that covers it.

    A plain socket and a selector, so that the client's own overhead is a
    few microseconds per line.  Lines are sent on a fixed schedule (line
    I{n} at I{n}/rate seconds); if the client falls behind, it catches up.

    @param arguments: C{port}, C{rate} (lines per second), C{count}.
    @return: C{latencies} (seconds, one per line), C{sentAt} (wall clock of
        the first and last sends), C{acked}, C{errors} (error replies).
    """
    lines = [line + b"\n" for line in payloadLines(arguments["count"])]
    rate: float = arguments["rate"]
    total = len(lines)
    sock = socket.create_connection(("127.0.0.1", arguments["port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    sendTimes = [0.0] * total
    latencies: list[float] = []
    errors = 0
    acked = 0
    sent = 0
    buffered = b""
    _readyThenWait()

    wallStart = time.time()
    start = time.perf_counter()
    closed = False
    while acked < total:
        now = time.perf_counter()
        while sent < total and start + sent / rate <= now:
            sock.sendall(lines[sent])
            sendTimes[sent] = time.perf_counter()
            sent += 1
        if sent == total and not closed:
            sock.shutdown(socket.SHUT_WR)
            closed = True
        wait = start + sent / rate - time.perf_counter() if sent < total else 5.0
        if not selector.select(max(wait, 0.0)):
            if sent == total:
                break
            continue
        data = sock.recv(65536)
        received = time.perf_counter()
        if not data:
            break
        buffered += data
        *replies, buffered = buffered.split(b"\n")
        for reply in replies:
            message = json.loads(reply)
            if "ack" in message:
                through = message["ack"]
                latencies.extend(received - sendTimes[i] for i in range(acked, through))
                acked = max(acked, through)
            else:
                errors += 1
    sock.close()
    return {
        "latencies": latencies,
        "sentAt": [wallStart, wallStart + (sendTimes[-1] - start)],
        "acked": acked,
        "sent": sent,
        "errors": errors,
    }


CLIENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "migrate": migrate,
    "tx-send": txSend,
    "copy": copy,
    "pgqueuer-install": pgqueuerInstall,
    "pgqueuer-enqueue": pgqueuerEnqueue,
    "pgqueuer-worker": pgqueuerWorker,
    "paced": paced,
}


def main(argv: list[str]) -> None:
    """
    Run the client named by C{argv[0]} with the JSON arguments C{argv[1]} and
    print its result as the last line.
    """
    kind, arguments = argv
    result = CLIENTS[kind](json.loads(arguments))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
