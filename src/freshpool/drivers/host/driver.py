"""HostNodeDriver: the common base of the drivers whose nodes are processes on this host.

Such a node is named fp-<cluster>-<node id>, owns <state>/nodes/<that name>/ with a
runtime record in it (records.py), and its processes carry environment marks
(processes.py). The naming, the tracking of a create's steps, the undoing of a
failed create and the removal of a node dir live here once, so the local
(namespace) and qemu (VM) drivers cannot drift apart on them.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from freshpool.config import Provider
from freshpool.drivers.base import (
    CommandFailed,
    DoneOperation,
    Driver,
    DriverError,
    DriverUnavailable,
    Instance,
    NodeSpec,
    Operation,
    OutOfSpace,
    StepOperation,
    Tags,
)
from freshpool.drivers.host import processes
from freshpool.drivers.host.processes import MARK_CLUSTER, MARK_NODE, MARK_PROVIDER
from freshpool.drivers.host.records import NodeDir, RuntimeRecord
from freshpool.drivers.host.tools import Command, tool

# The cluster id is part of the external id, which names a directory (and a netns).
CLUSTER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
HOSTNAME_PATTERN = re.compile(rf"^(?=.{{1,64}}$){_LABEL}(\.{_LABEL})*$")
USER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")

PathsT = TypeVar("PathsT", bound=NodeDir)
RecordT = TypeVar("RecordT", bound=RuntimeRecord)


@dataclass
class NodeLaunch(Generic[PathsT, RecordT]):
    """What one create has made so far, so a failure can undo exactly that."""

    spec: NodeSpec
    external_id: str
    paths: PathsT
    # Keyword-only, so a driver's launch can add required fields after these.
    _: KW_ONLY
    record: RecordT | None = None
    commands: list[Command] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    step: str = ""
    started: float = field(default_factory=time.monotonic)
    # Milliseconds from the start of the create to the start of each step.
    timeline: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str) -> None:
        self.step = step
        self.timeline[step] = round((time.monotonic() - self.started) * 1000, 1)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, on one line, for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


LaunchT = TypeVar("LaunchT", bound=NodeLaunch[Any, Any])


class HostNodeDriver(Driver, Generic[LaunchT, RecordT]):
    """A driver whose nodes are processes on this host, each with its own node dir."""

    # A create is refused while the state dir's filesystem has less free space.
    min_free_bytes: int
    # What its nodes are called in messages: "<kind> nodes", "start a <noun>".
    kind: str
    noun: str
    # A create's step -> what the node was doing, for its error ("while starting it").
    steps: Mapping[str, str] = {}

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        super().__init__(provider, cluster, state_dir)
        if not CLUSTER_PATTERN.match(cluster):
            raise DriverUnavailable(
                f"cluster id {cluster!r} cannot name {self.kind} nodes: use up to 64 letters,"
                " digits, '.', '_' or '-'"
            )
        # Resolved, because mountinfo shows resolved paths.
        base = Path(os.path.realpath(state_dir))
        self.nodes_dir = base / "nodes"
        self.trash_dir = base / "trash"
        self._prefix = f"fp-{cluster}-"
        # Nodes started by this process: reaped here, or they would linger as zombies.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # External ids whose create operation is under way in this driver.
        self._creating: set[str] = set()
        self._sweeper: subprocess.Popen[bytes] | None = None
        self._sweep_trash()

    # ---- identity and layout

    def external_id_for(self, tags: Tags) -> str:
        # Also the node directory's name (and the local driver's netns name).
        return f"fp-{tags.cluster}-{tags.node_id}"

    def node_id_of(self, external_id: str) -> int | None:
        """The node id in an external id of this cluster, None if it is not one of ours."""
        rest = external_id.removeprefix(self._prefix)
        if rest == external_id or not rest.isdigit():
            return None
        return int(rest)

    def _node_dirs(self) -> list[str]:
        try:
            names = os.listdir(self.nodes_dir)
        except FileNotFoundError:
            return []
        return [n for n in names if self.node_id_of(n) is not None]

    def _marks(self, node_id: int | None = None) -> dict[str, str]:
        marks = {MARK_CLUSTER: self.cluster, MARK_PROVIDER: self.provider.name}
        if node_id is not None:
            marks[MARK_NODE] = str(node_id)
        return marks

    # ---- create

    def _check_spec(self, spec: NodeSpec) -> None:
        if spec.cluster != self.cluster:
            raise DriverError(f"node of cluster {spec.cluster!r} given to {self.cluster!r}")
        if not HOSTNAME_PATTERN.match(spec.hostname):
            raise DriverError(f"{spec.hostname!r} is not a valid hostname")
        if not USER_PATTERN.match(spec.user):
            raise DriverError(f"{spec.user!r} is not a valid user name")

    def _check_free_space(self, external_id: str) -> None:
        self.nodes_dir.mkdir(parents=True, exist_ok=True)
        free = free_bytes(self.nodes_dir)
        if free < self.min_free_bytes:
            raise OutOfSpace(
                f"{external_id}: only {free // 2**20} MiB free under {self.nodes_dir}"
                f" (at least {self.min_free_bytes // 2**20} MiB needed to start a {self.noun})"
            )

    def _build(self, launch: LaunchT) -> Generator[float, None, Instance]:
        """The steps of a create; a failure undoes what it made, then is raised."""
        try:
            yield from self._launch_steps(launch)
            launch.mark("ready")
        except Exception as exc:
            error = self._explain(exc, launch)
            for command in launch.commands:
                command.kill()
            try:
                yield from self._undo(launch)
            except Exception as cleanup:
                error.add_note(f"cleaning up after the failure also failed: {cleanup}")
            if error is exc:
                raise
            raise error from exc
        assert launch.record is not None
        instance = self._instance(launch.record, alive=True)
        instance.details["timeline_ms"] = launch.timeline
        return instance

    @abstractmethod
    def _launch_steps(self, launch: LaunchT) -> Generator[float, None, None]:
        """Make the node, marking each step on `launch`, until sshd answers."""

    def _explain(self, exc: Exception, launch: LaunchT) -> Exception:
        """The error a failed create reports, saying which step failed."""
        where = f"{launch.external_id} (while {self.steps.get(launch.step, launch.step)})"
        if isinstance(exc, OutOfSpace):
            return exc
        if _no_space(exc):
            return OutOfSpace(f"{where}: the disk holding {self.nodes_dir} is full: {exc}")
        if isinstance(exc, DriverError | TimeoutError):
            return exc
        return DriverError(f"{where}: {exc}")

    @abstractmethod
    def _undo(self, launch: LaunchT) -> Generator[float, None, None]:
        """Remove what a failed create made."""

    @abstractmethod
    def _instance(self, record: RecordT, alive: bool) -> Instance:
        """The instance a node's record describes."""

    def _listed(
        self,
        found: set[str],
        records: Mapping[str, RecordT | None],
        problems_of: Callable[[str, RecordT | None], list[str]],
    ) -> Iterator[tuple[str, Instance]]:
        """Each node found, as an instance whose `problems` say why it is not alive.

        One being built by this driver right now is no leftover, whatever it lacks.
        """
        for eid in sorted(found, key=lambda e: self.node_id_of(e) or 0):
            record = records.get(eid)
            problems = [] if eid in self._creating else problems_of(eid, record)
            if record is not None:
                instance = self._instance(record, alive=not problems)
            else:
                node_id = self.node_id_of(eid)
                tags = Tags(self.cluster, node_id) if node_id is not None else None
                instance = Instance(eid, tags, alive=not problems)
            instance.details["problems"] = problems
            instance.details["creating"] = eid in self._creating
            yield eid, instance

    def _adopt(self, launch: LaunchT) -> None:
        """Note a just-started node process here and in its record (found after a restart)."""
        assert launch.proc is not None and launch.record is not None
        self._children[launch.external_id] = launch.proc
        launch.record.pid = launch.proc.pid
        launch.record.pid_start = processes.start_time(launch.proc.pid)
        launch.record.save(launch.paths.record)

    # ---- delete

    def delete(self, external_id: str) -> Operation[None]:
        if self.node_id_of(external_id) is None:
            error = DriverError(f"{external_id!r} is not a node of cluster {self.cluster!r}")
            return DoneOperation(error=error)
        return StepOperation(self._remove(external_id))

    @abstractmethod
    def _remove(self, external_id: str) -> Generator[float, None, None]:
        """Remove every trace of a node, whatever state it is in; the steps of delete."""

    def _reap(self) -> None:
        for external_id, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[external_id]
        if self._sweeper is not None and self._sweeper.poll() is not None:
            self._sweeper = None

    def _sweep_trash(self) -> None:
        """Finish removals a previous launcher left half done."""
        try:
            leftovers = [str(self.trash_dir / n) for n in os.listdir(self.trash_dir)]
        except FileNotFoundError:
            return
        if leftovers:
            self._sweeper = subprocess.Popen(
                [tool("rm"), "-rf", "--one-file-system", "--", *leftovers],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def _kill(
        self,
        external_id: str,
        pids_of: Callable[[], set[int]],
        deadline: float,
        pause: float,
        survivors: str,
    ) -> Generator[float, None, None]:
        """SIGKILL the node's processes until a fresh scan (`pids_of`) finds none.

        `survivors` names them in the error if some outlive the deadline; its {}
        takes their pids.
        """
        while pids := pids_of():
            processes.kill(pids)
            while pids := {p for p in pids if processes.start_time(p) is not None}:
                self._reap()
                if time.monotonic() > deadline:
                    raise DriverError(f"{external_id}: {survivors.format(sorted(pids))}")
                yield pause
                pause = min(pause * 2, 0.1)
        self._reap()

    def _trash(self, path: Path, name: str) -> Generator[float, None, None]:
        # Renamed first, so a half-removed directory never looks like a node (or a base).
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        target = self.trash_dir / f"{name}.{secrets.token_hex(4)}"
        try:
            os.rename(path, target)
        except OSError:
            target = path
        # A node dir may hold a whole build: removing it must not block the loop.
        yield from Command([tool("rm"), "-rf", "--one-file-system", "--", str(target)]).wait()


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (28, 122)  # ENOSPC, EDQUOT
    if isinstance(exc, CommandFailed):
        return "No space left on device" in exc.stderr or "quota exceeded" in exc.stderr
    return False
