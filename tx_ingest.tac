"""
A twistd application file for tx_ingest, configured by environment variables.

Run it with::

    TX_INGEST_LISTEN=tcp:5000:interface=127.0.0.1 \\
    DATABASE_URL=postgresql://127.0.0.1/test TX_INGEST_ACK=1 \\
    twistd -ny tx_ingest.tac

Each option of C{twistd ingest --help} has a variable: C{TX_INGEST_} and the
option's name in upper case, C{-} written C{_} (C{TX_INGEST_QUEUE_SIZE=2048});
C{DATABASE_URL} or C{TX_INGEST_DSN} names the database.
"""

import os

from twisted.application import service

from tx_ingest.tap import makeService, optionsFromEnvironment

application = service.Application("tx_ingest")
makeService(optionsFromEnvironment(os.environ)).setServiceParent(application)
