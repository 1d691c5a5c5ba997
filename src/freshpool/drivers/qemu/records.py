"""Where a VM node's files are, and what its runtime record holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from freshpool.drivers.host.records import RECORD_FILE, NodeDir, RuntimeRecord

RECORD_VERSION = 1
# Held (flock) while a commit reads the node's overlay.
COMMIT_LOCK = "commit.lock"
# QEMU binds it relative to its working directory (the node dir): a unix socket path
# may not exceed 107 bytes, and state dirs can be deep.
QMP_SOCKET = "qmp.sock"


@dataclass(frozen=True)
class NodePaths(NodeDir):
    """Where a node's files live: <state>/nodes/<external id>/..."""

    @property
    def overlay(self) -> Path:
        return self.dir / "overlay.qcow2"

    @property
    def config_drive(self) -> Path:
        return self.dir / "config.tar"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"


@dataclass
class NodeRecord(RuntimeRecord):
    """A VM node's runtime file: its base, accelerator, size and SSH forward port."""

    base: str
    accel: str
    accel_reason: str
    vcpus: int
    memory: int
    port: int
    version: int = field(default=RECORD_VERSION, kw_only=True)


def node_accel(state_dir: Path, external_id: str) -> str | None:
    """The accelerator a node runs on, from its runtime file (for `freshpool list`)."""
    record = NodeRecord.load(Path(state_dir) / "nodes" / external_id / RECORD_FILE)
    return record.accel if record is not None else None
