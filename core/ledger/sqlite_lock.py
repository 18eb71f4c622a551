"""One Tollgate process per SQLite ledger: an exclusive lock on `<ledger>.lock`, held for life.

Balances and reservations live in the process's memory (core/ledger/sqlite.py). Two processes on
one ledger file would each spend a key's whole balance, and a top-up made through one would
never reach the other. flock() is released by the OS when its holder dies, kill -9 included,
so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

PID_WAIT_SECONDS = 0.2  # a holder writes its pid just after locking: how long to wait for it


class LedgerLockError(Exception):
    """The ledger is in use by another process, or its lock file cannot be made."""


class LedgerLock:
    """An open, flock()ed lock file beside the ledger, holding its owner's pid."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, ledger: str | Path) -> LedgerLock:
        """Lock `ledger` for this process, or raise LedgerLockError naming the holder's pid.
        The lock sits beside the real file, so a symlink or another spelling of the same path
        (`./data/../data/t.db`) finds the same lock."""
        path = Path(f"{os.path.realpath(ledger)}.lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LedgerLockError(f"cannot create the ledger's lock file {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LedgerLockError(f"ledger {ledger} is in use by another Tollgate process ({holder}); stop it first, or give this one its own --db") from None
        except OSError as exc:  # a file system without flock (some NFS or FUSE mounts)
            os.close(fd)
            raise LedgerLockError(f"cannot lock the ledger's lock file {path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def __enter__(self) -> LedgerLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Let the ledger go. The file stays: removing it would race a process opening it."""
        os.close(self._fd)


def _holder(fd: int) -> str:
    """`pid N` from the lock file, waiting briefly for a holder that has just locked it."""
    deadline = time.monotonic() + PID_WAIT_SECONDS
    while True:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if pid.isdigit():
            return f"pid {pid}"
        if time.monotonic() > deadline:
            return "pid unknown"
        time.sleep(0.01)
