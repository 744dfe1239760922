# -*- test-case-name: tests.test_embedded -*-
"""
An embedded PostgreSQL server, for when the operator names no database.

When neither C{--dsn} nor C{DATABASE_URL} is given, the service runs its own
PostgreSQL from the optional C{pgserver} package (the C{tx_ingest[embedded]}
extra; wheels exist for CPython 3.12 and older only) in a data directory of its
own, listening on a Unix socket only (this module supports POSIX systems).

C{pgserver} stops its servers from C{atexit}, which C{twistd} never reaches
(it exits from its signal handler), and after an unclean exit it leaves lock
files that both it and PostgreSQL take for a live server when the old
postmaster lingers as a zombie. L{EmbeddedPostgres} therefore stops the server
itself with the bundled C{pg_ctl stop -m fast}, and recognises and clears
stale lock files before starting.
"""

from __future__ import annotations

import atexit
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()

ImportModule = Callable[[str], ModuleType]

#: How long to wait for processes of a dead postmaster to exit, in seconds.
ORPHAN_WAIT = 10.0

#: How long C{pg_ctl stop} may take before it is given up on, in seconds.
STOP_TIMEOUT = 60.0


class EmbeddedUnavailable(Exception):
    """
    The embedded PostgreSQL was wanted but C{pgserver} cannot be imported.
    """


def requireEmbedded(importModule: ImportModule = importlib.import_module) -> Any:
    """
    Import C{pgserver}, or explain in one line what the operator can do.

    @param importModule: The function used to import a module by name.
    @return: The C{pgserver} module.
    @raise EmbeddedUnavailable: If C{pgserver} or one of its own dependencies
        cannot be imported.
    """
    try:
        return importModule("pgserver")
    except ImportError as e:
        raise EmbeddedUnavailable(
            "embedded PostgreSQL needs pgserver: pip install 'tx_ingest[embedded]'"
            " (CPython <= 3.12 only), or give --dsn or set DATABASE_URL"
            f" (import failed: {e})"
        ) from e


def libpqQuote(value: str) -> str:
    """
    Quote a value for a libpq C{key=value} connection string.

    @param value: Any string.
    @return: C{value} in single quotes, with quotes and backslashes escaped.
    """
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def readLockPid(lockFile: Path) -> int | None:
    """
    Read the process id on the first line of a PostgreSQL lock file.

    @param lockFile: A C{postmaster.pid} or C{.s.PGSQL.<port>.lock} file.
    @return: The pid, or L{None} if the file is missing, empty or garbled.
    """
    try:
        firstLine = lockFile.read_text().split("\n", 1)[0]
        return int(firstLine.strip())
    except (OSError, ValueError):
        return None


