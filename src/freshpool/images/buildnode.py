"""A build node: a throwaway root over read-only layers, with the host's network.

Its writes land in an overlayfs upper directory, which becomes the next layer. Only
the root file system is the node's own; /dev, /proc and /tmp are bubblewrap's and
leave nothing behind, and steps get no capability that could change the host's
network or mounts (they share its network namespace to reach mirrors).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from freshpool.core.capabilities import BUILD_CAPABILITIES
from freshpool.core.errors import Refused, TimedOut
from freshpool.images.layers import VOLATILE_XATTRS
from freshpool.images.remove import remove_tree
from freshpool.images.rootcommand import HOST_RESOLV, SEARCH_PATH

# Inputs (the script, apt settings, files to copy in) appear here, on the node's tmpfs.
INPUTS = "/tmp/.freshpool"
POLICY_RC_D = "#!/bin/sh\n# freshpool build node: no service starts during a build.\nexit 101\n"
# apt in a build node: no downloaded .debs of installed packages and no binary caches
# left in the layer (pre-fetched .debs are not installed, so they stay).
APT_CONF = """APT::Keep-Downloaded-Packages "false";
Binary::apt-get::APT::Keep-Downloaded-Packages "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
"""
# Files bwrap binds over; if the image lacks one, bwrap leaves an empty mount point in
# the upper dir, which the snapshot must not keep.
MOUNT_POINTS = ("usr/sbin/policy-rc.d", "etc/resolv.conf")
OnLine = Callable[[str], None]


class Cancelled(Refused):
    """The build was asked to stop."""


class StepTimeout(TimedOut):
    """A command in the node ran past its step's timeout."""


