# -*- test-case-name: tests.test_store,tests.test_pool -*-
"""
The PostgreSQL store: connections (L{pool}), schema (L{schema}) and the SQL
that writes jobs (L{jobs}).
"""

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