def isLivePostgres(pid: int) -> bool:
    """
    Tell whether C{pid} is a running (not zombie) PostgreSQL process.

    A zombie postmaster, a vanished one, and a pid now reused by a program
    that is not C{postgres} all count as dead, since none of them can hold the
    data directory. A process this user may not inspect counts as live, so
    that a doubt never removes a lock.

    @param pid: A process id read from a lock file.
    @return: C{True} if the lock naming C{pid} must be respected.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return bool(process.name() == "postgres")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def serverProcessesIn(dataDir: Path) -> list[int]:
    """
    Find live PostgreSQL processes working in C{dataDir}.

    A postmaster killed with C{SIGKILL} leaves its children running for a
    moment, still attached to the shared memory block that a new postmaster
    refuses to share; each of them has the data directory as its working
    directory.

    @param dataDir: An absolute, resolved data directory.
    @return: The pids of such processes.
    """
    import psutil

    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "postgres":
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if Path(process.cwd()) == dataDir:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


class EmbeddedPostgres(Service):
    """
    A PostgreSQL server run from C{pgserver} for the lifetime of the service.

    L{startService} and L{stopService} block (well under a second each) and may
    be called directly, outside any application, for example by a test fixture.

    When run as root, C{pgserver} creates a C{pgserver} system user to run
    PostgreSQL and adds group and other read and traverse permissions to every
    parent directory of the data directory.

    @ivar dataDir: The data directory, created (with its parents) if missing.
    @ivar dsn: A libpq connection string for the running server (Unix socket,
        user and database C{postgres}), or L{None} while it is not running.
    """

    def __init__(
        self, dataDir: str, importModule: ImportModule = importlib.import_module
    ) -> None:
        """
        @param dataDir: The PostgreSQL data directory.
        @param importModule: The function used to import C{pgserver}.
        @raise EmbeddedUnavailable: If C{pgserver} cannot be imported.
        """
        self._pgserver = requireEmbedded(importModule)
        self.dataDir = Path(dataDir).expanduser().resolve()
        self.dsn: str | None = None
        self._server: Any = None
        self._pid: int | None = None

    def startService(self) -> None:
        """
        Clear stale lock files, then start (or join) the server and set
        L{dsn}.
        """
        self.dataDir.mkdir(parents=True, exist_ok=True)
        self.clearStaleLocks()

        # Not get_server(): it keeps one handle per directory per process and
        # hands it back even after that handle's postmaster has died.
        self._server = self._pgserver.PostgresServer(self.dataDir, cleanup_mode=None)
        info = self._server.get_postmaster_info()
        if not isLivePostgres(info.pid):
            raise RuntimeError(
                f"pgserver reports postmaster {info.pid} for {self.dataDir},"
                " but it is not running"
            )

        self._pid = info.pid
        self.dsn = (
            f"host={libpqQuote(str(info.socket_dir))} port={info.port}"
            " user=postgres dbname=postgres"
        )
        atexit.register(self._stopAtExit)
        Service.startService(self)
        _log.info(
            "embedded PostgreSQL running in {dataDir} (pid {pid}, socket {socket})",
            dataDir=str(self.dataDir),
            pid=info.pid,
            socket=str(info.socket_dir),
        )

    def stopService(self) -> None:
        """
        Stop the server with C{pg_ctl stop -m fast}, unless the postmaster
        that L{startService} found has already gone (a server started since by
        someone else is left running), and release C{pgserver}'s handle.
        """
        Service.stopService(self)
        server, self._server = self._server, None
        if server is None:
            return
        atexit.unregister(self._stopAtExit)
        self.dsn = None

        pid = readLockPid(self.dataDir / "postmaster.pid")
        if pid is not None and pid == self._pid and isLivePostgres(pid):
            self._pgserver.pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=self.dataDir,
                user=server.system_user,
                timeout=STOP_TIMEOUT,
            )
            _log.info(
                "embedded PostgreSQL in {dataDir} stopped", dataDir=str(self.dataDir)
            )
        else:
            _log.warn(
                "embedded PostgreSQL {pid} in {dataDir} was no longer running",
                pid=self._pid,
                dataDir=str(self.dataDir),
            )
            self.clearStaleLocks()
        self._pid = None

        # With cleanup_mode=None this only drops our pid from .handle_pids.json
        # and the handle from pgserver's per-process cache.
        server.cleanup()

    def _stopAtExit(self) -> None:
        """
        Stop the server when the process exits without L{stopService} (a test
        run that forgot to stop it); C{twistd} never gets here.
        """
        if self._server is not None:
            self.stopService()

    def clearStaleLocks(self) -> None:
        """
        Remove the lock files of a postmaster that is gone or a zombie, wait
        for its last children to exit, and drop dead pids from C{pgserver}'s
        C{.handle_pids.json}.

        A lock naming a live postmaster is left alone: C{pgserver} then joins
        that server instead of starting another.

        @raise RuntimeError: If processes of a dead server still run in the
            data directory after L{ORPHAN_WAIT} seconds.
        """
        pidFile = self.dataDir / "postmaster.pid"
        pid = readLockPid(pidFile)
        if pid is not None and isLivePostgres(pid):
            return

        # Children of a killed postmaster (or a postmaster still writing its
        # lock file) run in the data directory: let them finish first.
        self._waitForOrphans()

        socketDirs = {self.dataDir}
        if pidFile.exists():
            # The fifth line names the socket directory, which pgserver moves
            # elsewhere when the data directory's path is too long for a socket.
            lines = pidFile.read_text().splitlines()
            if len(lines) > 4 and lines[4].strip():
                socketDirs.add(Path(lines[4].strip()))
            _log.warn(
                "removing stale lock {pidFile} of dead postmaster {pid}",
                pidFile=str(pidFile),
                pid=pid,
            )
            pidFile.unlink(missing_ok=True)

        for socketDir in socketDirs:
            for socketLock in socketDir.glob(".s.PGSQL.*.lock"):
                lockPid = readLockPid(socketLock)
                if lockPid is None or not isLivePostgres(lockPid):
                    _log.warn("removing stale lock {lock}", lock=str(socketLock))
                    socketLock.unlink(missing_ok=True)

        self._pruneHandlePids()

    def _waitForOrphans(self) -> None:
        """
        Wait until no process of an earlier server runs in the data directory.

        @raise RuntimeError: If some still run after L{ORPHAN_WAIT} seconds.
        """
        deadline = time.monotonic() + ORPHAN_WAIT
        orphans = serverProcessesIn(self.dataDir)
        while orphans:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL processes {orphans} still run in {self.dataDir}"
                    " with no postmaster lock file; stop them first"
                )
            time.sleep(0.05)
            orphans = serverProcessesIn(self.dataDir)

    def _pruneHandlePids(self) -> None:
        """
        Drop the pids of exited processes from C{pgserver}'s list of handles,
        so that its bookkeeping after an unclean exit does not count them.
        """
        import psutil

        handleFile = self.dataDir / ".handle_pids.json"
        try:
            pids = json.loads(handleFile.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            pids = None
        if not isinstance(pids, list):
            pids = []

        def alive(pid: object) -> bool:
            if not isinstance(pid, int):
                return False
            try:
                return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
            except psutil.Error:
                return False

        kept = [pid for pid in pids if alive(pid)]
        if kept != pids:
            _log.info(
                "dropping stale pgserver handles {stale}",
                stale=[pid for pid in pids if pid not in kept],
            )
            handleFile.write_text(json.dumps(kept))


__all__ = [
    "EmbeddedPostgres",
    "EmbeddedUnavailable",
    "libpqQuote",
    "requireEmbedded",
]