class BuildNode:
    """Mount, run commands, unmount: `with BuildNode(...) as node: node.run(...)`.

    On a clean exit the upper dir (`node.upper`) holds exactly the node's changes,
    ready to become a layer; on an exception the whole scratch directory is removed.
    """

    def __init__(self, lowers: Sequence[Path], scratch: Path, hostname: str = "build") -> None:
        if not lowers:
            raise ValueError("a build node needs at least one layer to start from")
        self.lowers = [Path(os.path.realpath(p)) for p in lowers]
        self.scratch = scratch
        self.upper = scratch / "upper"
        self.work = scratch / "work"
        self.root = scratch / "root"
        self.inputs = scratch / "inputs"
        self.hostname = hostname
        self._absent: list[str] = []
        self._mounted = False

    def __enter__(self) -> BuildNode:
        try:
            for path in (self.upper, self.work, self.root, self.inputs):
                path.mkdir(parents=True)
            (self.inputs / "policy-rc.d").write_text(POLICY_RC_D)
            (self.inputs / "policy-rc.d").chmod(0o755)
            (self.inputs / "apt.conf").write_text(APT_CONF)
            lower = ":".join(str(p) for p in self.lowers)
            options = f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"
            result = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise OSError(f"cannot mount the build node's root: {result.stderr.strip()}")
            self._mounted = True
            if os.statvfs(self.root).f_flag & os.ST_RDONLY:
                # overlayfs comes up read-only when it cannot create its work dir.
                raise OSError(28, "No space left on device (the overlay came up read-only)")
            self._absent = [p for p in MOUNT_POINTS if not os.path.lexists(self.root / p)]
        except BaseException:
            self.discard()
            raise
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if exc is not None:
            self.discard()
            return
        try:
            self.finish()
        except BaseException:
            self.discard()
            raise

    def path(self, relative: str) -> Path:
        return self.root / relative.lstrip("/")

    def put_input(self, name: str, data: bytes) -> str:
        """A file the commands can read at INPUTS/name."""
        (self.inputs / name).write_bytes(data)
        return f"{INPUTS}/{name}"

    def run(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        *,
        on_line: OnLine,
        timeout: float,
        cancel: threading.Event | None = None,
    ) -> int:
        """Run argv as root inside the node with the host's network; return its exit status.

        Every line of output goes to `on_line` as it comes. Raises StepTimeout or
        Cancelled after killing everything the command started.
        """
        full_env = {"PATH": SEARCH_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8", **env}
        full_env["APT_CONFIG"] = f"{INPUTS}/apt.conf"
        full_env.setdefault("DEBIAN_FRONTEND", "noninteractive")
        # A session of its own, so a timeout or cancel kills everything it started.
        proc = subprocess.Popen(
            [*self._bwrap(), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            _stream(proc.stdout, on_line, timeout, cancel)
            return proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            proc.stdout.close()

    def _bwrap(self) -> list[str]:
        """The bubblewrap command line that puts what follows it inside the node."""
        wrap = [
            "bwrap",
            "--bind", str(self.root), "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--perms", "1777", "--tmpfs", "/tmp",
            "--ro-bind", str(self.inputs), INPUTS,
            "--ro-bind", str(self.inputs / "policy-rc.d"), "/usr/sbin/policy-rc.d",
        ]  # fmt: skip
        if HOST_RESOLV.exists():
            wrap += ["--ro-bind", str(HOST_RESOLV), "/etc/resolv.conf"]
        wrap += [
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", self.hostname,
            "--die-with-parent",
            "--chdir", "/root" if self.path("/root").is_dir() else "/",
            "--cap-drop", "ALL",
            *(arg for cap in BUILD_CAPABILITIES for arg in ("--cap-add", cap)),
            "--",
        ]  # fmt: skip
        return wrap

    def finish(self) -> None:
        """Unmount and leave in `upper` only what the commands changed."""
        self._unmount()
        remove_tree(self.work)
        remove_tree(self.inputs)
        self.root.rmdir()
        for relative in self._absent:
            leftover = self.upper / relative
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(leftover)
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    leftover.unlink()
        prune_unchanged_dirs(self.upper, self.lowers)

    def discard(self) -> None:
        """Remove everything of the node: its mount and its partial layer."""
        with contextlib.suppress(OSError):
            self._unmount()
        remove_tree(self.scratch)

    def _unmount(self) -> None:
        if not self._mounted:
            return
        result = subprocess.run(
            ["umount", str(self.root)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            # Something inside still holds it (a process that escaped the kill): detach.
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True, check=False)
        self._mounted = False


def _stream(
    stdout: IO[bytes], on_line: OnLine, timeout: float, cancel: threading.Event | None
) -> None:
    """Pass each line of `stdout` to `on_line` until it closes; StepTimeout or Cancelled."""
    deadline = time.monotonic() + timeout
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the build was stopped")
            if time.monotonic() > deadline:
                raise StepTimeout(f"did not finish within {timeout:g} s")
            if not selector.select(timeout=0.2):
                continue
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_line(line.decode(errors="replace").rstrip("\r"))
    if pending:
        on_line(pending.decode(errors="replace"))


def prune_unchanged_dirs(upper: Path, lowers: Sequence[Path]) -> None:
    """Drop directories that overlayfs copied up but nothing changed in.

    Writing a file copies up every directory above it; if the file is gone again
    (a temporary file, a mount point) the directories remain, empty and equal to the
    ones below, and would only make layers differ that have the same content.
    """
    for dirpath, _dirnames, _files in os.walk(upper, topdown=False):
        path = Path(dirpath)
        if path == upper:
            continue
        with contextlib.suppress(OSError):
            if os.listdir(path):
                continue
            below = _lower_entry(lowers, path.relative_to(upper))
            if below is None:
                continue
            mine, theirs = os.lstat(path), os.lstat(below)
            same = (mine.st_mode, mine.st_uid, mine.st_gid) == (
                theirs.st_mode,
                theirs.st_uid,
                theirs.st_gid,
            )
            if same and _attributes(path) == _attributes(below):
                path.rmdir()


def _attributes(path: Path) -> dict[bytes, bytes]:
    """Extended attributes that a layer keeps (an opaque mark included)."""
    found = {}
    for name in os.listxattr(path, follow_symlinks=False):
        raw = os.fsencode(name)
        if raw not in VOLATILE_XATTRS:
            found[raw] = os.getxattr(path, name, follow_symlinks=False)
    return found


def _lower_entry(lowers: Sequence[Path], relative: Path) -> Path | None:
    for layer in lowers:
        candidate = layer / relative
        if os.path.lexists(candidate):
            return candidate
    return None
