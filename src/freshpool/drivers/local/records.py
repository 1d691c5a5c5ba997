"""Where a namespace node's files are, and what its runtime record holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from freshpool.drivers.host.records import NodeDir, RuntimeRecord

RECORD_VERSION = 1


@dataclass(frozen=True)
class NodePaths(NodeDir):
    """Where a node's files live: <state>/nodes/<external id>/..."""

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def rw(self) -> Path:
        """Where the node's writes go: its own disk when it has a size limit."""
        return self.dir / "rw"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.img"

    @property
    def upper(self) -> Path:
        return self.rw / "upper"

    @property
    def work(self) -> Path:
        return self.rw / "work"

    @property
    def log(self) -> Path:
        return self.dir / "node.log"


@dataclass
class NodeRecord(RuntimeRecord):
    """A namespace node's runtime file: its address and network, and its image layers."""

    ip: str
    netns: str
    veth: str
    bridge: str
    layers: list[str]
    version: int = field(default=RECORD_VERSION, kw_only=True)
