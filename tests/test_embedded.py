# -*- test-case-name: tests.test_embedded -*-
"""
Tests for L{tx_ingest.embedded}, against real embedded servers in temporary
directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tx_ingest.embedded import (
    EmbeddedPostgres,
    EmbeddedUnavailable,
    isLivePostgres,
    libpqQuote,
    readLockPid,
    requireEmbedded,
)

try:
    requireEmbedded()
except EmbeddedUnavailable as e:
    skipReason: str | None = str(e)
else:
    skipReason = None


def failingImport(name: str) -> ModuleType:
    """
    Stand in for L{importlib.import_module} on a machine without C{pgserver}.

    @param name: The module name.
    @raise ModuleNotFoundError: Always.
    """
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def waitUntilDead(pid: int, timeout: float = 10.0) -> None:
    """
    Wait until C{pid} is no longer a live PostgreSQL process.

    @param pid: A process id.
    @param timeout: Seconds to wait before giving up.
    @raise AssertionError: If it is still live after C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while isLivePostgres(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still running")
        time.sleep(0.05)


def selectOne(dsn: str) -> int:
    """
    Connect with psycopg2 and run a query.

    @param dsn: A libpq connection string.
    @return: The result of C{SELECT 1 + 1}.
    """
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 + 1")
            row = cursor.fetchone()
            assert row is not None
            return int(row[0])
    finally:
        connection.close()


class EmbeddedPostgresTests(SynchronousTestCase):
    """
    Tests for L{EmbeddedPostgres} with a real C{pgserver}.
    """

    skip = skipReason

    def setUp(self) -> None:
        """
        Make a short temporary parent directory (Unix socket paths are short).
        """
        self.parent = Path(tempfile.mkdtemp(prefix="txi-"))
        self.addCleanup(shutil.rmtree, self.parent, ignore_errors=True)
        self.dataDir = self.parent / "data"

    def startedServer(self) -> EmbeddedPostgres:
        """
        Start a server in C{self.dataDir}, stopped again at cleanup.

        @return: The running service.
        """
        service = EmbeddedPostgres(str(self.dataDir))
        self.addCleanup(service.stopService)
        service.startService()
        return service

    def postmasterPid(self) -> int:
        """
        @return: The pid in the data directory's C{postmaster.pid}.
        """
        pid = readLockPid(self.dataDir / "postmaster.pid")
        assert pid is not None
        return pid

    def test_startQueryStop(self) -> None:
        """
        A started server answers queries on L{EmbeddedPostgres.dsn}; once
        stopped, its postmaster has exited and its lock file is gone.
        """
        service = self.startedServer()
        self.assertTrue(service.running)
        assert service.dsn is not None
        self.assertIn("user=postgres dbname=postgres", service.dsn)
        self.assertEqual(selectOne(service.dsn), 2)
        pid = self.postmasterPid()

        service.stopService()

        self.assertFalse(service.running)
        self.assertIsNone(service.dsn)
        self.assertFalse(isLivePostgres(pid))
        self.assertFalse((self.dataDir / "postmaster.pid").exists())

    def test_restartInSameProcess(self) -> None:
        """
        The same service can be started again after a stop, with a new
        postmaster.
        """
        service = self.startedServer()
        firstPid = self.postmasterPid()
        service.stopService()

        service.startService()

        assert service.dsn is not None
        self.assertEqual(selectOne(service.dsn), 2)
        self.assertNotEqual(self.postmasterPid(), firstPid)

    def test_startAfterKilledPostmaster(self) -> None:
        """
        After the postmaster was killed with C{SIGKILL} (it may linger as a
        zombie, its lock files left behind), a new service starts a fresh
        server in the same directory, and stopping the old one does no harm.
        """
        first = self.startedServer()
        killed = self.postmasterPid()
        os.kill(killed, signal.SIGKILL)
        waitUntilDead(killed)

        second = self.startedServer()

        assert second.dsn is not None
        self.assertEqual(selectOne(second.dsn), 2)
        self.assertNotEqual(self.postmasterPid(), killed)
        first.stopService()
        self.assertEqual(selectOne(second.dsn), 2)

    def test_startOverZombieLocks(self) -> None:
        """
        Lock files naming a zombie process, and a C{.handle_pids.json} naming
        an exited process, are recognised as stale: the server starts and the
        dead handle is dropped.
        """
        service = self.startedServer()
        socketLocks = list(Path(self.socketDir(service)).glob(".s.PGSQL.*.lock"))
        self.assertEqual(len(socketLocks), 1)
        pidFileText = (self.dataDir / "postmaster.pid").read_text()
        service.stopService()

        # A child that exits and is not waited for stays a zombie.
        zombie = subprocess.Popen(["true"])
        self.addCleanup(zombie.wait)
        exited = subprocess.Popen(["true"])
        exited.wait()
        waitUntilDead(zombie.pid)
        staleText = pidFileText.replace(pidFileText.split("\n", 1)[0], str(zombie.pid))
        (self.dataDir / "postmaster.pid").write_text(staleText)
        socketLocks[0].write_text(staleText)
        handles = self.dataDir / ".handle_pids.json"
        handles.write_text(json.dumps([exited.pid]))

        service.startService()

        assert service.dsn is not None
        self.assertEqual(selectOne(service.dsn), 2)
        self.assertNotEqual(self.postmasterPid(), zombie.pid)
        self.assertNotIn(exited.pid, json.loads(handles.read_text()))

    def test_liveLockKept(self) -> None:
        """
        L{EmbeddedPostgres.clearStaleLocks} leaves the lock files of a live
        postmaster alone, and a second service on the same directory joins
        the running server.
        """
        service = self.startedServer()
        pid = self.postmasterPid()
        other = EmbeddedPostgres(str(self.dataDir))

        other.clearStaleLocks()

        self.assertEqual(self.postmasterPid(), pid)
        assert service.dsn is not None
        self.assertEqual(selectOne(service.dsn), 2)

    def test_stopAfterKilledPostmaster(self) -> None:
        """
        Stopping a service whose postmaster was killed does not fail, and
        clears the stale lock file.
        """
        service = self.startedServer()
        pid = self.postmasterPid()
        os.kill(pid, signal.SIGKILL)
        waitUntilDead(pid)

        service.stopService()

        self.assertFalse((self.dataDir / "postmaster.pid").exists())

    def socketDir(self, service: EmbeddedPostgres) -> str:
        """
        @param service: A running service.
        @return: The socket directory named by its DSN.
        """
        assert service.dsn is not None
        host = service.dsn.split("host=", 1)[1].split(" port=", 1)[0]
        return host.strip("'")


class UnavailableTests(SynchronousTestCase):
    """
    Tests for the error given when C{pgserver} cannot be imported.
    """

    def assertHelpful(self, error: EmbeddedUnavailable) -> None:
        """
        Assert that C{error} is one line telling what to install or set.

        @param error: The raised exception.
        """
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn("pip install 'tx_ingest[embedded]'", message)
        self.assertIn("3.12", message)
        self.assertIn("--dsn", message)
        self.assertIn("DATABASE_URL", message)

    def test_requireEmbedded(self) -> None:
        """
        L{requireEmbedded} raises L{EmbeddedUnavailable} when the import fails.
        """
        error = self.assertRaises(
            EmbeddedUnavailable, requireEmbedded, importModule=failingImport
        )
        self.assertHelpful(error)

    def test_construction(self) -> None:
        """
        L{EmbeddedPostgres} refuses to be built without C{pgserver}, before
        anything is started.
        """
        dataDir = self.mktemp()
        error = self.assertRaises(
            EmbeddedUnavailable, EmbeddedPostgres, dataDir, importModule=failingImport
        )
        self.assertHelpful(error)
        self.assertFalse(os.path.exists(dataDir))


class LibpqQuoteTests(SynchronousTestCase):
    """
    Tests for L{libpqQuote}.
    """

    def test_quotes(self) -> None:
        """
        Spaces, quotes and backslashes survive as one libpq value.
        """
        value = "/tmp/a b/it's\\x"
        quoted = libpqQuote(value)
        self.assertEqual(quoted, "'/tmp/a b/it\\'s\\\\x'")
        self.assertEqual(psycopg2.extensions.parse_dsn(f"host={quoted}")["host"], value)
