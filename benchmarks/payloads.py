"""
The NDJSON lines every system is given: the same bytes for tx_ingest, C{COPY}
and pgqueuer, about 100 bytes each, generated deterministically in each
client process (so no process has to ship them to another).
"""

from __future__ import annotations

_EVENTS = ("page_view", "add_to_cart", "checkout", "search", "login")


def payloadLine(number: int) -> bytes:
    """
    One JSON object of about 100 bytes, without its newline.

    The text holds no backslash, tab or newline, so it can go through
    C{COPY ... FROM STDIN} in text format unescaped.

    @param number: Which line (any integer); equal numbers give equal lines.
    @return: The UTF-8 JSON text.
    """
    minute, second = divmod(number % 3600, 60)
    return (
        f'{{"id":{number},"user":"u{number * 7919 % 100000:05d}",'
        f'"event":"{_EVENTS[number % 5]}","path":"/p/{number % 9973:04d}",'
        f'"amt":{number % 100000 / 100:.2f},'
        f'"ts":"2024-05-01T12:{minute:02d}:{second:02d}Z"}}'
    ).encode("ascii")


def payloadLines(count: int, first: int = 0) -> list[bytes]:
    """
    Consecutive lines from L{payloadLine}.

    @param count: How many.
    @param first: The number of the first one.
    @return: The lines, without newlines.
    """
    return [payloadLine(n) for n in range(first, first + count)]


def splitEvenly(count: int, parts: int) -> list[tuple[int, int]]:
    """
    Cut C{range(count)} into C{parts} contiguous pieces of near-equal size.

    @return: C{(first, size)} of each piece.
    """
    pieces = []
    first = 0
    for index in range(parts):
        size = count // parts + (1 if index < count % parts else 0)
        pieces.append((first, size))
        first += size
    return pieces
