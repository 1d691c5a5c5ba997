"""A host node's directory and runtime record: enough to adopt, reach or delete it after a
restart."""

from __future__ import annotations

import json
import os
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Self

from freshpool.drivers.base import Tags
from freshpool.drivers.host import processes

RECORD_FILE = "node.json"


@dataclass(frozen=True)
class NodeDir:
    """The files every node dir has: <state>/nodes/<external id>/...; drivers add theirs."""

    dir: Path

    @property
    def record(self) -> Path:
        return self.dir / RECORD_FILE

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"


@dataclass
class RuntimeRecord:
    """The node's runtime file: enough to adopt, reach or delete it after a restart.

    Drivers subclass it with their own fields; the bookkeeping fields are keyword-only
    so they can stay here while a subclass adds required fields of its own. Each
    driver gives `version` its own default: the record formats evolve separately.
    """

    external_id: str
    cluster: str
    node_id: int
    build_id: str
    provider: str
    hostname: str
    user: str
    _: KW_ONLY
    created: float
    pid: int | None = None
    # Start time of pid in clock ticks: tells our process from a later one with its pid.
    pid_start: int | None = None
    version: int = 1

    @classmethod
    def load(cls, path: Path) -> Self | None:
        try:
            data = json.loads(path.read_text())
            # Unknown keys are dropped, so a newer launcher's record still loads.
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        # Write then rename: a crash leaves the old record or the new one, never half.
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @property
    def tags(self) -> Tags:
        return Tags(self.cluster, self.node_id, self.build_id)

    def alive(self) -> bool:
        """Whether the process this record started still runs (not a reuse of its pid)."""
        return processes.is_alive(self.pid, self.pid_start)
