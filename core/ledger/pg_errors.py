"""What the PostgreSQL ledger's failures mean for a client: the database out of reach is a
503 `ledger_unavailable` with Retry-After (never a 500), wherever it is noticed — an
admission, a page's report, the fleet's status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from core.errors import GatewayError

# What a lost or refused connection raises; anything else from the database is a bug here.
UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.OperatorInterventionError)
DATABASE_ERRORS = (*UNREACHABLE, asyncpg.PostgresError)


def reason(exc: BaseException) -> str:
    """The first line of an error, short enough for a message (it names no credentials)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def unavailable(why: str) -> GatewayError:
    return GatewayError(
        503,
        "api_error",
        "ledger_unavailable",
        f"The billing database cannot be reached ({why}); no request is admitted until it is back. Retry in a moment.",
        {"Retry-After": "2"},
    )


@contextlib.contextmanager
def reachable() -> Iterator[None]:
    """Turn the database being out of reach into the 503 above."""
    try:
        yield
    except UNREACHABLE as exc:
        raise unavailable(reason(exc)) from None
