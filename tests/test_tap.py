"""
Tests for L{tx_ingest.tap}: option parsing, defaults, usage errors and the
environment form used by the C{.tac} file.
"""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tx_ingest.tap import DEFAULT_LISTEN, Options, optionsFromEnvironment


class OptionsTests(SynchronousTestCase):
    """
    C{twistd ingest} options.
    """

    def parse(self, *argv: str) -> Options:
        """
        @return: L{Options} parsed from C{argv}.
        """
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """
        Without arguments every option has its documented default, of the
        coerced type, and the service listens on loopback only.
        """
        options = self.parse()
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertIn("interface=127.0.0.1", DEFAULT_LISTEN)
        self.assertEqual(options["max-connections"], 100)
        self.assertEqual(options["max-line-bytes"], 8192)
        self.assertEqual(options["queue-size"], 1024)
        self.assertEqual(options["idle-timeout"], 300.0)
        self.assertEqual(options["batch-size"], 1000)
        self.assertEqual(options["schema"], "tx_ingest")
        self.assertFalse(options["ack"])

    def test_listenRepeatable(self) -> None:
        """
        C{--listen} may be given several times.
        """
        options = self.parse(
            "--listen", "tcp:1:interface=127.0.0.2", "--listen", "unix:/x"
        )
        self.assertEqual(options["listen"], ["tcp:1:interface=127.0.0.2", "unix:/x"])

    def test_badValues(self) -> None:
        """
        Bad values are usage errors naming the option, not tracebacks.
        """
        for argv in (
            ["--max-connections", "0"],
            ["--max-line-bytes", "lots"],
            ["--idle-timeout", "-1"],
            ["--listen", "nonsense:1"],
            ["--schema", "Robert'); DROP"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_dsnFromEnvironment(self) -> None:
        """
        C{--dsn} defaults to C{DATABASE_URL}.
        """
        self.patch(__import__("os"), "environ", {"DATABASE_URL": "postgresql://x/y"})
        self.assertEqual(self.parse()["dsn"], "postgresql://x/y")


class EnvironmentTests(SynchronousTestCase):
    """
    The C{.tac} reads the same options from C{TX_INGEST_*} variables.
    """

    def test_variables(self) -> None:
        """
        Each variable maps to its option; C{TX_INGEST_LISTEN} holds several
        endpoints; flags take C{1}; unrelated variables, and C{TX_INGEST_}
        ones naming no option, are ignored.
        """
        options = optionsFromEnvironment(
            {
                "TX_INGEST_LISTEN": "tcp:5001 tcp:5002",
                "TX_INGEST_QUEUE_SIZE": "64",
                "TX_INGEST_ACK": "1",
                "TX_INGEST_DSN": "dbname=x",
                "TX_INGEST_TEST_DSN": "dbname=tests",
                "HOME": "/root",
            }
        )
        self.assertEqual(options["listen"], ["tcp:5001", "tcp:5002"])
        self.assertEqual(options["queue-size"], 64)
        self.assertTrue(options["ack"])
        self.assertEqual(options["dsn"], "dbname=x")

    def test_badVariable(self) -> None:
        """
        A bad value in the environment is a usage error too.
        """
        self.assertRaises(
            usage.UsageError, optionsFromEnvironment, {"TX_INGEST_QUEUE_SIZE": "x"}
        )
