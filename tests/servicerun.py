"""
Running C{twistd -n ingest} as a real subprocess, for tests and the fault
suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater


def freePort() -> int:
    """
    @return: A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def readLog(path: str) -> str:
    """
    @return: What a process has logged to C{path} so far (nothing if the
        file does not exist yet).
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def twistdCommand() -> list[str]:
    """
    @return: The command that runs this environment's C{twistd}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    found = shutil.which("twistd")
    if found is None:
        raise RuntimeError("twistd is not installed")
    return [found]


class ServiceProcess:
    """
    One C{twistd -n ingest} process, logging to a file.

    @ivar port: Its TCP port on 127.0.0.1.
    @ivar logPath: Where its log goes.
    """

    def __init__(
        self, dsn: str, *options: str, port: int | None = None, listen: bool = True
    ) -> None:
        """
        @param dsn: The database.
        @param options: More options of C{twistd ingest}.
        @param port: The port to listen on (a free one by default).
        @param listen: Whether to pass C{--listen} (not with C{--no-ingest}).
        """
        self.port = port or freePort()
        self.directory = tempfile.mkdtemp(prefix="tx_ingest-twistd-")
        self.logPath = os.path.join(self.directory, "twistd.log")
        self.argv = [
            *twistdCommand(),
            "-n",
            "--pidfile=",
            f"--logfile={self.logPath}",
            "ingest",
            *([f"--listen=tcp:{self.port}:interface=127.0.0.1"] if listen else []),
            f"--dsn={dsn}",
            *options,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, environment: dict[str, str] | None = None) -> None:
        """
        Start the process (from a directory of its own).

        @param environment: Its environment, if not this process's.
        """
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.directory,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    async def waitListening(self, timeout: float = 30.0) -> None:
        """
        Wait until the port accepts connections and the store is ready.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{self.log()}")
            if "job store ready" in self.log():
                return
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"twistd did not get ready:\n{self.log()}")

    def log(self) -> str:
        """
        @return: Everything logged so far.
        """
        return readLog(self.logPath)

    def signal(self, number: int = signal.SIGTERM) -> None:
        """
        Send a signal.
        """
        assert self.process is not None
        self.process.send_signal(number)

    async def wait(self, timeout: float = 60.0) -> int:
        """
        Wait for the process to exit.

        @return: Its exit status.
        """
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError("twistd did not exit in time")
            await deferLater(reactor, 0.05, lambda: None)
        return self.process.returncode

    def cleanup(self) -> None:
        """
        Kill the process if it still runs and remove its directory.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
