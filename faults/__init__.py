# -*- test-case-name: tests.test_faults -*-
"""
Fault scenarios for tx_ingest: stream acknowledged lines at a real
C{twistd -n ingest} process while something breaks, then count what was
sent, acked, stored, lost (acked but not stored) and duplicated.

Each scenario is an C{async} function returning an L{Outcome}; the trial
tests in C{tests/test_faults.py} run them small, C{python -m faults} runs
them long (see L{faults.__main__}).  Clients are L{tx_ingest.send.Sender}s,
which resend every line not acked when a connection drops, so a line may be
stored more than once but an acked line must never be missing.

Every scenario makes its own database (on the server of
L{tests.pgfixture.adminDsn}) or its own embedded PostgreSQL in a temporary
directory, and removes it afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.netclient import ReplyCollector, connect
from tests.pgfixture import createDatabase, dropDatabase, terminateBackends
from tests.servicerun import ServiceProcess
from tx_ingest.send import Sender

#: The README's per-line bookkeeping allowance, in bytes.
LINE_OVERHEAD = 100

#: The README's per-connection allowance besides two partial lines, in bytes.
CONNECTION_OVERHEAD = 128 * 1024


@dataclass(frozen=True)
class Scale:
    """
    How big each scenario is.

    @ivar connections: Streaming clients of the restart, terminate, kill and
        stop scenarios.
    @ivar lines: Lines each of those clients sends.
    @ivar lockSeconds: How long the jobs table stays locked.
    @ivar lockClients: Clients flooding while it is locked.
    @ivar lockLines: Lines each of those clients sends.
    @ivar connectionCap: C{--max-connections} of the flood scenario, which
        opens ten times as many connections at once.
    @ivar workerJobs: Jobs drained by the worker scenario.
    @ivar timeout: Seconds any one wait may take before the scenario gives up.
    """

    connections: int
    lines: int
    lockSeconds: float
    lockClients: int
    lockLines: int
    connectionCap: int
    workerJobs: int
    timeout: float

    @property
    def total(self) -> int:
        """
        Lines sent by the streaming scenarios.
        """
        return self.connections * self.lines


#: Sizes for the trial tests: each scenario well under 25 seconds.
TEST = Scale(4, 3000, 3.0, 20, 1000, 10, 3000, 20.0)

#: C{python -m faults --quick}.
QUICK = Scale(4, 5000, 5.0, 20, 2000, 20, 10_000, 60.0)

#: C{python -m faults}: 100,000 lines per streaming scenario.
FULL = Scale(8, 12_500, 20.0, 50, 4000, 100, 100_000, 180.0)


@dataclass
class Outcome:
    """
    What one scenario did.

    @ivar scenario: Its name.
    @ivar sent: Distinct lines sent (resends not counted).
    @ivar acked: Distinct lines acked.
    @ivar stored: Distinct lines found in the jobs table.
    @ivar lost: Acked lines missing from the table (must be 0).
    @ivar duplicates: Extra copies of lines in the table.
    @ivar seconds: How long the scenario took.
    @ivar problems: The scenario's own checks that failed, in words.
    @ivar details: Other measurements, by name.
    """

    scenario: str
    sent: int = 0
    acked: int = 0
    stored: int = 0
    lost: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, condition: bool, problem: str) -> None:
        """
        Record C{problem} unless C{condition} holds.
        """
        if not condition:
            self.problems.append(problem)


async def until(
    condition: Callable[[], bool], timeout: float, what: str = "condition"
) -> None:
    """
    Wait, polling the reactor, until C{condition()} is true.

    @raise TimeoutError: If it is still false after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await deferLater(reactor, 0.02, lambda: None)


def lineKey(connection: int, number: int) -> str:
    """
    The dedupe key of line C{number} (from 0) of client C{connection}.
    """
    return f"{connection}-{number}"


