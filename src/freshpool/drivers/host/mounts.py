"""Mounts of nodes' file systems: overlays mounted and unmounted by syscall, found in mountinfo."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

# mount(2) and umount2(2) straight from libc: the `mount` tool would cost a process
# per node, and the launcher creates nodes in bursts.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_NODEV = 4
MNT_DETACH = 2
# The kernel copies mount options into one page.
_MAX_OPTIONS = 4095
# Characters that overlayfs would read as option or layer separators.
_SEPARATORS = (",", ":", "\\")


def mount_overlay(layers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount `layers` (top first, read-only) under the writable `upper` at `target`."""
    if not layers:
        raise ValueError("an overlay needs at least one lower layer")
    paths = [str(p) for p in (*layers, upper, work, target)]
    for path in paths:
        if any(sep in path for sep in _SEPARATORS):
            raise ValueError(f"overlayfs cannot take a path containing , : or \\: {path!r}")
    lower = ":".join(str(p) for p in layers)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if len(options) > _MAX_OPTIONS:
        raise ValueError(
            f"overlay options are {len(options)} bytes, over the kernel's {_MAX_OPTIONS}:"
            " use fewer layers or shorter paths"
        )
    # nodev: device files inside an image or written by a job must not reach host devices;
    # the node's /dev is bubblewrap's own.
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", MS_NODEV, options) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mounting the overlay on {target}: {os.strerror(code)}")


def unmount(target: str | Path, detach: bool = False) -> None:
    """Unmount `target`; a path that is not (or no longer) mounted is fine."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):
            return
        raise OSError(code, f"unmounting {target}: {os.strerror(code)}")


def is_read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory` in our mount namespace, deepest first."""
    prefix = str(directory).rstrip("/") + "/"
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            point = _unescape(line.split(" ", 5)[4])
            if point.startswith(prefix) or point == prefix[:-1]:
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def overlay_available() -> bool:
    """Whether this kernel has overlayfs, or can load it on the first mount."""
    try:
        with open("/proc/filesystems") as filesystems:
            if any(line.split()[-1] == "overlay" for line in filesystems if line.strip()):
                return True
    except OSError:
        return False
    # Not loaded yet is fine if the module exists: the first mount loads it.
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}/kernel/fs/overlayfs").glob("overlay.ko*"))
