"""One process per SQLite ledger: the lock itself (the processes are in test_crash.py)."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from core.ledger.sqlite_lock import LedgerLock, LedgerLockError


def test_a_held_ledger_is_refused_until_its_lock_is_released(tmp_path):
    """flock() locks an open file, so a second acquire in this process conflicts as another
    process's would; after release() the ledger is free at once, not only when the holder dies."""
    db = tmp_path / "ledger.db"
    lock = LedgerLock.acquire(db)
    with pytest.raises(LedgerLockError, match=rf"ledger {db} is in use by another Tollgate process \(pid {os.getpid()}\)"):
        LedgerLock.acquire(db)
    lock.release()
    LedgerLock.acquire(db).release()


def test_a_file_system_without_flock_is_one_clear_error(tmp_path, monkeypatch):
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)  # what some NFS and FUSE mounts answer
    with pytest.raises(LedgerLockError, match=r"cannot lock the ledger's lock file .*ledger\.db\.lock: No locks available"):
        LedgerLock.acquire(tmp_path / "ledger.db")
