# -*- test-case-name: tests.test_store,tests.test_pool -*-
"""
The PostgreSQL store: connections (L{pool}), schema (L{schema}), the SQL
that writes jobs (L{jobs}) and the worker's SQL (L{claims}).
"""

from tx_ingest.store.claims import (
    AttemptLimits,
    ClaimedJob,
    ClaimStore,
    JobListener,
    Outcome,
)
from tx_ingest.store.dsn import dsnFromEnvironment, redactDsn, withDatabase
from tx_ingest.store.jobs import JobStore, NewJob
from tx_ingest.store.pool import (
    HealingPool,
    PoolClosed,
    fastReconnectionDelays,
    isConnectionFailure,
)
from tx_ingest.store.schema import MIGRATIONS, Migration, migrate, notifyChannel

__all__ = [
    "MIGRATIONS",
    "AttemptLimits",
    "ClaimStore",
    "ClaimedJob",
    "JobListener",
    "Outcome",
    "HealingPool",
    "JobStore",
    "Migration",
    "NewJob",
    "PoolClosed",
    "dsnFromEnvironment",
    "fastReconnectionDelays",
    "isConnectionFailure",
    "migrate",
    "notifyChannel",
    "redactDsn",
    "withDatabase",
]
