"""Delete a root-owned directory tree that may still have file systems mounted inside it."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

MNT_DETACH = 2


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first, from /proc/self/mountinfo."""
    root = os.path.realpath(path)
    found: list[Path] = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = _unescape(line.split()[4])
            if point == root or point.startswith(root.rstrip("/") + "/"):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_all(path: Path) -> None:
    """Detach every mount at or below `path`.

    debootstrap mounts /proc and /sys inside its target and leaves them there when it
    is killed; deleting through them would reach the host's live /proc and /sys.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for point in mounts_under(path):
        if libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise OSError(err, f"cannot unmount {point}: {os.strerror(err)}")
    left = mounts_under(path)
    if left:
        raise OSError(errno.EBUSY, f"still mounted under {path}: {', '.join(map(str, left))}")


def remove_tree(path: Path) -> None:
    """Delete `path` and everything below it, whatever the modes; a missing path is fine."""
    path = Path(path)
    if os.path.realpath(path) == "/":
        raise ValueError("refusing to remove /")
    if not path.exists() and not path.is_symlink():
        return
    unmount_all(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    shutil.rmtree(path, onerror=_force)


def _force(func: Any, name: str, exc_info: Any) -> None:
    """Retry a failed removal after lifting what can block even root: modes and attributes."""
    exc = exc_info[1]
    if isinstance(exc, FileNotFoundError):
        return
    if not isinstance(exc, PermissionError):
        raise exc
    parent = os.path.dirname(name)
    for target in (parent, name):
        with contextlib.suppress(OSError):
            mode = os.lstat(target).st_mode
            if stat.S_ISDIR(mode):
                os.chmod(target, stat.S_IMODE(mode) | stat.S_IRWXU)
        # Immutable and append-only attributes stop root too; chattr is the only way out.
        with contextlib.suppress(OSError):
            subprocess.run(
                ["chattr", "-i", "-a", target],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
    func(name)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )
