"""What a local node may use: a cgroup for CPU, memory and pids, and a disk of its size.

The disk is an ext4 file system in a sparse file in the node's directory, mounted
where the overlay's upper and work dirs live: a job that fills it gets ENOSPC, and
the host gives it only the blocks it wrote. Without a `disk` limit the same dirs
are plain directories on the host's file system.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from pathlib import Path

from freshpool.config import NodeLimits
from freshpool.drivers.base import DriverUnavailable
from freshpool.drivers.host import cgroups
from freshpool.drivers.host.tools import Command, find_tool, tool
from freshpool.drivers.local.records import NodePaths

OUT_OF_MEMORY = "out of memory"


def group_limits(limits: NodeLimits) -> cgroups.Limits:
    return cgroups.Limits(
        cpus=limits.cpus,
        memory=None if limits.memory is None else int(limits.memory),
        pids=limits.pids,
    )


class NodeLimiter:
    """One local provider's per-node limits."""

    def __init__(self, hierarchy: cgroups.Hierarchy | None) -> None:
        self.hierarchy = hierarchy

    def describe(self) -> str:
        if self.hierarchy is None:
            return "no cgroup controllers for cpu, memory or pids on this host"
        return self.hierarchy.describe()

    def check(self, limits: NodeLimits, what: str) -> None:
        """Refuse limits this host cannot enforce, naming the limit and what is missing."""
        wanted = group_limits(limits)
        if wanted and self.hierarchy is None:
            raise DriverUnavailable(
                f"{what}: limits {', '.join(sorted(wanted.controllers()))} need cgroups,"
                " and this host mounts no cgroup v2 or v1 controller for them"
            )
        if self.hierarchy is not None:
            self.hierarchy.require(wanted, what)
        if limits.disk is not None and find_tool("mkfs.ext4") is None:
            raise DriverUnavailable(
                f"{what}: limits.disk needs mkfs.ext4 (apt-get install e2fsprogs)"
            )
        if limits.disk is not None and not os.path.exists("/dev/loop-control"):
            raise DriverUnavailable(f"{what}: limits.disk needs loop devices (modprobe loop)")

    def make_disk(self, paths: NodePaths, size: int) -> Generator[float, None, list[Command]]:
        """The node's writable file system of `size` bytes, mounted at paths.rw."""
        with open(paths.disk, "wb") as image:
            image.truncate(size)
        commands = []
        for argv in (
            # No journal and lazy init: a node's disk lives for one job and starts empty.
            [tool("mkfs.ext4"), "-q", "-F", "-O", "^has_journal", "-m", "0",
             "-E", "lazy_itable_init=1,lazy_journal_init=1", str(paths.disk)],
            [tool("mount"), "-o", "loop,nosuid,nodev", str(paths.disk), str(paths.rw)],
        ):  # fmt: skip
            command = Command(argv)
            commands.append(command)
            yield from command.wait()
        return commands

    def make_group(self, external_id: str, limits: NodeLimits) -> list[Path]:
        """The node's cgroup; the cgroup.procs files its first process joins."""
        wanted = group_limits(limits)
        if not wanted or self.hierarchy is None:
            return []
        return self.hierarchy.create(external_id, wanted)

    def command(self, procs: Sequence[Path], argv: Sequence[str]) -> list[str]:
        return cgroups.joining(procs, argv)

    def groups(self) -> set[str]:
        return self.hierarchy.names() if self.hierarchy is not None else set()

    def remove_group(self, external_id: str) -> bool:
        """False while a process is still in the group."""
        return self.hierarchy is None or self.hierarchy.remove(external_id)

    def faults(self, external_id: str) -> list[str]:
        kills = self.hierarchy.oom_kills(external_id) if self.hierarchy is not None else 0
        if not kills:
            return []
        return [f"{OUT_OF_MEMORY} (the kernel killed {kills} process(es) at the node's limit)"]
