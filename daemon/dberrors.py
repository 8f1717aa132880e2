"""What a failed database connection says about the configuration.

An unreachable server is an outage: the daemon waits, then exits 69 and systemd tries
again later. A server that answers "no such database" or "wrong password" will answer
the same on every restart, so that is a configuration error (exit 78, which the unit
does not restart). libpq reports no SQLSTATE for a failed connection, only the
server's message, so the kinds below are recognised by that message: 3D000
(invalid_catalog_name), 28000 (invalid_authorization_specification), 28P01
(invalid_password) and 42501 on CONNECT, in PostgreSQL's and pgbouncer's English
wording. A server whose lc_messages is another language is therefore treated as
unreachable (wait, then 69), which is the safe side.
"""

from __future__ import annotations

import re

from sqlalchemy.exc import DBAPIError

_REFUSALS = re.compile(
    r"database \S+ does not exist"  # 3D000
    r"|no such database"  # pgbouncer: the database is not in its [databases]
    r"|role \S+ does not exist"  # 28000
    r"|no pg_hba\.conf entry for"  # 28000
    r"|pg_hba\.conf rejects connection"  # 28000
    r"|is not permitted to log in"  # 28000
    r"|password authentication failed for user"  # 28P01
    r"|no such user"  # pgbouncer: the user is not in its auth_file
    r"|fe_sendauth: no password supplied"  # the server wants a password, the URL has none
    r"|permission denied for database"  # 42501: no CONNECT privilege
    r"|server does not support SSL, but SSL was required"
)
_SERVER_SAYS = re.compile(r"(?:FATAL|ERROR):\s+(.*)")


def configuration_problem(exc: BaseException) -> str | None:
    """The server's refusal, if `exc` (or what caused it) is one that a retry cannot fix."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError):
            message = str(current.orig if current.orig is not None else current)
            for line in message.splitlines():
                if _REFUSALS.search(line):
                    said = _SERVER_SAYS.search(line)
                    return (said.group(1) if said else line).strip()
        current = current.__cause__ or current.__context__
    return None
