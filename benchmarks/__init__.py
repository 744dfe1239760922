"""
The benchmark suite of tx_ingest: C{python -m benchmarks} (see L{__main__}).

Each scenario module measures one question (L{ingest}, L{drain}, L{latency},
L{overload}, L{scaleout}) against a peer measured in the same run; every run
uses a fresh database on the local PostgreSQL, the service runs as a
C{twistd -n ingest} subprocess (L{processes}) and clients run in processes of
their own (L{clients}).  L{figures} turns the samples into the printed table,
C{benchmarks/latest.json} and C{benchmarks/latest.md}.
"""
