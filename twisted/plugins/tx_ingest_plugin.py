"""
The twistd dropin for C{twistd ingest}; everything lives in L{tx_ingest.tap}.
"""

from twisted.application.service import ServiceMaker

ingest = ServiceMaker(
    "tx_ingest",
    "tx_ingest.tap",
    "Accept NDJSON over TCP and store each line as a PostgreSQL job.",
    "ingest",
)
