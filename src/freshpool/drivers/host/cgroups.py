"""Per-node CPU, memory and pids limits through the host's cgroups, v2 or v1.

Each node gets a group named after its external id under `freshpool/<scope>/` (the
scope is a provider's name), in each v1 controller's hierarchy or once in the unified
v2 one. The node's first process joins it before it runs anything, so everything the
node ever starts is inside, and the kernel counts and limits the lot. The groups are
found again by name, so a group left behind by a crash is a leftover that leak
cleanup removes like any other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from freshpool.drivers.base import DriverError, DriverUnavailable
from freshpool.drivers.host.tools import tool

BASE = "freshpool"
# The CFS period the CPU quota is a share of (the kernel's default).
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    """What one node may use; None: no limit of that kind."""

    cpus: float | None = None
    memory: int | None = None  # bytes
    pids: int | None = None

    def controllers(self) -> set[str]:
        wanted = {"cpu": self.cpus, "memory": self.memory, "pids": self.pids}
        return {name for name, value in wanted.items() if value is not None}

    def __bool__(self) -> bool:
        return bool(self.controllers())


class Hierarchy(ABC):
    """The cgroup file system(s) this host limits processes with."""

    version: str

    def __init__(self, controllers: dict[str, Path]) -> None:
        # Controller name -> the directory its groups are made in (ours, under BASE).
        self.bases = controllers

    @property
    def controllers(self) -> set[str]:
        return set(self.bases)

    def describe(self) -> str:
        where = sorted({str(p) for p in self.bases.values()})
        return f"cgroup {self.version} ({', '.join(sorted(self.bases))} in {', '.join(where)})"

    def require(self, limits: Limits, what: str) -> None:
        missing = limits.controllers() - self.controllers
        if missing:
            raise DriverUnavailable(
                f"{what}: this host's cgroups have no {', '.join(sorted(missing))} controller"
                f" (it has {self.describe()}); enable it, or drop that limit"
            )

    def dirs(self, name: str, limits: Limits | None = None) -> list[Path]:
        """The node's group directories (for the controllers `limits` needs, or all)."""
        wanted = self.controllers if limits is None else limits.controllers()
        return sorted({self.bases[c] / name for c in wanted})

    def create(self, name: str, limits: Limits) -> list[Path]:
        """Make the node's group with its limits; returns the cgroup.procs files to join.

        A refused write removes what was made, and the error names the file.
        """
        made: list[Path] = []
        try:
            self._prepare(limits)
            for directory in self.dirs(name, limits):
                directory.mkdir()
                made.append(directory)
            self._write_limits(name, limits)
        except OSError as exc:
            for directory in made:
                _rmdir(directory)
            raise DriverError(
                f"cannot set up cgroup {name} ({self.describe()}):"
                f" {exc.strerror or exc} ({exc.filename or ''})"
            ) from exc
        return [d / "cgroup.procs" for d in made]

    def names(self) -> set[str]:
        """The groups under ours that exist now."""
        found: set[str] = set()
        for base in set(self.bases.values()):
            with contextlib.suppress(FileNotFoundError):
                found.update(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
        return found

    def remove(self, name: str) -> bool:
        """Remove the node's group; False while processes are still in it."""
        return all(_rmdir(d) for d in self.dirs(name))

    @abstractmethod
    def oom_kills(self, name: str) -> int:
        """Processes the kernel killed in the node's group for want of memory."""

    @abstractmethod
    def _prepare(self, limits: Limits) -> None:
        """Make our base group(s), ready to hold node groups."""

    @abstractmethod
    def _write_limits(self, name: str, limits: Limits) -> None: ...


class CgroupV2(Hierarchy):
    version = "v2"

    def __init__(self, mount: Path, scope: str, controllers: Iterable[str]) -> None:
        self.mount = mount
        self.base = mount / BASE / scope
        super().__init__({c: self.base for c in controllers})

    def _prepare(self, limits: Limits) -> None:
        # A controller reaches a group only when every ancestor enables it for its
        # children; our groups above the nodes hold no processes, so they may.
        wanted = " ".join(f"+{c}" for c in sorted(limits.controllers()))
        if not wanted:
            return
        self.base.mkdir(parents=True, exist_ok=True)
        for group in (self.mount, self.mount / BASE, self.base):
            enabled = (group / "cgroup.subtree_control").read_text().split()
            if not limits.controllers() <= set(enabled):
                _write(group / "cgroup.subtree_control", wanted)

    def _write_limits(self, name: str, limits: Limits) -> None:
        group = self.base / name
        if limits.cpus is not None:
            _write(group / "cpu.max", f"{round(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if limits.memory is not None:
            _write(group / "memory.max", str(limits.memory))
            # Swap would let a node go past its limit (and slow the host down).
            if (group / "memory.swap.max").exists():
                _write(group / "memory.swap.max", "0")
        if limits.pids is not None:
            _write(group / "pids.max", str(limits.pids))

    def oom_kills(self, name: str) -> int:
        return _counter(self.base / name / "memory.events", "oom_kill")


class CgroupV1(Hierarchy):
    version = "v1"

    def _prepare(self, limits: Limits) -> None:
        for controller in limits.controllers():
            self.bases[controller].mkdir(parents=True, exist_ok=True)

    def _write_limits(self, name: str, limits: Limits) -> None:
        if limits.cpus is not None:
            cpu = self.bases["cpu"] / name
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(round(limits.cpus * CPU_PERIOD_US)))
        if limits.memory is not None:
            memory = self.bases["memory"] / name
            _write(memory / "memory.limit_in_bytes", str(limits.memory))
            # memory+swap equal to memory: no swap (the file exists with swap accounting).
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory))
        if limits.pids is not None:
            _write(self.bases["pids"] / name / "pids.max", str(limits.pids))

    def oom_kills(self, name: str) -> int:
        if "memory" not in self.bases:
            return 0
        return _counter(self.bases["memory"] / name / "memory.oom_control", "oom_kill")


