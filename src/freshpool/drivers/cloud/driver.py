"""What every cloud driver does the same way around its own API calls: a node's life
from its key to its pinned host key, a failed launch undone, deletes confirmed by
listing, and the quota's room applied on top of `max-nodes`.

A cloud driver supplies the calls (`_launch`, `_describe`, `_terminate`,
`_console`) and how its answers read (`_phase`, `_address`, `_details`); the
launches and deletes waiting on the cloud share one describe and one terminate call
per pass (calls.Batch).
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Generator
from enum import Enum
from pathlib import Path
from typing import Any

from freshpool.config import Provider
from freshpool.drivers.base import (
    Driver,
    DriverError,
    Instance,
    NodeSpec,
    Operation,
    Quota,
    SshAccess,
    StepOperation,
    Tags,
)
from freshpool.drivers.cloud.calls import Batch, Blocking
from freshpool.drivers.cloud.keys import NodeKeys, console_host_keys, make_keys

log = logging.getLogger("freshpool.drivers.cloud")
_CONSOLE_POLL = 5.0
_BOOT_POLL = 1.0
_DELETE_POLL = 2.0


class Phase(Enum):
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    GONE = "gone"


class CloudDriver(Driver):
    remote = True
    # What the cloud calls its instances, for messages ("server", "instance").
    noun = "instance"

    def __init__(self, provider: Provider, cluster: str, state_dir: Path,
                 host_key_checking: bool) -> None:  # fmt: skip
        super().__init__(provider, cluster, state_dir)
        self.host_key_checking = host_key_checking
        workers = min(16, provider.max_parallel_launches + 4)
        self.calls = Blocking(workers, f"{provider.driver}-{provider.name}")
        self._described: Batch[Any] = Batch(self.calls, self._describe, every=1.0)
        self._terminated: Batch[str] = Batch(self.calls, self._terminate, every=0.2)

    # ------------------------------------------------------------ the cloud's part

    @abstractmethod
    def _launch(self, spec: NodeSpec, public_key: str) -> Generator[float, None, str]:
        """Ask the cloud for the node's instance; its id."""

    @abstractmethod
    def _describe(self, ids: list[str]) -> dict[str, Any]:
        """Blocking: what the cloud says of each of `ids` it knows, by id."""

    @abstractmethod
    def _terminate(self, ids: list[str]) -> dict[str, str]:
        """Blocking: delete every one of `ids`; one already gone is no error."""

    @abstractmethod
    def _console(self, instance_id: str) -> str:
        """Blocking: the instance's console output."""

    @abstractmethod
    def _phase(self, found: Any) -> tuple[Phase, str]:
        """Where an instance the cloud described is in its life, and what it says why."""

    @abstractmethod
    def _address(self, found: Any) -> str | None:
        """The address the launcher reaches the instance at, once it has one."""

    def _details(self, found: Any) -> dict[str, Any]:
        return {}

    def _room(self) -> int | None:
        """Nodes of ours the cloud's quota leaves room for (None: unknown)."""
        return None

    def _lost(self, spec: NodeSpec) -> Generator[float, None, list[str]]:
        """Instances of a launch whose answer was lost, found by their tags."""
        return []
        yield 0.0  # a generator, for subclasses that ask the cloud

    # ------------------------------------------------------------ the interface

    def limits(self) -> Quota:
        fit = self._room()
        cap = self.provider.max_nodes
        return Quota(max_nodes=cap if fit is None else min(cap, fit))

    def create(self, spec: NodeSpec) -> Operation[Instance]:
        return StepOperation(self._create(spec))

    def delete(self, external_id: str) -> Operation[None]:
        return StepOperation(self._delete(external_id))

    def _create(self, spec: NodeSpec) -> Generator[float, None, Instance]:
        started = time.monotonic()
        keys = make_keys(self.state_dir / "keys", f"node-{spec.node_id}",
                         f"freshpool {self.cluster} node {spec.node_id}")  # fmt: skip
        instance_id: str | None = None
        try:
            instance_id = yield from self._launch(spec, keys.public)
            keys = _renamed(keys, instance_id)
            found, address = yield from self._until_running(instance_id, started)
            host_keys: list[str] = []
            if self.host_key_checking:
                host_keys = yield from self._host_keys(instance_id, started)
            keys.pin(address, host_keys)
        except Exception:
            # (Not when the operation is abandoned, GeneratorExit: nothing may be
            # waited for then; the leak sweep finds the instance by its tags.)
            yield from self._undo(spec, instance_id)
            keys.remove()
            raise
        access = SshAccess(address, 22, spec.user, str(keys.key), str(keys.known_hosts),
                           host_keys, strict_host_keys=self.host_key_checking)  # fmt: skip
        return Instance(instance_id, spec.tags, True, access, self._details(found))

    def _until_running(self, instance_id: str, started: float
                       ) -> Generator[float, None, tuple[Any, str]]:  # fmt: skip
        deadline = started + self.provider.boot_timeout
        where = f"provider {self.provider.name}: {self.noun} {instance_id}"
        while True:
            found = yield from self._described.get(instance_id)
            phase, why = self._phase(found) if found is not None else (Phase.STARTING, "")
            address = self._address(found) if phase is Phase.RUNNING else None
            if address:
                return found, address
            if phase in (Phase.FAILED, Phase.GONE):
                raise DriverError(f"{where} failed: {why or 'no reason given'}")
            if time.monotonic() > deadline:
                after = self.provider.boot_timeout
                raise DriverError(f"{where} not running with an address after {after:.0f} s "
                                  f"({why or phase.value})")  # fmt: skip
            yield _BOOT_POLL

    def _host_keys(self, instance_id: str, started: float) -> Generator[float, None, list[str]]:
        deadline = started + self.provider.boot_timeout
        while True:
            text = yield from self.calls.call(self._console, instance_id)
            if keys := console_host_keys(text):
                return keys
            if time.monotonic() > deadline:
                raise DriverError(
                    f"provider {self.provider.name}: {self.noun} {instance_id}: no SSH host "
                    f"key on its console after {self.provider.boot_timeout:.0f} s (the image "
                    "needs cloud-init, which prints it)"
                )
            yield _CONSOLE_POLL

    def _undo(self, spec: NodeSpec, instance_id: str | None) -> Generator[float, None, None]:
        """Leave nothing of a failed launch: its instance, or when the launch's answer
        was lost, whatever carries its tags."""
        try:
            ids = [instance_id] if instance_id else (yield from self._lost(spec))
            for each in ids:
                yield from self._terminated.get(each)
        except Exception as exc:  # the leak sweep finds it by its tags
            log.warning("provider %s: undoing node %s's launch failed: %s",
                        self.provider.name, spec.node_id, exc)  # fmt: skip

    def _delete(self, instance_id: str) -> Generator[float, None, None]:
        yield from self._terminated.get(instance_id)
        deadline = time.monotonic() + self.provider.delete_timeout
        while True:
            found = yield from self._described.get(instance_id)
            phase, why = self._phase(found) if found is not None else (Phase.GONE, "")
            if phase is Phase.GONE:
                break
            if time.monotonic() > deadline:
                after = self.provider.delete_timeout
                where = f"provider {self.provider.name}: {self.noun} {instance_id}"
                raise DriverError(f"{where} still there {after:.0f} s after its delete ({why})")
            yield _DELETE_POLL
        keys_of(self.state_dir / "keys", instance_id).remove()

    def _listed(self, instance_id: str, tags: dict[str, str], alive: bool,
                found: Any) -> Instance:  # fmt: skip
        try:
            ours: Tags | None = Tags(tags["freshpool-cluster"], int(tags["freshpool-node"]),
                                     tags.get("freshpool-build", ""))  # fmt: skip
        except (KeyError, ValueError):
            ours = None
        return Instance(instance_id, ours, alive=alive, details=self._details(found))

    def our_tags(self, tags: Tags, hostname: str, extra: dict[str, str]) -> dict[str, str]:
        """What every instance of ours carries, the provider's name among it, so two
        providers on one account never take each other's instances for leaks."""
        return {**extra, "Name": hostname, **tags.as_dict(),
                "freshpool-provider": self.provider.name}  # fmt: skip


def keys_of(directory: Path, name: str) -> NodeKeys:
    return NodeKeys(directory / f"{name}.key", directory / f"{name}.known_hosts")


def _renamed(keys: NodeKeys, name: str) -> NodeKeys:
    """The node's key files under its instance id, which delete is given."""
    moved = keys_of(keys.key.parent, name)
    keys.key.rename(moved.key)
    keys.key.with_suffix(".pub").rename(moved.key.with_suffix(".pub"))
    return moved
