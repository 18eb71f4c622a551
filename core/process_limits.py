"""What the operating system lets one process hold: open files and the listen queue.

Every open stream costs the gateway two sockets (the client's and the vendor's), and a socket
is an open file. Linux starts most services with a soft limit of 1,024 open files although the
hard limit is far higher: without raising it, stream 500 would fail to open a vendor
connection (or a client's would wait unaccepted). The soft limit may be raised to the hard
one without privilege, so the gateway does that at start and says how many streams the result
holds. The listen queue (backlog) holds connections the kernel completed but the server has
not yet accepted: a burst of thousands of new clients overflows a short one, and the kernel
then drops their handshakes, which clients see as resets or stalls. The kernel caps the
queue at `net.core.somaxconn`, so the gateway asks for a long one and reports what it got.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import Config

SOCKETS_PER_STREAM = 2  # the client's and the vendor's
# Files that are not streams: the listening socket, the ledger and its journal, the config
# watcher, logs, the event loop's own descriptors, a PostgreSQL pool, metrics files.
RESERVED_FILES = 64
# Streams the gateway should hold when no provider sets `max_connections` (a limit that holds
# fewer is warned about): enough for a busy team; an operator expecting more sets the limits.
EXPECTED_STREAMS = 1000
DEFAULT_BACKLOG = 65535  # asked for; the kernel grants at most net.core.somaxconn
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """The open-file limit after start: `raised_from` is the soft limit found, if it was raised."""

    limit: int
    raised_from: int | None = None

    @property
    def streams(self) -> int:
        """Concurrent streams the limit holds."""
        return max(0, (self.limit - RESERVED_FILES) // SOCKETS_PER_STREAM)


def raise_open_file_limit() -> OpenFiles:
    """The soft open-file limit raised to the hard one (allowed without privilege)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # Linux never reports RLIM_INFINITY here
    if soft == hard:
        return OpenFiles(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # a hard limit above the kernel's nr_open: keep what there is
        return OpenFiles(soft)
    return OpenFiles(hard, raised_from=soft)


def open_files_warning(files: OpenFiles, wanted: int | None) -> str | None:
    """Why the limit may be too low for the configured concurrency, or None. `wanted`: the
    streams the providers' `max_connections` add up to; None when a provider has no limit
    (then EXPECTED_STREAMS is the floor)."""
    needed = wanted if wanted is not None else EXPECTED_STREAMS
    if files.streams >= needed:
        return None
    what = f"the providers' max_connections add up to {wanted:,}" if wanted is not None else f"fewer than {EXPECTED_STREAMS:,}"
    return (
        f"the open-file limit {files.limit:,} holds about {files.streams:,} concurrent streams (2 sockets each), {what}:"
        " past it, connections fail to open. Raise the hard limit: `ulimit -Hn` in the starting shell, LimitNOFILE= in a systemd unit,"
        " --ulimit nofile= in Docker"
    )


def listen_queue(asked: int) -> int:
    """The listen queue the kernel grants for `asked` (capped at net.core.somaxconn where known)."""
    try:
        return min(asked, int(SOMAXCONN.read_text()))
    except (OSError, ValueError):
        return asked


def configured_streams(config: Config) -> int | None:
    """The streams the providers may open at once: the sum of their `max_connections`, or
    None when one has no limit."""
    total = 0
    for provider in config.providers:
        if provider.max_connections is None:
            return None
        total += provider.max_connections
    return total
