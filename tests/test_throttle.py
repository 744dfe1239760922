"""
Tests for L{tx_ingest.throttle}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tx_ingest.throttle import WarningThrottle


class WarningThrottleTests(SynchronousTestCase):
    """
    A flood of warnings is cut to a burst per interval plus one summary.
    """

    def test_floodIsCut(self) -> None:
        """
        Of 1000 warnings in one interval only the burst is logged; the next
        interval starts with a line counting the ones left out.
        """
        events: list[dict] = []
        clock = Clock()
        throttle = WarningThrottle(Logger(observer=events.append), clock, 3, 10.0)
        for n in range(1000):
            throttle.warn("bad line {n}", n=n)
        self.assertEqual([e["n"] for e in events], [0, 1, 2])
        self.assertEqual(throttle.suppressed, 997)
        clock.advance(10)
        throttle.warn("bad line {n}", n=1000)
        self.assertEqual(events[3]["suppressed"], 997)
        self.assertEqual(events[4]["n"], 1000)
        self.assertEqual(len(events), 5)
