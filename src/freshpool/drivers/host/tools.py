"""Host tools (ip, ssh-keygen, qemu-img...): found on root's PATH and run without blocking."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Generator, Sequence
from pathlib import Path

from freshpool.drivers.base import CommandFailed, DriverError

# Root's tools live in sbin, which a service manager or cron may leave out of PATH.
_FALLBACK_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


# (name, PATH) -> where it was found. A node start runs several tools and the
# launcher starts nodes in bursts, so PATH is searched once per tool, not per use.
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


def run(argv: Sequence[str], stdin: str | None = None, timeout: float = 30.0) -> str:
    """Run a short host tool to completion (for rare, one-off setup such as the bridge);
    returns what it printed."""
    done = subprocess.run(
        list(argv),
        input=stdin.encode() if stdin is not None else None,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr.decode(errors="replace"))
    return done.stdout.decode(errors="replace")


def keygen(key: Path, role: str, external_id: str) -> Command:
    """Start making an ed25519 key pair at `key` (and `key`.pub), labelled for the node."""
    label = f"freshpool {role} {external_id}"
    argv = [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", label, "-f", str(key)]
    return Command(argv)
