# -*- test-case-name: tests.test_faults -*-
"""
Fault tests: a real C{twistd -n ingest --ack} process fed by resending
L{tx_ingest.send.Sender} clients while its database is killed, restarted or
locked, or while it is killed or stopped itself.  The scenarios live in the
L{faults} package (C{python -m faults} runs them longer); these run them
small enough for CI and assert on their counts.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

import faults
from faults import TEST, Outcome
from tx_ingest.embedded import EmbeddedUnavailable, requireEmbedded

try:
    requireEmbedded()
except EmbeddedUnavailable as e:
    noEmbedded: str | None = str(e)
else:
    noEmbedded = None


class FaultTests(TestCase):
    """
    Nothing acked is ever lost, whatever breaks.
    """

    timeout = 90

    def assertEveryLineAcked(self, outcome: Outcome) -> None:
        """
        Every line of the scenario was acked and is stored, none acked was
        lost, and the scenario's own checks passed.
        """
        self.assertEqual(outcome.problems, [], outcome.details)
        self.assertEqual(outcome.lost, 0)
        self.assertEqual(outcome.acked, outcome.sent)
        self.assertEqual(outcome.stored, outcome.sent)

    async def _terminate(self) -> None:
        outcome = await faults.terminateMidStream(TEST)
        self.assertEveryLineAcked(outcome)
        self.assertEqual(outcome.sent, TEST.total)
        self.assertGreaterEqual(outcome.details["backendsKilled"], 2)

    def test_backendsTerminated(self) -> Deferred[None]:
        """
        Terminating every backend of the service's database twice mid-stream
        loses no acked line: every line is stored at least once and acked,
        and the service keeps running and serves a new client afterwards.
        """
        return Deferred.fromCoroutine(self._terminate())

    async def _restart(self, dedupe: bool, strict: bool = False) -> None:
        outcome = await faults.restartPostgres(TEST, dedupe, strict)
        self.assertEveryLineAcked(outcome)
        self.assertEqual(outcome.sent, TEST.total)
        if dedupe:
            self.assertEqual(outcome.duplicates, 0)

    def test_postgresRestartedDedupe(self) -> Deferred[None]:
        """
        With C{--dedupe-field}, restarting the service's private PostgreSQL
        mid-stream leaves every line stored exactly once and acked, and the
        service still serving.
        """
        return Deferred.fromCoroutine(self._restart(True))

    def test_postgresRestarted(self) -> Deferred[None]:
        """
        Without deduplication, restarting PostgreSQL mid-stream leaves every
        line stored at least once and acked.
        """
        return Deferred.fromCoroutine(self._restart(False))

    def test_postgresRestartedPoolRecovers(self) -> Deferred[None]:
        """
        Restarting PostgreSQL (C{pg_ctl stop -m fast}, default
        C{authentication_timeout}) mid-stream: the server stops within 10
        seconds and the service's pool logs that every connection is open
        again.
        """
        return Deferred.fromCoroutine(self._restart(True, strict=True))

    if noEmbedded is not None:
        test_postgresRestartedDedupe.skip = noEmbedded  # type: ignore[attr-defined]
        test_postgresRestarted.skip = noEmbedded  # type: ignore[attr-defined]
        test_postgresRestartedPoolRecovers.skip = noEmbedded  # type: ignore[attr-defined]

    async def _kill(self) -> None:
        outcome = await faults.killService(TEST)
        self.assertEqual(outcome.details["lostAtKill"], 0)
        self.assertGreater(outcome.details["ackedAtKill"], 0)
        self.assertLess(outcome.details["ackedAtKill"], TEST.total)
        self.assertEveryLineAcked(outcome)

    def test_serviceKilled(self) -> Deferred[None]:
        """
        Every line acked before the service is SIGKILLed mid-stream is
        already in the table; a restarted service then takes the rest.
        """
        return Deferred.fromCoroutine(self._kill())

    async def _term(self, strict: bool) -> None:
        outcome = await faults.terminateService(TEST)
        details = outcome.details
        if not strict:
            outcome.problems = [p for p in outcome.problems if "never acked" not in p]
        self.assertEveryLineAcked(outcome)
        self.assertLessEqual(details["ackedAtExit"], details["storedAtExit"])
        self.assertLessEqual(details["flushed"][0], details["storedAtExit"])
        self.assertLessEqual(details["exitSeconds"], 10.0)
        if strict:
            self.assertEqual(details["storedUnacked"], 0)

    def test_serviceTerminated(self) -> Deferred[None]:
        """
        SIGTERM mid-stream: the service exits within its shutdown timeout,
        every line acked before it exited is stored, as many lines are stored
        as the log says were flushed at shutdown, and a restarted service
        takes the rest.
        """
        return Deferred.fromCoroutine(self._term(strict=False))

    def test_serviceTerminatedAcksEverythingStored(self) -> Deferred[None]:
        """
        SIGTERM mid-stream: every line the service stored before exiting had
        its ack delivered, so a client resends nothing it has stored.
        """
        return Deferred.fromCoroutine(self._term(strict=True))

    async def _flood(self) -> None:
        outcome = await faults.connectionFlood(TEST)
        cap = TEST.connectionCap
        self.assertEqual(outcome.problems, [], outcome.details)
        self.assertEqual(outcome.details["served"], cap)
        self.assertEqual(outcome.details["refused"], 9 * cap)
        self.assertEqual(outcome.acked, cap + 1)
        self.assertEqual(outcome.stored, cap + 1)

    def test_connectionFlood(self) -> Deferred[None]:
        """
        Ten times the connection cap connecting at once: exactly the cap is
        served, every other client is told C{too_many_connections}, and the
        service serves a new client afterwards.
        """
        return Deferred.fromCoroutine(self._flood())

    async def _lock(self) -> None:
        outcome = await faults.lockedTable(TEST)
        self.assertEveryLineAcked(outcome)
        self.assertEqual(outcome.sent, TEST.lockClients * TEST.lockLines)
        self.assertEqual(outcome.details["ackedInLockSecondHalf"], 0)
        self.assertLessEqual(outcome.details["growthMiB"], outcome.details["boundMiB"])

    def test_tableLocked(self) -> Deferred[None]:
        """
        With the jobs table locked for a few seconds under twenty flooding
        clients, nothing is acked while it is locked, everything is acked and
        stored after the release, and the service's resident memory grows by
        less than the README's bound.
        """
        return Deferred.fromCoroutine(self._lock())
