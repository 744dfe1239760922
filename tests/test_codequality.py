"""
The code-quality gates of CI, as tests: mypy (with the zope plugin) over the
package, ruff's lint and format over the repository.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

import tests

TOP = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))


def runTool(module: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{python -m module arguments} from the repository's top directory.

    @raise SkipTest: If the tool is not installed (it comes with the C{test}
        extra).
    """
    if importlib.util.find_spec(module) is None:
        raise SkipTest(f"{module} is not installed (pip install -e '.[test]')")
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=300,
    )


class CodeQualityTests(SynchronousTestCase):
    """
    The code type-checks, lints and is formatted.
    """

    def test_mypy(self) -> None:
        """
        mypy, with the zope plugin configured in C{pyproject.toml}, finds no
        error in the package.
        """
        result = runTool("mypy", "tx_ingest")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruffCheck(self) -> None:
        """
        ruff's lint rules (C{pyproject.toml}) pass everywhere.
        """
        result = runTool("ruff", "check", ".")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruffFormat(self) -> None:
        """
        Every file is formatted as C{ruff format} (88 columns) would.
        """
        result = runTool("ruff", "format", "--check", ".")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
