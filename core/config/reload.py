"""Hot reload: watch api.yaml, rebuild the config off the event loop, swap it in one step.

A request reads `store.current` once and keeps that object to the end, so a swap never
affects requests in flight. A file that fails to load leaves the last good config serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchfiles import awatch

from core.config import Config, load_config
from core.config.yamlsource import ConfigError
from core.cooperate import LoopLoad, cooperate, cooperating
from core.keys.records import AccountRecords, BuiltKeys, KeyRecords, layered

log = logging.getLogger("tollgate.config")

# inotify events can be missed (a change before the watcher is up, some bind mounts), so the
# watcher also compares the file's stat signature this often.
POLL_MS = 1000
RETIRE_POLL = 0.1  # seconds between checks that a replaced config is no longer in use
RETIRE_MAX_WAIT = 600.0  # then a long stream still holds it: it is freed when that ends
RELOAD_SWITCH_INTERVAL = 0.0005  # seconds; Python's default is 0.005


@dataclass(frozen=True, slots=True)
class ReloadError:
    message: str
    file: str
    line: int | None
    reason: str
    at: float
    column: int | None = None


def log_warnings(config: Config) -> None:
    """Each warning of a loaded config, once per load: what it ignores is never silent."""
    for warning in config.warnings:
        log.warning("%s", warning)


class ConfigStore:
    """Holds the current config and the story of its reloads."""

    def __init__(self, path: str | Path, initial: Config):
        self.path = Path(path)
        self.current = initial
        self.file_config = initial  # as the file says; `current` adds the keys API's records
        self.records: KeyRecords = {}
        self.account_records: AccountRecords = {}
        self._built = BuiltKeys()  # keys built from records, reused while nothing they depend on changes
        self.last_error: ReloadError | None = None
        self.last_attempt_at = initial.loaded_at
        self.reload_count = 0
        self.on_reload: Callable[[bool], None] = _ignore_reload  # told of each reload: applied, or refused
        self._signature = _signature(self.path)
        self._lock = asyncio.Lock()
        # Held by an edit of the file across reload, write, reload: the writer rewrites the whole
        # file from the text it read, so two edits at once would each drop the other's change.
        self.edit_lock = asyncio.Lock()
        # Replaced configs being freed. Held here because the loop keeps only weak references to
        # tasks: a second reload used to overwrite the first one's task, which could then vanish.
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self) -> bool:
        """Load the file again if its content changed; True when a new config was swapped in.

        `last_attempt_at` is stamped when the attempt is over, so whoever watches it sees
        the outcome, not an attempt still in progress."""
        async with self._lock:
            try:
                return await self._reload()
            finally:
                self.last_attempt_at = time.time()

    async def _reload(self) -> bool:
        self._signature = _signature(self.path)
        try:
            digest = await asyncio.to_thread(_file_hash, self.path)
            if digest == self.current.source_hash and self.last_error is None:
                return False
            with _gc_paused(), _short_gil_turns():
                config = await asyncio.to_thread(_load_and_freeze, self.path, LoopLoad(), self.file_config)
            records, accounts = self.records, self.account_records
            with _short_gil_turns():  # every stored key is built again on the new file: off the loop too
                current = await asyncio.to_thread(layered, config, records, accounts, self._built)
        except ConfigError as exc:
            if self.last_error is None or self.last_error.message != str(exc):
                log.error("config reload failed, still serving the previous config: %s", exc)
            self.last_error = ReloadError(str(exc), exc.file, exc.line, exc.reason, time.time(), exc.column)
            self.on_reload(False)
            return False
        old_file, old_current = self.file_config, self.current
        if records is not self.records or accounts is not self.account_records:  # changed meanwhile
            current = layered(config, self.records, self.account_records, self._built)
        self.file_config, self.current = config, current
        self._retire_later(old_current)
        if old_file is not old_current:
            self._retire_later(old_file)
        self.last_error = None
        self.reload_count += 1
        self.on_reload(True)
        log.info("config reloaded from %s (%d providers, %d keys)", self.path, len(config.providers), len(config.keys))
        log_warnings(config)
        return True

    def apply_records(self, records: KeyRecords, accounts: AccountRecords | None = None) -> None:
        """Serve the file's config with the keys and accounts API's records over it
        (core/keys/records.py); `accounts` None: the account records stay as they are."""
        self.records = records
        if accounts is not None:
            self.account_records = accounts
        before, self.current = self.current, layered(self.file_config, records, self.account_records, self._built)
        if before is not self.current and before is not self.file_config:
            self._retire_later(before)

    def _retire_later(self, config: Config) -> None:
        retiring = asyncio.create_task(_retire([config]))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        """Reload on changes to the file's directory, and on a changed stat signature.

        Watching the directory rather than the file follows editors that save by atomic
        rename and Kubernetes ConfigMaps that swap a symlink; the content hash filters out
        changes that do not alter the file.
        """
        name = self.path.name

        def relevant(_change: object, changed: str) -> bool:
            changed_name = Path(changed).name
            return changed_name == name or changed_name.startswith("..")  # `..data` is Kubernetes' swap

        async for changes in awatch(
            self.path.absolute().parent,
            watch_filter=relevant,
            stop_event=stop,
            debounce=100,
            step=20,
            recursive=False,
            rust_timeout=POLL_MS,
            yield_on_timeout=True,
        ):
            if changes or _signature(self.path) != self._signature:
                await self.reload()


@contextlib.contextmanager
def _short_gil_turns() -> Iterator[None]:
    """Hand the GIL back and forth more often while a load runs in its thread.

    Loading is pure Python for a while (YAML construction, validation). At the default 5 ms
    switch interval, each of the event loop's many short GIL acquisitions can wait a whole
    interval behind it: reloading a 10,000-key file every second under load cut throughput
    by 75% and multiplied p99 latency by 7; with 0.5 ms turns, by 2 to 2.7 (bench/reload_bench.py
    --under-load). Loading in a worker process instead was worse on two cores.
    """
    global _short_turns_users, _switch_interval_before
    if _short_turns_users == 0:  # a load and the freeing of the config before it may overlap
        _switch_interval_before = sys.getswitchinterval()
        sys.setswitchinterval(RELOAD_SWITCH_INTERVAL)
    _short_turns_users += 1
    try:
        yield
    finally:
        _short_turns_users -= 1
        if _short_turns_users == 0:
            sys.setswitchinterval(_switch_interval_before)


_short_turns_users = 0
_switch_interval_before = sys.getswitchinterval()


async def _retire(box: list[Config]) -> None:
    """Free a replaced config off the event loop, once no request uses it any more.

    Dropping the last reference to a 10,000-key config frees its objects in one C-level
    cascade: ~26 ms during which nothing else runs, on whichever thread drops it (usually
    the loop, at the end of the last request that started on it). Taken apart in a worker
    thread, it is freed a key at a time, and the GIL can change hands in between.
    """
    waited = 0.0
    while sys.getrefcount(box[0]) > 2 and waited < RETIRE_MAX_WAIT:  # 2: the box and the call's argument
        await asyncio.sleep(RETIRE_POLL)
        waited += RETIRE_POLL
    if waited < RETIRE_MAX_WAIT:
        with _short_gil_turns():
            await asyncio.to_thread(_free_in_steps, box, LoopLoad())


def _free_in_steps(box: list[Config], load: LoopLoad) -> None:
    with cooperating(load):
        config = box.pop()
        keys = list(config.keys)
        config.keys_by_id.clear()
        config.key_index.clear()
        object.__setattr__(config, "keys", ())  # a frozen dataclass no one else can see any more
        del config
        while keys:
            keys.pop()
            cooperate()


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _load_and_freeze(path: Path, load: LoopLoad, previous: Config | None = None) -> Config:
    """Load, then move everything just allocated out of the collector's reach: otherwise the
    first collection after the load scans the whole new config on the event loop's thread,
    and later full collections scan it again (pauses that grow with the number of keys).
    `previous`: the config being replaced, whose discovered models a failed discovery keeps."""
    with cooperating(load):
        config = load_config(path, previous)
    gc.freeze()
    return config


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing a large file allocates many objects, which triggers full collections that stop
    every thread, the event loop's included, for ~100 ms. Parsed trees have no cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _file_hash(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise ConfigError(str(path), None, "config file was removed; still serving the previous config") from None
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read config file: {exc}") from None


def _ignore_reload(applied: bool) -> None:
    """`on_reload` until the app sets its metrics' hook."""