WANTED = ("cpu", "memory", "pids")


def detect(scope: str, mountinfo: str = "/proc/self/mountinfo") -> Hierarchy | None:
    """Where to limit `scope`'s nodes: v2 if it has the most controllers, else v1."""
    v2: list[Path] = []
    v1: dict[str, Path] = {}
    with open(mountinfo, encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",") + fields[5].split(",")
            point = Path(fields[4])
            if fstype == "cgroup2":
                v2.append(point)
            elif fstype == "cgroup":
                for controller in WANTED:
                    if controller in options:
                        v1.setdefault(controller, point / BASE / scope)
    best: Hierarchy | None = None
    for mount in v2:
        try:
            available = set((mount / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        found = CgroupV2(mount, scope, sorted(available & set(WANTED)))
        if best is None or len(found.controllers) > len(best.controllers):
            best = found
    if v1 and (best is None or len(v1) > len(best.controllers)):
        best = CgroupV1(v1)
    return best if best is not None and best.controllers else None


# The kernel's OOM killer takes a node's process before the launcher's or the API's.
NODE_OOM_SCORE_ADJ = 500
SERVICE_OOM_SCORE_ADJ = -500


def joining(procs: Iterable[Path], argv: Sequence[str]) -> list[str]:
    """`argv`, run by a shell that first joins the groups and takes the node's OOM score.

    The shell exec()s `argv`, so its pid (the one the groups hold) is the node's; a
    write the cgroup file system refuses stops it before the node runs anything.
    """
    steps = [f"echo $$ > {shlex.quote(str(p))}" for p in procs]
    steps += [f"echo {NODE_OOM_SCORE_ADJ} > /proc/self/oom_score_adj", 'exec "$@"']
    return [tool("sh"), "-ec", "; ".join(steps), "sh", *argv]


def set_own_oom_score(value: int = SERVICE_OOM_SCORE_ADJ) -> None:
    """Make this process (and what it starts) a later pick for the OOM killer."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write(f"{value}\n")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise


def _counter(path: Path, key: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True
