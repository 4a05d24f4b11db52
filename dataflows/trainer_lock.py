"""One model trainer per deployment: the lock a running trainer holds in its snapshot directory.

A module of its own, with nothing but the standard library, so that ``recsys trainer`` can say
that another trainer holds the directory before it imports the engine (torch and the rest: seconds
that the "no broker within 10 s" refusal cannot spare)."""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

#: The file in ``RECSYS_EXCHANGE_SNAPSHOT_DIR`` a running trainer holds locked (its pid, host and start inside).
PUBLISHER_LOCK = "trainer.lock"


def publisher_lock(directory: str) -> IO[str]:
    """Hold ``directory``'s :data:`PUBLISHER_LOCK` (``flock``, released by the kernel when the
    process ends, a ``kill -9`` included); SystemExit naming the holder when another trainer holds
    it. One trainer per deployment: until 2026-12-07 a second one (its own state directory, the
    same snapshot directory) started, learned the same log and published beside the first."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / PUBLISHER_LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "its pid not yet written"
        handle.close()
        raise SystemExit(f"recsys trainer: another model trainer publishes to {directory} ({holder}); one trainer per "
                         f"deployment: stop that one first, or give this one its deployment's own "
                         f"--exchange-snapshot-dir (RECSYS_EXCHANGE_SNAPSHOT_DIR)") from None
    handle.seek(0)
    handle.truncate()
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
    handle.flush()
    return handle
