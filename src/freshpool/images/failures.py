"""Tell from a failed build command's output why it failed: a full disk, the network, a package."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

# Below this much room a file system cannot hold even the smallest image, so a command
# that failed there failed for lack of space whatever it printed.
NEARLY_FULL = 4 * 1024 * 1024

_DISK_FULL = re.compile(
    r"No space left on device|Disk quota exceeded|You don't have enough free space", re.I
)
_NETWORK = re.compile(
    r"Failed getting release|Couldn't download|Failed to fetch|Could not connect|"
    r"Connection refused|Connection timed out|Connection reset|Temporary failure|"
    r"Could not resolve|Unable to connect|Network is unreachable|No route to host|"
    r"Hash Sum mismatch|File has unexpected size|Read error|Unable to establish SSL|"
    r"^failed: "
)
_MISSING_DEBS = re.compile(r"Couldn't find these debs: (.+)")
_MISSING_APT = re.compile(
    r"Unable to locate package (\S+)|Package '?([^' ]+)'? has no installation candidate"
)


def failure_kind(lines: list[str], where: Path) -> str:
    """Why a command failed, from its output: "disk", "network" or "other"."""
    if disk_full_lines(lines):
        return "disk"
    with contextlib.suppress(OSError):
        fs = os.statvfs(where)
        if fs.f_bavail * fs.f_frsize < NEARLY_FULL:
            return "disk"
    if any(_NETWORK.search(line) for line in lines):
        return "network"
    return "other"


def disk_full_lines(lines: list[str]) -> bool:
    """Whether the output says the disk is full (a tool's own words for it)."""
    return any(_DISK_FULL.search(line) for line in lines)


def failure_evidence(lines: list[str], kind: str) -> str:
    """The output lines that show why a command failed, joined into one line."""
    pattern = {"disk": _DISK_FULL, "network": _NETWORK}.get(kind)
    return _evidence(lines, pattern) if pattern is not None else ""


def missing_packages(lines: list[str]) -> list[str]:
    """The package names that debootstrap or apt said they could not find."""
    names: list[str] = []
    for line in lines:
        match = _MISSING_DEBS.search(line)
        if match:
            names += match.group(1).split()
        match = _MISSING_APT.search(line)
        if match:
            names.append(match.group(1) or match.group(2))
    return list(dict.fromkeys(names))


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_reason(where: Path, evidence: str) -> str:
    reason = f"the disk is full (no space left on device) under {where}"
    if evidence:
        reason += f": {evidence}"
    return reason


def _evidence(lines: list[str], pattern: re.Pattern[str], limit: int = 2) -> str:
    """The last few distinct lines that match, to say in one line why a command failed."""
    found = list(dict.fromkeys(line.strip() for line in lines if pattern.search(line)))
    return "; ".join(found[-limit:])
