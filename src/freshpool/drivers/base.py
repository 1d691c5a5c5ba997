"""The driver interface: what the launcher asks of any place that runs nodes.

A driver is an adapter that returns non-blocking operations (see operations.py), so
one loop can advance thousands of launches without a thread each. It knows nothing
of the store. What it raises on purpose is a DriverError, which the rest of
freshpool reads as `Unavailable` (core/errors.py):

    DriverError             a provider call failed
    ├── DriverUnavailable   the driver cannot work on this host at all
    ├── OutOfSpace          the host's disk filled up while creating a node
    ├── QuotaExceeded       the provider refused a create: its quota is used up
    └── CommandFailed       a host tool the driver ran exited non-zero
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from freshpool.config import NodeLimits, Provider
from freshpool.core.errors import Unavailable
from freshpool.drivers.operations import (
    CommandResult,
    DoneOperation,
    FailedCommand,
    Operation,
    StepOperation,
)
from freshpool.drivers.ssh import CommandOperation, SshAccess

__all__ = [
    "CommandFailed",
    "CommandResult",
    "DoneOperation",
    "Driver",
    "DriverError",
    "DriverUnavailable",
    "FailedCommand",
    "ImageUpload",
    "Instance",
    "NodeSpec",
    "Operation",
    "OutOfSpace",
    "Quota",
    "QuotaExceeded",
    "SshAccess",
    "StepOperation",
    "Tags",
    "driver_class",
    "load_driver",
]


class DriverError(Unavailable):
    """A driver call failed; the message says what and why."""


class DriverUnavailable(DriverError):
    """The driver cannot work on this host at all (not root, a tool missing...)."""


class OutOfSpace(DriverError):
    """The host ran out of disk while creating a node."""


class QuotaExceeded(DriverError):
    """The provider refused a create because its quota is used up."""


class CommandFailed(DriverError):
    """A host tool a driver ran exited non-zero; its argv, status and stderr are kept."""

    def __init__(self, argv: Sequence[str], status: int, stderr: str) -> None:
        self.argv, self.status, self.stderr = list(argv), status, stderr
        detail = stderr.strip().replace("\n", "; ") or "no error output"
        super().__init__(f"{os.path.basename(argv[0])} failed (exit {status}): {detail}")


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
    # What the node may use (the label's limits over the provider's).
    limits: NodeLimits = field(default_factory=NodeLimits)

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
    # The labels that launch this image: a cloud uploads only for those that name no
    # cloud image of their own.
    labels: tuple[str, ...] = ()


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


class Driver(ABC):
    """One provider's adapter. Create and delete return operations; nothing blocks long."""

    # A cloud's API, not this host: `config validate` runs check() to ask it.
    remote: bool = False

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
        if access is None:
            return FailedCommand(DriverError(f"{external_id}: no way to reach the node"))
        return CommandOperation(access, command, timeout)

    def serves_without_upload(self, label: str) -> bool:
        """Whether a build with no upload row here yet serves this label too: the
        default upload's drivers run nodes from the layers on disk."""
        return type(self).upload_image is Driver.upload_image

    def upload_image(self, upload: ImageUpload) -> Operation[str]:
        """Make a build available here; the result is the provider's id for it.

        The default suits drivers that launch straight from the layers on disk.
        """
        return DoneOperation(result=upload.build_id)

    def delete_image(self, external_id: str) -> Operation[None]:
        """Remove an uploaded build from the provider. Deleting a missing one succeeds."""
        return DoneOperation()

    def reconcile(self, node_sets: Callable[[], Sequence[Sequence[str]]]) -> None:
        """Put the provider's own rules back as they should be, for leak cleanup.

        `node_sets()` reads the external ids of each node set in use; a driver calls
        it after looking at its rules, so a set handed out meanwhile is not missed.
        Drivers whose nodes have no per-set rules keep this default.
        """
        return None

    def faults(self, external_id: str) -> list[str]:
        """What went wrong inside a node that its job's history should say ("out of
        memory"); drivers that cannot tell keep this default."""
        return []

    def external_id_for(self, tags: Tags) -> str | None:
        """The id an instance with these tags has or would have, if the driver can tell."""
        return None


def driver_class(provider: Provider) -> type[Driver]:
    """The driver class named in the provider config, found by entry point."""
    found = {ep.name: ep for ep in entry_points(group="freshpool.drivers")}
    if provider.driver not in found:
        raise DriverUnavailable(
            f"provider {provider.name!r}: no driver named {provider.driver!r}"
            f" (installed: {', '.join(sorted(found)) or 'none'})"
        )
    cls: type[Driver] = found[provider.driver].load()
    return cls


def load_driver(provider: Provider, cluster: str, state_dir: Path) -> Driver:
    """Instantiate the driver named in the provider config."""
    return driver_class(provider)(provider, cluster, state_dir / "providers" / provider.name)
