"""Which ledger a `--database` value names, and opening it.

`postgresql://…` (or `postgres://…`) is the fleet ledger on PostgreSQL; `sqlite:///path`
or a plain file path is the embedded SQLite ledger, the default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.ledger import Ledger

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


@dataclass(frozen=True, slots=True)
class Database:
    kind: str  # SQLITE or POSTGRESQL
    target: str  # the file path, or the connection URL

    @property
    def shared(self) -> bool:
        """Whether several processes may use it at once (and so `--workers` above 1)."""
        return self.kind == POSTGRESQL

    def shown(self) -> str:
        """For messages and logs: a URL without its password."""
        if self.kind == SQLITE:
            return self.target
        from core.ledger.postgres import redact

        return redact(self.target)


def parse_database(value: str | Path) -> Database:
    """The database `value` names; ValueError with the reason for a URL we cannot use."""
    text = str(value).strip()
    if not text:
        raise ValueError("the database is empty: give a file path, sqlite:///path or postgresql://user:password@host:5432/dbname")
    scheme = text.split(":", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(text)
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"the PostgreSQL URL names no host: {text.split('@')[-1]}")
        return Database(POSTGRESQL, text)
    if scheme == "sqlite":  # SQLAlchemy's spelling: sqlite:///relative/path, sqlite:////absolute/path
        path = text[len("sqlite:///") :] if text.lower().startswith("sqlite:///") else ""
        if not path:
            raise ValueError("sqlite:/// needs a file path, e.g. sqlite:///data/tollgate.db or sqlite:////var/lib/tollgate.db")
        return Database(SQLITE, path)
    if scheme:
        raise ValueError(f"unknown database scheme '{scheme}://': use postgresql://… for a fleet or a file path (or sqlite:///path) for SQLite")
    return Database(SQLITE, text)


async def open_ledger(database: Database, clock: Callable[[], float] = time.time) -> Ledger:
    if database.kind == POSTGRESQL:
        from core.ledger.postgres import PgLedger

        return await PgLedger.open(database.target, clock)
    from core.ledger.sqlite import SqliteLedger

    return await SqliteLedger.open(database.target, clock)
