"""
An example tasks module: C{twistd -n ingest --tasks examples.signup
--type-field type}, run from the repository's top directory.
"""

from __future__ import annotations

from typing import Any

from tx_ingest import JobContext, task


@task("signup", maxAttempts=3, timeout=30)
def sendWelcome(payload: Any, job: JobContext) -> None:
    """
    A plain function: runs in the worker's thread pool.  Addresses at
    C{example.invalid} fail, to show retries.
    """
    if payload["email"].endswith("@example.invalid"):
        raise ValueError(f"cannot deliver to {payload['email']}")


@task("resize")
async def resize(payload: Any, job: JobContext) -> None:
    """
    An C{async def} handler: runs on the reactor and must not block.
    """
    if payload.get("width", 0) <= 0:
        raise ValueError("width must be positive")
