"""
What the benchmarks ran on, for the report.
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata

from benchmarks.database import serverVersion


def cpuModel() -> str:
    """
    @return: The CPU's model name from C{/proc/cpuinfo}.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memoryBytes() -> int:
    """
    @return: The machine's RAM, from C{/proc/meminfo}.
    """
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict[str, str]:
    """
    @return: The machine and software the benchmarks ran on.
    """
    return {
        "cpu": cpuModel(),
        "cores": str(os.cpu_count()),
        "ram": f"{memoryBytes() / 2**30:.1f} GiB",
        "postgresql": serverVersion(),
        "python": platform.python_version(),
        "twisted": _version("twisted"),
        "pgqueuer": _version("pgqueuer"),
        "asyncpg": _version("asyncpg"),
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
    }
