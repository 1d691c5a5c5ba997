"""A node's processes on this host: found by pid, network namespace or environment marks,
checked for life, and killed."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

# Environment marks on a node's processes, so strays can be found after a crash.
MARK_CLUSTER = "FRESHPOOL_CLUSTER"
MARK_NODE = "FRESHPOOL_NODE"
MARK_PROVIDER = "FRESHPOOL_PROVIDER"

# Processes that carry a node's environment marks: nsenter execs bwrap.
LAUNCH_NAMES = ("bwrap", "nsenter")


def start_time(pid: int) -> int | None:
    """The pid's start time in clock ticks, None if it is gone or a zombie.

    Recorded next to a pid, it tells our process from a later one given the same pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def is_alive(pid: int | None, started: int | None) -> bool:
    if not pid:
        return False
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _environ(pid: int, names: set[bytes]) -> set[bytes] | None:
    """The environment entries of pid if its name is one of `names`, else None."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            if comm.read().rstrip(b"\n") not in names:
                return None
        with open(f"/proc/{pid}/environ", "rb") as env:
            return set(env.read().split(b"\0"))
    except OSError:
        return None


def marked_processes(
    marks: dict[str, str], names: Iterable[str] = LAUNCH_NAMES
) -> dict[int, dict[str, str]]:
    """Live processes named in `names` whose environment has every one of `marks`.

    Returns pid -> the FRESHPOOL_* variables of that process. Only the launch
    processes carry the marks that matter (every other process of a node lives in
    a PID namespace that dies with them), so reading their environment is enough.
    """
    wanted = {name.encode() for name in names}
    needed = {f"{k}={v}".encode() for k, v in marks.items()}
    found: dict[int, dict[str, str]] = {}
    for pid in _pids():
        entries = _environ(pid, wanted)
        if entries is not None and needed <= entries and start_time(pid) is not None:
            found[pid] = {
                key: value
                for key, _, value in (e.decode(errors="replace").partition("=") for e in entries)
                if key.startswith("FRESHPOOL_")
            }
    return found


def node_processes(
    netns_file: str, marks: dict[str, str], names: Iterable[str] = LAUNCH_NAMES
) -> set[int]:
    """Live processes in the netns bound at `netns_file` (what `ip netns pids` finds),
    plus launch processes carrying `marks` (they may outlive the netns name). One pass."""
    try:
        target = os.stat(netns_file)
        netns: tuple[int, int] | None = (target.st_dev, target.st_ino)
    except OSError:
        netns = None
    wanted = {name.encode() for name in names}
    needed = {f"{k}={v}".encode() for k, v in marks.items()}
    found = set()
    for pid in _pids():
        try:
            ns = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == netns:
            found.add(pid)
            continue
        entries = _environ(pid, wanted)
        if entries is not None and needed <= entries:
            found.add(pid)
    return {pid for pid in found if start_time(pid) is not None}


def kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
