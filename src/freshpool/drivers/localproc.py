"""Host processes for drivers whose nodes run on this host (local, qemu): running host
tools without blocking, and finding, checking and killing node processes by pid,
network namespace or environment marks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Generator, Iterable, Sequence

from freshpool.drivers.base import DriverError

# Root's tools live in sbin, which a service manager or cron may leave out of PATH.
_FALLBACK_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


# (name, PATH) -> where it was found. A node start runs five tools: searching PATH
# each time is measurable in a burst.
_found: dict[tuple[str, str], str] = {}


def find_tool(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    cached = _found.get((name, path))
    if cached is not None and os.access(cached, os.X_OK):
        return cached
    found = shutil.which(name, path=f"{path}:{_FALLBACK_PATH}" if path else _FALLBACK_PATH)
    if found is not None:
        _found[(name, path)] = found
    return found


def tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        raise DriverError(f"{name} is not installed or not on PATH")
    return found


class CommandFailed(DriverError):
    def __init__(self, argv: Sequence[str], status: int, stderr: str) -> None:
        self.argv, self.status, self.stderr = list(argv), status, stderr
        detail = stderr.strip().replace("\n", "; ") or "no error output"
        super().__init__(f"{os.path.basename(argv[0])} failed (exit {status}): {detail}")


class Command:
    """A host tool started at once and waited for in steps, so many run side by side."""

    def __init__(self, argv: Sequence[str], stdin: str | None = None) -> None:
        self.argv = list(argv)
        self.finished = False
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if stdin is not None and self.proc.stdin is not None:
            # Small enough for the pipe buffer: writing cannot block.
            self.proc.stdin.write(stdin.encode())
            self.proc.stdin.close()

    def wait(self) -> Generator[float, None, None]:
        """Steps until the tool exits; raises CommandFailed if it failed. Safe to repeat."""
        pause = 0.001
        while self.proc.poll() is None:
            yield pause
            pause = min(pause * 2, 0.05)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        if self.proc.returncode != 0:
            raise CommandFailed(self.argv, self.proc.returncode, stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.finished = True
        if self.proc.stderr:
            self.proc.stderr.close()


def run(argv: Sequence[str], stdin: str | None = None, timeout: float = 30.0) -> None:
    """Run a short host tool to completion (for rare, one-off setup such as the bridge)."""
    done = subprocess.run(
        list(argv),
        input=stdin.encode() if stdin is not None else None,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr.decode(errors="replace"))


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


# Processes that carry a node's environment marks: nsenter execs bwrap.
LAUNCH_NAMES = ("bwrap", "nsenter")


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
