"""The driver interface: what the launcher asks of any place that runs nodes.

A driver is an adapter that returns non-blocking operations, so one loop can advance
thousands of launches without a thread each. It knows nothing of the store.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from freshpool.config import Provider

T = TypeVar("T")


class DriverError(Exception):
    """A driver call failed; the message says what and why."""


class DriverUnavailable(DriverError):
    """The driver cannot work on this host at all (not root, a tool missing...)."""


class OutOfSpace(DriverError):
    """The host ran out of disk while creating a node."""


@dataclass(frozen=True)
class Tags:
    """What we put on every instance, so strays can be found after a crash."""

    cluster: str
    node_id: int
    build_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "freshpool-cluster": self.cluster,
            "freshpool-node": str(self.node_id),
            "freshpool-build": self.build_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Tags | None:
        try:
            return cls(
                data["freshpool-cluster"],
                int(data["freshpool-node"]),
                data.get("freshpool-build", ""),
            )
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class SshAccess:
    """Everything a client needs to reach a node over SSH; stored with the node."""

    host: str
    port: int
    user: str
    key_path: str
    known_hosts_path: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_path": self.key_path,
            "known_hosts_path": self.known_hosts_path,
        }


@dataclass(frozen=True)
class NodeSpec:
    """What to create: node identity, image build and where its layers are."""

    node_id: int
    cluster: str
    label: str
    hostname: str
    build_id: str
    # Read-only image layers, top first (the local driver stacks them with overlayfs).
    layers: tuple[Path, ...]
    user: str = "root"
    # What upload_image returned for this build on this provider (None: layers in place).
    image_external_id: str | None = None

    @property
    def tags(self) -> Tags:
        return Tags(self.cluster, self.node_id, self.build_id)


@dataclass(frozen=True)
class ImageUpload:
    """An image build to make available on a provider."""

    build_id: str
    image: str
    # Read-only layer directories, top first.
    layers: tuple[Path, ...]
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class Instance:
    """One machine as the provider sees it."""

    external_id: str
    tags: Tags | None
    # False when only leftovers remain (mounts, dirs, a dead process): still ours to delete.
    alive: bool = True
    access: SshAccess | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Quota:
    max_nodes: int


class Operation(ABC, Generic[T]):
    """A long-running driver action; `advance()` does a bounded step and returns."""

    done: bool = False
    result: T | None = None
    error: BaseException | None = None
    # Monotonic time before which advancing again is pointless.
    not_before: float = 0.0

    @abstractmethod
    def advance(self) -> None: ...

    def wait(self, timeout: float | None = None, step: float = 0.005) -> T:
        """Advance until done; for callers that may block (CLI, tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TimeoutError(f"operation not done after {timeout} s")
            if now >= self.not_before:
                self.advance()
            else:
                time.sleep(min(step, self.not_before - now))
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class StepOperation(Operation[T]):
    """An operation written as a generator.

    The generator yields a number of seconds to wait (0 for "call again soon")
    and returns its result. Each step between yields must be short.
    """

    def __init__(self, steps: Generator[float, None, T]) -> None:
        self._steps = steps

    def advance(self) -> None:
        if self.done:
            return
        try:
            pause = next(self._steps)
            self.not_before = time.monotonic() + max(0.0, pause)
        except StopIteration as stop:
            self.result, self.done = stop.value, True
        except Exception as exc:
            self.error, self.done = exc, True


class DoneOperation(Operation[T]):
    def __init__(self, result: T | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True

    def advance(self) -> None:
        return None


class CommandResult(Operation[int]):
    """A command running on a node: the result is its exit status, `output` its text."""

    output: str = ""


class FailedCommand(CommandResult):
    def __init__(self, error: BaseException) -> None:
        self.error, self.done = error, True

    def advance(self) -> None:
        return None


class Driver(ABC):
    """One provider's adapter. Create and delete return operations; nothing blocks long."""

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        # state_dir is this provider's own directory (<state-dir>/providers/<name>).
        self.provider = provider
        self.cluster = cluster
        self.state_dir = state_dir

    def check(self) -> None:
        """Raise DriverUnavailable, naming what is missing, if the driver cannot work here."""
        return None

    @abstractmethod
    def create(self, spec: NodeSpec) -> Operation[Instance]:
        """Start creating a node. If the operation fails, nothing of the node remains."""

    @abstractmethod
    def delete(self, external_id: str) -> Operation[None]:
        """Delete a node. Deleting something already gone succeeds."""

    @abstractmethod
    def list_instances(self) -> list[Instance]:
        """Every instance of this cluster on this provider, found by our tags."""

    def limits(self) -> Quota:
        return Quota(max_nodes=self.provider.max_nodes)

    def run_command(
        self, external_id: str, access: SshAccess | None, command: str, timeout: float
    ) -> CommandResult:
        """Start `command` on a node without blocking; its result is the exit status.

        The launcher tests and health-checks nodes through this. Drivers whose
        nodes answer SSH keep the default.
        """
        from freshpool.drivers.ssh import CommandOperation

        if access is None:
            return FailedCommand(DriverError(f"{external_id}: no way to reach the node"))
        return CommandOperation(access, command, timeout)

    def upload_image(self, upload: ImageUpload) -> Operation[str]:
        """Make a build available here; the result is the provider's id for it.

        The default suits drivers that launch straight from the layers on disk.
        """
        return DoneOperation(result=upload.build_id)

    def delete_image(self, external_id: str) -> Operation[None]:
        """Remove an uploaded build from the provider. Deleting a missing one succeeds."""
        return DoneOperation()

    def external_id_for(self, tags: Tags) -> str | None:
        """The id an instance with these tags has or would have, if the driver can tell."""
        return None


def load_driver(provider: Provider, cluster: str, state_dir: Path) -> Driver:
    """Instantiate the driver named in the provider config, found by entry point."""
    found = {ep.name: ep for ep in entry_points(group="freshpool.drivers")}
    if provider.driver not in found:
        raise DriverUnavailable(
            f"provider {provider.name!r}: no driver named {provider.driver!r}"
            f" (installed: {', '.join(sorted(found)) or 'none'})"
        )
    cls = found[provider.driver].load()
    return cls(provider, cluster, state_dir / "providers" / provider.name)
