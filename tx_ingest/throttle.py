# -*- test-case-name: tests.test_throttle -*-
"""
Rate-limited warnings, so that a flood of bad input cannot flood the log.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class WarningThrottle:
    """
    Emits at most C{burst} warnings per C{interval} seconds through a
    L{Logger}, and then one line saying how many were left out.

    @ivar suppressed: Warnings left out in the current interval.
    """

    def __init__(
        self, log: Logger, clock: IReactorTime, burst: int = 10, interval: float = 10.0
    ) -> None:
        self._log = log
        self._clock = clock
        self._burst = burst
        self._interval = interval
        self._windowEnd = 0.0
        self._emitted = 0
        self.suppressed = 0

    def warn(self, format: str, **fields: Any) -> None:
        """
        Log a warning unless this interval's burst is spent.

        @param format: A L{twisted.logger} format string.
        @param fields: Its keyword fields.
        """
        now = self._clock.seconds()
        if now >= self._windowEnd:
            if self.suppressed:
                self._log.warn(
                    "{suppressed} more warnings like the above were left out "
                    "in the last {interval} seconds",
                    suppressed=self.suppressed,
                    interval=self._interval,
                )
            self._windowEnd = now + self._interval
            self._emitted = 0
            self.suppressed = 0
        if self._emitted < self._burst:
            self._emitted += 1
            self._log.warn(format, **fields)
        else:
            self.suppressed += 1