def fleetLines(connection: int, count: int, pad: int = 40) -> Iterator[bytes]:
    """
    The lines client C{connection} sends: objects with a unique key C{k}, the
    client C{c} and the line's index C{n}.
    """
    padding = b"p" * pad
    for number in range(count):
        yield b'{"k":"%d-%d","c":%d,"n":%d,"pad":"%s"}' % (
            connection,
            number,
            connection,
            number,
            padding,
        )


class Fleet:
    """
    Several L{Sender}s streaming L{fleetLines} to one port at once.

    @ivar senders: One per client.
    @ivar lines: Lines per client.
    """

    def __init__(
        self, port: int, connections: int, lines: int, window: int = 5000
    ) -> None:
        self.lines = lines
        self.port = port
        self.senders = [
            Sender(
                reactor,
                TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                fleetLines(connection, lines),
                maxLines=window,
                retries=10_000,
                initialDelay=0.05,
                maxDelay=0.5,
                finalAckTimeout=30.0,
            )
            for connection in range(connections)
        ]
        self._done: Deferred[Any] | None = None

    @property
    def total(self) -> int:
        """
        Lines the fleet sends in all.
        """
        return self.lines * len(self.senders)

    @property
    def acked(self) -> int:
        """
        Lines acked so far.
        """
        return sum(sender.result.acked for sender in self.senders)

    @property
    def resent(self) -> int:
        """
        Lines written more than once so far.
        """
        return sum(sender.result.sent for sender in self.senders) - sum(
            min(sender.result.sent, sender.window.linesRead) for sender in self.senders
        )

    def ackedKeys(self) -> set[str]:
        """
        The keys of every line acked so far (a sender's acks are cumulative,
        so its acked lines are its first ones).
        """
        return {
            lineKey(connection, number)
            for connection, sender in enumerate(self.senders)
            for number in range(sender.result.acked)
        }

    def allKeys(self) -> set[str]:
        """
        The keys of every line the fleet sends.
        """
        return {
            lineKey(connection, number)
            for connection in range(len(self.senders))
            for number in range(self.lines)
        }

    def reconnects(self) -> list[int]:
        """
        Each sender's reconnection count so far.
        """
        return [sender.result.reconnects for sender in self.senders]

    def start(self) -> None:
        """
        Start every sender.
        """
        self._done = DeferredList(
            [sender.send() for sender in self.senders], consumeErrors=True
        )

    async def finished(self, timeout: float) -> bool:
        """
        Wait for every sender to end.

        @return: Whether all ended within C{timeout} seconds with every line
            acked.
        """
        assert self._done is not None
        try:
            await until(lambda: self._done.called, timeout, "senders finished")
        except TimeoutError:
            return False
        return all(
            not sender.result.gaveUp and sender.result.acked == self.lines
            for sender in self.senders
        )

    async def disconnected(self, before: list[int], timeout: float) -> None:
        """
        Wait until every unfinished sender has noticed that its connection
        is gone (it has tried to reconnect since C{before}), so that every
        reply sent before has been read.
        """

        def noticed() -> bool:
            return all(
                sender.result.acked == self.lines or now > then
                for sender, now, then in zip(
                    self.senders, self.reconnects(), before, strict=True
                )
            )

        await until(noticed, timeout, "senders noticed the lost connections")


def storedKeys(dsn: str, schema: str = "tx_ingest") -> Counter[str]:
    """
    Count the stored jobs per line key.
    """
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT payload->>'k' FROM \"{schema}\".jobs")
            return Counter(key for (key,) in cursor.fetchall())
    finally:
        connection.close()


def tally(
    outcome: Outcome, fleet: Fleet, stored: Counter[str], acked: set[str]
) -> None:
    """
    Fill in an outcome's counts from what was acked and what is stored.
    """
    sent = fleet.allKeys()
    outcome.sent = len(sent)
    outcome.acked = len(acked)
    outcome.stored = len(sent & stored.keys())
    outcome.lost = len(acked - stored.keys())
    outcome.duplicates = sum(count - 1 for key, count in stored.items() if key in sent)
    outcome.details["resent"] = fleet.resent


