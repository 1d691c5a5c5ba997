"""One launcher per state directory: the lock `serve` (or a foreground image build)
holds, and the look clients take to know whether one runs."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from freshpool.core.errors import Refused

LOCK_FILE = "launcher.lock"
# `serve --api-only`'s lock (serve/apionly.py): one API server per state directory,
# as its CLIs find the API through the directory's api.url. It drives no provider,
# so it leaves launcher.lock to a launcher.
API_LOCK_FILE = "api.lock"
# What `serve` writes into the lock file as its holder.
SERVE = "freshpool serve"


class LauncherRunning(Refused):
    """Another process holds the state directory's launcher lock."""


@contextmanager
def trying(state_dir: Path, what: str, lock_file: str = LOCK_FILE) -> Iterator[str | None]:
    """Hold the lock while the block runs if it is free (the block gets None); else
    the block gets who holds it, and holds nothing."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(state_dir / lock_file, "a+")  # noqa: SIM115 - closed below
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            yield handle.read().strip() or "another process"
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({what})")
        handle.flush()
        try:
            yield None
        finally:
            handle.seek(0)
            handle.truncate()


@contextmanager
def holding(state_dir: Path, what: str, lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Hold the lock while the block runs; raise LauncherRunning, naming the holder,
    if another process has it."""
    with trying(state_dir, what, lock_file) as other:
        if other is not None:
            raise LauncherRunning(f"{other} already runs on {state_dir}")
        yield


def holder(state_dir: Path, lock_file: str = LOCK_FILE) -> str | None:
    """Who holds the lock now (as it wrote itself: "pid N (what)"), or None."""
    try:
        handle = open(state_dir / lock_file)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def serve_runs(state_dir: Path) -> bool:
    """Whether `freshpool serve` (rather than, say, a foreground build) holds the lock."""
    held = holder(state_dir)
    return held is not None and held.endswith(f"({SERVE})")
