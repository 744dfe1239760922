# -*- test-case-name: tests.test_store -*-
"""
PostgreSQL connection strings: where they come from and how they are shown.

A DSN is either a URL (C{postgresql://user:secret@host/db}) or libpq's
C{key=value} form.  Both forms may carry a password, so anything that logs a
DSN logs L{redactDsn}'s result instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from psycopg2.extensions import make_dsn, parse_dsn

#: What replaces a password in L{redactDsn}'s output.
REDACTED = "***"

#: The environment variable read by L{dsnFromEnvironment}.
DSN_VARIABLE = "DATABASE_URL"

# A libpq keyword value is either single-quoted (with backslash escapes) or a
# run of non-space characters.
_KEYWORD_PASSWORD = re.compile(
    r"(?<![\w])(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE
)
_QUERY_PASSWORD = re.compile(r"(?<=[?&])(password=)[^&#]*", re.IGNORECASE)


def redactDsn(dsn: str) -> str:
    """
    Hide the password in a DSN so that it can be logged.

    Works on malformed DSNs too (it never raises), so that a DSN which failed
    to parse can still be shown in the error message.

    @param dsn: A URL or C{key=value} DSN.

    @return: C{dsn} with every password replaced by L{REDACTED}; the rest is
        left as it was written.
    """
    if "://" not in dsn:
        return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + REDACTED, dsn)

    # Everything up to the last "@" before the query is the user info, even
    # if a careless password holds an unescaped "/" or "@".
    scheme, separator, rest = dsn.partition("://")
    beforeQuery, question, query = rest.partition("?")
    userinfo, at, afterUser = beforeQuery.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        beforeQuery = f"{user}:{REDACTED}@{afterUser}"
    query = _QUERY_PASSWORD.sub(lambda m: m.group(1) + REDACTED, question + query)
    return scheme + separator + beforeQuery + query


def dsnFromEnvironment(environ: Mapping[str, str]) -> str | None:
    """
    Read the DSN from the environment.

    @param environ: The environment, usually C{os.environ}.

    @return: The value of C{DATABASE_URL}, or L{None} if it is unset or empty.
    """
    return environ.get(DSN_VARIABLE) or None


def withDatabase(dsn: str, dbname: str) -> str:
    """
    Point a DSN at another database on the same server.

    @param dsn: A URL or C{key=value} DSN.

    @param dbname: The name of the other database.

    @return: A C{key=value} DSN with every setting of C{dsn} but the database.

    @raise psycopg2.ProgrammingError: If C{dsn} cannot be parsed.
    """
    settings = parse_dsn(dsn)
    settings["dbname"] = dbname
    result: str = make_dsn(**settings)
    return result