def residentBytes(pid: int, field: str = "VmRSS") -> int:
    """
    A process's resident memory (C{VmRSS}) or its peak (C{VmHWM}), from
    C{/proc/PID/status}.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} for process {pid}")


def memoryBound(
    queueSize: int,
    batchSize: int,
    poolSize: int,
    maxLineBytes: int,
    maxConnections: int,
) -> int:
    """
    The README's bound on the memory a service holds for messages.
    """
    lines = queueSize + 3 * poolSize * min(batchSize, queueSize)
    return lines * (maxLineBytes + LINE_OVERHEAD) + maxConnections * (
        CONNECTION_OVERHEAD + 2 * maxLineBytes
    )


async def probe(port: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """
    Send one line on a new connection, half-close and return the replies.
    """
    client = await connect(port)
    client.send(b'{"probe":true}\n', halfClose=True)
    closed = client.closed
    closed.addTimeout(timeout, reactor)
    try:
        return await closed
    except TimeoutError:
        client.transport.abortConnection()
        return [{"error": "probe timed out"}]


def alive(service: ServiceProcess) -> bool:
    """
    Whether the service process still runs.
    """
    return service.process is not None and service.process.poll() is None


async def stopped(service: ServiceProcess, timeout: float = 30.0) -> int | None:
    """
    Stop a service with SIGTERM and wait for it; kill it if it hangs.

    @return: Its exit status, or L{None} if it had to be killed.
    """
    if not alive(service):
        return service.process.returncode if service.process else None
    service.signal(signal.SIGTERM)
    try:
        return await service.wait(timeout)
    except AssertionError:
        return None


async def _withDatabase(
    name: str, body: Callable[[Outcome, str], Awaitable[None]]
) -> Outcome:
    """
    Run C{body} with a fresh database and time it; drop the database after.
    """
    outcome = Outcome(name)
    started = time.monotonic()
    dsn = createDatabase()
    try:
        await body(outcome, dsn)
    except TimeoutError as e:
        outcome.problems.append(str(e))
    finally:
        dropDatabase(dsn)
    outcome.seconds = time.monotonic() - started
    return outcome


async def _startService(dsn: str, *options: str, port: int | None = None) -> Any:
    """
    Start C{twistd -n ingest --ack} on C{dsn} and wait until it is ready.
    """
    service = ServiceProcess(dsn, "--ack", *options, port=port)
    try:
        service.start()
        await service.waitListening()
    except BaseException:
        service.cleanup()
        raise
    return service


async def terminateMidStream(scale: Scale) -> Outcome:
    """
    Kill every backend of the service's database twice while clients
    stream: every line is stored at least once and acked, and the service
    keeps serving.
    """

    async def body(outcome: Outcome, dsn: str) -> None:
        service = await _startService(dsn)
        try:
            fleet = Fleet(service.port, scale.connections, scale.lines)
            fleet.start()
            killed = 0
            for share in (0.3, 0.6):
                await until(
                    lambda share=share: fleet.acked >= share * fleet.total,
                    scale.timeout,
                    f"{share:.0%} acked",
                )
                killed += terminateBackends(dsn)
            outcome.details["backendsKilled"] = killed
            finished = await fleet.finished(scale.timeout)
            tally(outcome, fleet, storedKeys(dsn), fleet.ackedKeys())
            outcome.check(finished, "senders did not get every line acked")
            outcome.check(killed >= 2, f"only {killed} backends terminated")
            outcome.check(outcome.stored == outcome.sent, "not every line stored")
            outcome.check(alive(service), "the service died")
            outcome.check(
                "lost PostgreSQL connection" in service.log(),
                "the service never noticed its connections die",
            )
            replies = await probe(service.port)
            outcome.check(
                replies == [{"ack": 1}], f"a new client got {replies} afterwards"
            )
        finally:
            await stopped(service)
            service.cleanup()

    return await _withDatabase("backends terminated", body)


def tracebackErrors(log: str) -> list[str]:
    """
    The exception lines of the tracebacks in a twistd log (indented by a
    tab, after the frames).
    """
    return [
        match.group(1)[:160]
        for match in re.finditer(r"^\t(\w[\w.]*(?:Error|Exception)\b.*)$", log, re.M)
    ]


def shortenAuthenticationTimeout(dsn: str, seconds: int) -> None:
    """
    Make a server drop connections that send no startup packet after
    C{seconds} instead of 60, so that such a connection cannot hold up its
    shutdown for a minute.
    """
    connection = psycopg2.connect(dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER SYSTEM SET authentication_timeout = '{seconds}s'")
            cursor.execute("SELECT pg_reload_conf()")
    finally:
        connection.close()


async def restartPostgres(scale: Scale, dedupe: bool, strict: bool = False) -> Outcome:
    """
    Restart a private PostgreSQL while clients stream: every line is acked
    and stored at least once, exactly once with C{--dedupe-field}, and the
    service keeps serving.

    @param strict: Also require that the server stops promptly (within 10
        seconds) and that the service's pool reopens every connection.
        Otherwise the server's C{authentication_timeout} is cut to 2 seconds,
        since the service's pool sometimes leaves connection attempts open
        without sending their startup packet, which holds up the server's
        shutdown until that timeout (60 seconds by default).
    """
    from tx_ingest.embedded import EmbeddedPostgres

    name = "postgres restarted" + (", dedupe" if dedupe else "")
    outcome = Outcome(name)
    started = time.monotonic()
    directory = tempfile.mkdtemp(prefix="tx_ingest-faults-pg-")
    database = EmbeddedPostgres(os.path.join(directory, "data"))
    database.startService()
    dsn = database.dsn
    assert dsn is not None
    if not strict:
        shortenAuthenticationTimeout(dsn, 2)
    options = ["--dedupe-field=k"] if dedupe else []
    service = None
    try:
        service = await _startService(dsn, *options)
        fleet = Fleet(service.port, scale.connections, scale.lines)
        fleet.start()
        await until(lambda: fleet.acked >= 0.3 * fleet.total, scale.timeout, "30%")
        ackedAtStop = fleet.acked
        stopping = time.monotonic()
        try:
            await deferToThread(database.stopService)
        except Exception as e:
            outcome.problems.append(f"stopping PostgreSQL failed: {e!r:.200}")
        outcome.details["stopSeconds"] = round(time.monotonic() - stopping, 1)
        await until(
            lambda: "lost PostgreSQL connection" in service.log(),
            scale.timeout,
            "the service noticed the restart",
        )
        await deferToThread(database.startService)
        outcome.check(database.dsn == dsn, "the restarted server has another DSN")
        finished = await fleet.finished(scale.timeout)
        tally(outcome, fleet, storedKeys(dsn), fleet.ackedKeys())
        outcome.details["ackedAtStop"] = ackedAtStop
        outcome.check(finished, "senders did not get every line acked")
        outcome.check(outcome.stored == outcome.sent, "not every line stored")
        if dedupe:
            outcome.check(outcome.duplicates == 0, "duplicates despite dedupe")
        outcome.check(alive(service), "the service died")
        replies = await probe(service.port)
        outcome.check(replies == [{"ack": 1}], f"a new client got {replies} after")
        log = service.log()
        outcome.details["tracebacks"] = log.count("Traceback")
        outcome.details["errors"] = sorted(set(tracebackErrors(log)))
        outcome.details["poolReopened"] = "connections to PostgreSQL at" in log
        if strict:
            outcome.check(
                outcome.details["stopSeconds"] < 10, "PostgreSQL was slow to stop"
            )
            outcome.check(
                outcome.details["poolReopened"], "the pool did not reopen fully"
            )
    except TimeoutError as e:
        outcome.problems.append(str(e))
    finally:
        if service is not None:
            await stopped(service)
            service.cleanup()
        try:
            database.stopService()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    outcome.seconds = time.monotonic() - started
    return outcome


async def _finishOnNewService(
    outcome: Outcome,
    fleet: Fleet,
    dsn: str,
    port: int,
    scale: Scale,
    lostBefore: int,
    started: list[ServiceProcess],
) -> None:
    """
    Start a new service on the same port, let the senders finish against
    it, and count the scenario.

    @param lostBefore: Acked lines already found missing.
    @param started: Gets the new service, for L{_cleanUp}.
    """
    started.append(await _startService(dsn, port=port))
    finished = await fleet.finished(scale.timeout)
    tally(outcome, fleet, storedKeys(dsn), fleet.ackedKeys())
    outcome.lost += lostBefore
    outcome.check(finished, "senders did not get every line acked")
    outcome.check(outcome.stored == outcome.sent, "not every line stored")


async def _cleanUp(service: ServiceProcess, started: list[ServiceProcess]) -> None:
    """
    Remove a stopped service and stop the ones started after it.
    """
    service.cleanup()
    for restarted in started:
        await stopped(restarted)
        restarted.cleanup()


async def killService(scale: Scale) -> Outcome:
    """
    SIGKILL the service while clients stream: every line acked before the
    kill is already stored; a restarted service then takes the rest.
    """

    async def body(outcome: Outcome, dsn: str) -> None:
        service = await _startService(dsn)
        restarted: list[ServiceProcess] = []
        try:
            fleet = Fleet(service.port, scale.connections, scale.lines)
            fleet.start()
            await until(lambda: fleet.acked >= 0.3 * fleet.total, scale.timeout, "30%")
            before = fleet.reconnects()
            service.signal(signal.SIGKILL)
            await service.wait()
            await fleet.disconnected(before, scale.timeout)
            ackedAtKill = fleet.ackedKeys()
            storedAtKill = storedKeys(dsn)
            lostAtKill = len(ackedAtKill - storedAtKill.keys())
            outcome.details.update(
                ackedAtKill=len(ackedAtKill),
                storedAtKill=len(storedAtKill),
                lostAtKill=lostAtKill,
            )
            outcome.check(lostAtKill == 0, f"{lostAtKill} acked lines lost at kill")
            await _finishOnNewService(
                outcome, fleet, dsn, service.port, scale, lostAtKill, restarted
            )
        finally:
            await _cleanUp(service, restarted)

    return await _withDatabase("service SIGKILLed", body)


_FLUSHED = re.compile(r"flushed (\d+) messages at shutdown")
_QUEUED = re.compile(r"writing the (\d+) accepted lines not yet written")


async def terminateService(scale: Scale, shutdownTimeout: float = 10.0) -> Outcome:
    """
    SIGTERM the service while clients stream: it exits within its shutdown
    timeout, having stored every line it accepted and acked it; a restarted
    service then takes the rest.
    """

    async def body(outcome: Outcome, dsn: str) -> None:
        service = await _startService(dsn, f"--shutdown-timeout={shutdownTimeout}")
        restarted: list[ServiceProcess] = []
        try:
            fleet = Fleet(service.port, scale.connections, scale.lines)
            fleet.start()
            await until(lambda: fleet.acked >= 0.3 * fleet.total, scale.timeout, "30%")
            before = fleet.reconnects()
            stopping = time.monotonic()
            service.signal(signal.SIGTERM)
            status = await service.wait(shutdownTimeout + 30)
            exitSeconds = time.monotonic() - stopping
            await fleet.disconnected(before, scale.timeout)
            ackedAtExit = fleet.ackedKeys()
            storedAtExit = storedKeys(dsn)
            log = service.log()
            flushed = [int(n) for n in _FLUSHED.findall(log)]
            queued = [int(n) for n in _QUEUED.findall(log)]
            lostAtExit = len(ackedAtExit - storedAtExit.keys())
            unacked = len(storedAtExit.keys() - ackedAtExit)
            outcome.details.update(
                exitStatus=status,
                exitSeconds=round(exitSeconds, 2),
                queuedAtStop=queued,
                flushed=flushed,
                ackedAtExit=len(ackedAtExit),
                storedAtExit=len(storedAtExit),
                storedUnacked=unacked,
            )
            outcome.check(
                exitSeconds <= shutdownTimeout,
                f"exit took {exitSeconds:.1f} s (timeout {shutdownTimeout} s)",
            )
            outcome.check(status in (0, 143, -signal.SIGTERM), f"exit status {status}")
            outcome.check(len(flushed) == 1, f"flushed counts logged: {flushed}")
            # The logged backlog counts batches already written but waiting
            # for an earlier one to settle, so it may exceed the flushed
            # count; what was flushed must be stored.
            outcome.check(
                len(queued) == 1 and sum(flushed) <= len(storedAtExit),
                f"flushed {flushed} (of {queued} accepted), {len(storedAtExit)} stored",
            )
            outcome.check(
                "were not written within" not in log, "accepted lines abandoned"
            )
            outcome.check(lostAtExit == 0, f"{lostAtExit} acked lines not stored")
            outcome.check(
                len(ackedAtExit) <= len(storedAtExit),
                "fewer lines stored than acked",
            )
            outcome.check(
                unacked == 0, f"{unacked} lines stored but never acked at exit"
            )
            outcome.check("Traceback" not in log, "traceback in the service log")
            await _finishOnNewService(
                outcome, fleet, dsn, service.port, scale, lostAtExit, restarted
            )
        finally:
            await _cleanUp(service, restarted)

    return await _withDatabase("service SIGTERMed", body)


async def connectionFlood(scale: Scale) -> Outcome:
    """
    Open ten times C{--max-connections} connections at once: exactly the
    cap is served, every other one is told C{too_many_connections}, and a
    new client is served once they are gone.
    """
    cap = scale.connectionCap

    async def body(outcome: Outcome, dsn: str) -> None:
        service = await _startService(dsn, f"--max-connections={cap}")
        clients: list[ReplyCollector] = []
        try:
            results = await DeferredList(
                [
                    Deferred.fromCoroutine(connect(service.port))
                    for _ in range(10 * cap)
                ],
                consumeErrors=True,
            )
            clients = [client for ok, client in results if ok]
            outcome.details["connected"] = len(clients)

            # A client past the listen backlog is only accepted (and refused)
            # once it sends something, so every client sends one line.
            for number, client in enumerate(clients):
                client.send(b'{"k":"flood-%d"}\n' % number)

            def answered(client: ReplyCollector) -> bool:
                return client.closed.called or {"ack": 1} in client.replies

            try:
                await until(
                    lambda: all(answered(client) for client in clients),
                    scale.timeout,
                    "every client answered",
                )
            except TimeoutError as e:
                outcome.problems.append(str(e))
            served = [client for client in clients if {"ack": 1} in client.replies]
            refused = [client for client in clients if client.closed.called]
            refusal = [{"error": "too_many_connections", "limit": cap}]
            outcome.details.update(served=len(served), refused=len(refused))
            outcome.sent = len(clients) + 1
            outcome.acked = len(served)
            outcome.check(len(clients) == 10 * cap, f"{len(clients)} connected")
            outcome.check(len(served) == cap, f"{len(served)} served, cap {cap}")
            outcome.check(len(refused) == len(clients) - cap, f"{len(refused)} refused")
            outcome.check(
                all(client.replies == refusal for client in refused),
                "a refused client did not get exactly the refusal",
            )
            outcome.check(
                not any(client.closed.called for client in served),
                "a served client was closed",
            )
            for client in served:
                client.transport.loseConnection()
            await until(
                lambda: all(client.closed.called for client in clients),
                scale.timeout,
                "clients closed",
            )
            replies = await probe(service.port)
            if replies == [{"ack": 1}]:
                outcome.acked += 1
            outcome.check(replies == [{"ack": 1}], f"a new client got {replies}")
            outcome.check(alive(service), "the service died")
            connection = psycopg2.connect(dsn)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM tx_ingest.jobs")
                    (count,) = cursor.fetchone()
            finally:
                connection.close()
            outcome.stored = count
            outcome.lost = max(0, outcome.acked - count)
            outcome.duplicates = max(0, count - outcome.acked)
        finally:
            for client in clients:
                if not client.closed.called:
                    client.transport.abortConnection()
            await stopped(service)
            service.cleanup()

    return await _withDatabase(f"{10 * cap} connections, cap {cap}", body)


async def lockedTable(scale: Scale) -> Outcome:
    """
    Lock the jobs table while many clients flood the service: nothing is
    lost, everything is acked once the lock goes, and the service's resident
    memory grows by no more than the README's bound.
    """
    settings = {
        "queue-size": 1024,
        "batch-size": 1000,
        "pool-size": 4,
        "max-line-bytes": 512,
        "max-connections": scale.lockClients + 5,
    }
    bound = memoryBound(
        settings["queue-size"],
        settings["batch-size"],
        settings["pool-size"],
        settings["max-line-bytes"],
        settings["max-connections"],
    )

    async def body(outcome: Outcome, dsn: str) -> None:
        service = await _startService(
            dsn, *(f"--{name}={value}" for name, value in settings.items())
        )
        assert service.process is not None
        pid = service.process.pid
        try:
            await probe(service.port)
            baseline = residentBytes(pid)
            fleet = Fleet(service.port, scale.lockClients, scale.lockLines, 1000)
            fleet.start()
            await until(lambda: fleet.acked >= 0.1 * fleet.total, scale.timeout, "10%")
            locker = psycopg2.connect(dsn)
            try:
                with locker.cursor() as cursor:
                    cursor.execute("LOCK TABLE tx_ingest.jobs IN ACCESS EXCLUSIVE MODE")
                # Acks for lines stored before the lock may still be on their
                # way during its first half; none may come in its second.
                locked = time.monotonic()
                peak = baseline
                ackedMidLock = None
                while time.monotonic() < locked + scale.lockSeconds:
                    peak = max(peak, residentBytes(pid))
                    if ackedMidLock is None and (
                        time.monotonic() > locked + scale.lockSeconds / 2
                    ):
                        ackedMidLock = fleet.acked
                    await deferLater(reactor, 0.1, lambda: None)
                ackedInLock = fleet.acked - (ackedMidLock or 0)
            finally:
                locker.rollback()
                locker.close()
            finished = await fleet.finished(scale.timeout)
            peak = max(peak, residentBytes(pid, "VmHWM"))
            tally(outcome, fleet, storedKeys(dsn), fleet.ackedKeys())
            growth = peak - baseline
            outcome.details.update(
                baselineMiB=round(baseline / 2**20, 1),
                peakMiB=round(peak / 2**20, 1),
                growthMiB=round(growth / 2**20, 1),
                boundMiB=round(bound / 2**20, 1),
                ackedInLockSecondHalf=ackedInLock,
            )
            outcome.check(finished, "senders did not get every line acked")
            outcome.check(outcome.stored == outcome.sent, "not every line stored")
            outcome.check(
                ackedInLock == 0,
                f"{ackedInLock} lines acked while the table was locked",
            )
            outcome.check(
                growth <= bound,
                f"RSS grew {growth / 2**20:.1f} MiB, over the README's bound of "
                f"{bound / 2**20:.1f} MiB",
            )
            outcome.check(alive(service), "the service died")
        finally:
            await stopped(service)
            service.cleanup()

    return await _withDatabase(
        f"table locked {scale.lockSeconds:g}s, {scale.lockClients} clients", body
    )


def workerAvailable() -> str | None:
    """
    @return: Why the worker scenario cannot run, or L{None} if it can.
    """
    try:
        import tx_ingest.worker  # noqa: F401
    except ImportError as e:
        return f"no tx_ingest.worker ({e})"
    return None


async def killWorker(scale: Scale) -> Outcome:
    """
    SIGKILL one of three C{--no-ingest} worker processes while they drain
    jobs: the others take its jobs back, every job ends C{done}, none is
    lost and none is left running.

    In its row, C{sent} counts the jobs enqueued, C{acked} those done,
    C{stored} the rows left, C{lost} the jobs not done at the end and
    C{duplicates} the jobs that were run more than once.
    """
    jobs = scale.workerJobs

    async def body(outcome: Outcome, dsn: str) -> None:
        workers: list[ServiceProcess] = []

        def count(sql: str) -> int:
            connection = psycopg2.connect(dsn)
            try:
                with connection, connection.cursor() as cursor:
                    cursor.execute(sql)
                    return int(cursor.fetchone()[0])
            finally:
                connection.close()

        try:
            for number in range(3):
                worker = ServiceProcess(
                    dsn,
                    "--no-ingest",
                    "--tasks=tests.tasksample",
                    f"--worker-name=w{number}",
                    "--poll-interval=0.2",
                    "--orphan-after=1",
                    "--concurrency=20",
                    listen=False,
                )
                workers.append(worker)
                worker.start()
                await worker.waitListening()
                await until(
                    lambda w=worker: "worker w" in w.log(), scale.timeout, "worker up"
                )
            connection = psycopg2.connect(dsn)
            try:
                with connection, connection.cursor() as cursor:
                    cursor.execute(
                        "INSERT INTO tx_ingest.jobs (job_type, payload)"
                        " SELECT 'slow', jsonb_build_object('n', g)"
                        " FROM generate_series(1, %s) g; NOTIFY tx_ingest_jobs",
                        (jobs,),
                    )
            finally:
                connection.close()
            doneByFirst = "SELECT count(*) FROM tx_ingest.jobs" + (
                " WHERE status = 'done' AND locked_by = 'w0'"
            )
            await until(
                lambda: count(doneByFirst) >= jobs // 20, scale.timeout, "w0 busy"
            )
            workers[0].signal(signal.SIGKILL)
            await workers[0].wait()
            outcome.details["runningAtKill"] = count(
                "SELECT count(*) FROM tx_ingest.jobs WHERE status = 'running'"
                " AND locked_by = 'w0'"
            )
            done = "SELECT count(*) FROM tx_ingest.jobs WHERE status = 'done'"
            try:
                await until(lambda: count(done) >= jobs, scale.timeout, "all done")
            except TimeoutError as e:
                outcome.problems.append(str(e))
            outcome.sent = jobs
            outcome.acked = count(done)
            outcome.stored = count("SELECT count(*) FROM tx_ingest.jobs")
            outcome.lost = jobs - outcome.acked
            outcome.duplicates = count(
                "SELECT count(*) FROM tx_ingest.jobs WHERE attempts > 1"
            )
            leftRunning = count(
                "SELECT count(*) FROM tx_ingest.jobs WHERE status = 'running'"
            )
            outcome.details["leftRunning"] = leftRunning
            outcome.check(outcome.lost == 0, f"{outcome.lost} jobs not done")
            outcome.check(leftRunning == 0, f"{leftRunning} jobs left running")
            outcome.check(
                outcome.duplicates <= 20,
                f"{outcome.duplicates} jobs rerun (w0 ran at most 20 at once)",
            )
            outcome.check(
                "took back" in workers[1].log() + workers[2].log(),
                "no worker said it took jobs back",
            )
        finally:
            for worker in workers:
                await stopped(worker)
                worker.cleanup()

    return await _withDatabase("worker SIGKILLed mid-drain", body)


SCENARIOS: dict[str, Callable[[Scale], Awaitable[Outcome]]] = {
    "restart-dedupe": lambda scale: restartPostgres(scale, True),
    "restart": lambda scale: restartPostgres(scale, False),
    "terminate": terminateMidStream,
    "lock": lockedTable,
    "kill": killService,
    "term": terminateService,
    "flood": connectionFlood,
}
if workerAvailable() is None:
    SCENARIOS["worker-kill"] = killWorker
