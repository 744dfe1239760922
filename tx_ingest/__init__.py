# -*- test-case-name: tests -*-
"""
tx_ingest: newline-delimited JSON over TCP into a durable PostgreSQL job queue.

The pipeline reads in the order of its modules: L{tx_ingest.protocol} frames
and validates lines, L{tx_ingest.queue} holds them under a hard global cap and
decides backpressure, L{tx_ingest.sink} writes them in batches through
L{tx_ingest.store}, and L{tx_ingest.worker} claims and runs the stored jobs.
"""

from tx_ingest.tasks import JobContext, task

__all__ = ["JobContext", "task"]
