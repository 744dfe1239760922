"""
The processes of a benchmark run: C{twistd -n ingest} services and workers,
client processes (L{benchmarks.clients}) and the memory of a process as
C{/proc} reports it.

Everything here blocks: the orchestrator is a plain script that starts
processes, waits for them and reads their results, so that none of its own
work competes with the measured processes for the event loop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any

from benchmarks.database import SCHEMA
from tests.servicerun import freePort, readLog, twistdCommand

#: The directory holding the C{benchmarks} package, put on the C{PYTHONPATH}
#: of every child so that C{--tasks benchmarks.nooptasks} imports.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def childEnvironment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment of a child process: ours, with the project on the path.

    @param extra: More variables.
    @return: The environment.
    """
    environment = dict(os.environ)
    path = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = PROJECT_ROOT + (os.pathsep + path if path else "")
    environment.pop("DATABASE_URL", None)
    environment.update(extra or {})
    return environment


class Twistd:
    """
    One C{twistd -n ingest} process (a service, a worker, or both), logging
    to a file in a directory of its own.

    @ivar port: Its TCP port on 127.0.0.1 (unused by a worker).
    @ivar logPath: Where its log goes.
    @ivar process: The process, once started.
    """

    def __init__(
        self,
        dsn: str,
        *options: str,
        listen: bool = True,
        environment: dict[str, str] | None = None,
    ) -> None:
        """
        @param dsn: The database.
        @param options: More options of C{twistd ingest}.
        @param listen: Whether to pass a C{--listen} endpoint.
        @param environment: More environment variables.
        """
        self.port = freePort()
        self.directory = tempfile.mkdtemp(prefix="tx_ingest-bench-")
        self.logPath = os.path.join(self.directory, "twistd.log")
        listenOption = (
            [f"--listen=tcp:{self.port}:interface=127.0.0.1"] if listen else []
        )
        self.argv = [
            *twistdCommand(),
            "-n",
            "--pidfile=",
            f"--logfile={self.logPath}",
            "ingest",
            *listenOption,
            f"--dsn={dsn}",
            f"--schema={SCHEMA}",
            *options,
        ]
        self._environment = childEnvironment(environment)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """
        @return: The process id.
        """
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """
        Start the process.
        """
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.directory,
            env=self._environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """
        @return: Everything logged so far.
        """
        return readLog(self.logPath)

    def waitFor(self, text: str, timeout: float = 30.0) -> None:
        """
        Wait until the log says C{text}.

        @raise RuntimeError: If the process exits or the text does not appear
            in time.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited early:\n{self.log()[-3000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"twistd never logged {text!r}:\n{self.log()[-3000:]}")

    def waitReady(self, timeout: float = 30.0) -> None:
        """
        Wait until the job store is connected and migrated.
        """
        self.waitFor("job store ready", timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """
        Stop with SIGTERM (SIGKILL after C{timeout}), and remove the directory.

        @return: The exit status, or L{None} if it was never started.
        """
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            return self.process.returncode
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class Client:
    """
    One client process: C{python -m benchmarks.clients KIND JSON}.

    The child prepares (imports, generates its lines, connects if it wants),
    prints C{ready}, waits for C{go} on its standard input, does its work and
    prints one JSON object as its last line.  L{start} returns once the child
    is ready, so that several clients can be released at once with L{go}.
    """

    def __init__(self, kind: str, arguments: dict[str, Any]) -> None:
        """
        @param kind: A client of L{benchmarks.clients}.
        @param arguments: Its arguments.
        """
        self.kind = kind
        self.arguments = arguments
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """
        @return: The process id.
        """
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> None:
        """
        Start the child and wait until it says it is ready.

        @raise RuntimeError: If it exits first.
        """
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.clients",
                self.kind,
                json.dumps(self.arguments),
            ],
            cwd=PROJECT_ROOT,
            env=childEnvironment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        line = self._stdout().readline()
        if line.strip() != b"ready":
            self.process.wait(timeout)
            raise RuntimeError(f"client {self.kind} failed to start: {line!r}")

    def _stdout(self) -> IO[bytes]:
        assert self.process is not None and self.process.stdout is not None
        return self.process.stdout

    def go(self) -> None:
        """
        Release the child.
        """
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def result(self, timeout: float = 600.0) -> dict[str, Any]:
        """
        Wait for the child to finish.

        @return: The JSON object it printed last.
        @raise RuntimeError: If it failed.
        """
        assert self.process is not None
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise RuntimeError(f"client {self.kind} timed out")
        lines = output.strip().splitlines()
        if self.process.returncode != 0 or not lines:
            raise RuntimeError(
                f"client {self.kind} exited with {self.process.returncode}:"
                f" {output[-2000:]!r}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        """
        Kill the child if it still runs.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def runClients(
    clients: Sequence[Client], timeout: float = 600.0
) -> list[dict[str, Any]]:
    """
    Start every client, release them together and collect their results.

    @return: Their results, in order.
    """
    try:
        for client in clients:
            client.start()
        for client in clients:
            client.go()
        return [client.result(timeout) for client in clients]
    finally:
        for client in clients:
            client.kill()


def memoryOf(pid: int) -> dict[str, int]:
    """
    Read a process's resident memory from C{/proc}.

    @param pid: The process.
    @return: C{VmRSS} and C{VmHWM} (the peak resident size so far), in bytes.
    """
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found


def stopClient(client: Client, timeout: float = 30.0) -> dict[str, Any]:
    """
    Ask a long-running client (a worker) to stop with SIGTERM and collect
    its result.

    @return: The JSON object it printed last.
    """
    assert client.process is not None
    client.process.send_signal(signal.SIGTERM)
    try:
        return client.result(timeout)
    finally:
        client.kill()


def _machineTicks() -> tuple[int, int]:
    """
    @return: Busy and total CPU ticks of the machine since boot.
    """
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _processTicks(pid: int) -> int:
    """
    @return: User and system CPU ticks used by a process so far (0 if gone).
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """
    How busy the machine's CPUs and some processes were over an interval:
    what bounds a measurement on a small machine.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        """
        @param pids: Processes to measure, by a label.
        """
        self.pids = pids
        self._hz = os.sysconf("SC_CLK_TCK")
        self._cores = os.cpu_count() or 1
        self._machine = _machineTicks()
        self._processes = {label: _processTicks(pid) for label, pid in pids.items()}
        self._started = time.monotonic()

    def read(self) -> dict[str, float]:
        """
        @return: C{machine}: the fraction of all cores busy; for each label,
            the fraction of one core its process used.
        """
        seconds = max(time.monotonic() - self._started, 1e-6)
        busy, total = _machineTicks()
        usage = {
            "machine": (busy - self._machine[0]) / max(total - self._machine[1], 1)
        }
        for label, pid in self.pids.items():
            used = (_processTicks(pid) - self._processes[label]) / self._hz
            usage[label] = used / seconds
        return usage
