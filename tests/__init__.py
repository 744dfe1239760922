"""
Tests for L{tx_ingest}.
"""
