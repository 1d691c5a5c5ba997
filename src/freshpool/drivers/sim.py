"""The `sim` driver: a simulated cloud for fault injection and benchmarks.

It implements the whole driver interface (tags, listing, quota, commands) over a
small SQLite file, so instances survive a killed launcher exactly as a real cloud's
would, and cleanup and quota logic run unchanged against it. Every fault is drawn
from a random stream seeded by the config, so a failing run can be replayed:

- latency: seconds each API call takes (non-blocking: operations yield);
- failure-rate: a call fails; a failed create may still leave an instance behind
  (`leak-on-failure`), as real clouds do;
- timeout-rate: a call hangs past the provider's boot timeout, then errors;
  the instance is created anyway;
- quota: the cloud refuses creates beyond this many instances;
- lie-rate: a delete reports success while the instance stays.

It is never the proof that a feature works on real machines; that is what the
local and QEMU drivers' tests are for.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Generator
from pathlib import Path

from freshpool.config import Provider
from freshpool.drivers.base import (
    CommandResult,
    Driver,
    DriverError,
    Instance,
    NodeSpec,
    Operation,
    Quota,
    QuotaExceeded,
    SshAccess,
    StepOperation,
    Tags,
)


class _Store:
    """The simulated cloud's inventory: one SQLite file shared by every process."""

    def __init__(self, path: Path | None) -> None:
        target = str(path) if path else ":memory:"
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            target, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._lock = threading.Lock()
        if path:
            self._wal()
            # A simulated cloud need not outlive the host, only its processes (which
            # WAL survives at this level); a sync per instance would be the cloud's
            # latency charged to the launcher, whose thread makes the calls.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS instances (external_id TEXT PRIMARY KEY,"
            " cluster TEXT NOT NULL, provider TEXT NOT NULL, node_id INTEGER NOT NULL,"
            " build TEXT NOT NULL, created_at REAL NOT NULL)"
        )

    def _wal(self) -> None:
        """WAL, once for the file: it persists, so later openers only read the mode.
        Switching can fail at once with "database is locked" while other processes
        hold the file (SQLite's busy timeout does not cover it), so it is retried."""
        deadline = time.monotonic() + 30
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
                if mode != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def add(self, external_id: str, tags: Tags, provider: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?)",
                (external_id, tags.cluster, provider, tags.node_id, tags.build_id, time.time()),
            )

    def remove(self, external_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM instances WHERE external_id = ?", (external_id,))

    def exists(self, external_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM instances WHERE external_id = ?", (external_id,)
            ).fetchone()
        return row is not None

    def count(self, provider: str) -> int:
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT count(*) FROM instances WHERE provider = ?", (provider,)
                ).fetchone()[0]
            )

    def listing(self, cluster: str, provider: str) -> list[tuple[str, int, str]]:
        with self._lock:
            return self._db.execute(
                "SELECT external_id, node_id, build FROM instances"
                " WHERE cluster = ? AND provider = ? ORDER BY node_id",
                (cluster, provider),
            ).fetchall()


class SimDriver(Driver):
    """A simulated cloud whose every fault is drawn from a stream seeded by the config."""

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        super().__init__(provider, cluster, state_dir)
        self.settings = provider.sim
        path = self.settings.path or (state_dir / "sim.db" if self.settings.persist else None)
        self._cloud = _Store(path)
        self._calls = 0
        self._rng_lock = threading.Lock()

    # ------------------------------------------------------------ randomness

    def _dice(self) -> random.Random:
        """A fresh stream per call: the same seed and call order give the same faults."""
        with self._rng_lock:
            self._calls += 1
            return random.Random(f"{self.settings.seed}:{self.provider.name}:{self._calls}")

    def _latency(self, rng: random.Random) -> float:
        base = self.settings.latency
        return rng.uniform(base * 0.5, base * 1.5) if base > 0 else 0.0

    def _hang(self) -> Generator[float, None, None]:
        yield self.provider.boot_timeout + 1.0
        raise TimeoutError(f"provider {self.provider.name}: the API call timed out")

    # ------------------------------------------------------------ interface

    def external_id_for(self, tags: Tags) -> str:
        return f"sim-{tags.cluster}-{tags.node_id}"

    def limits(self) -> Quota:
        cap = self.provider.max_nodes
        if self.settings.quota is not None:
            cap = min(cap, self.settings.quota)
        return Quota(max_nodes=cap)

    def create(self, spec: NodeSpec) -> Operation[Instance]:
        return StepOperation(self._create(spec, self._dice()))

    def _create(self, spec: NodeSpec, rng: random.Random) -> Generator[float, None, Instance]:
        external_id = self.external_id_for(spec.tags)
        roll = rng.random()
        latency = self._latency(rng)
        if latency:
            yield latency
        s = self.settings
        if s.quota is not None and self._cloud.count(self.provider.name) >= s.quota:
            raise QuotaExceeded(
                f"provider {self.provider.name}: quota of {s.quota} instances reached"
            )
        if roll < s.failure_rate:
            if rng.random() < s.leak_on_failure:
                self._cloud.add(external_id, spec.tags, self.provider.name)
            raise DriverError(
                f"provider {self.provider.name}: create of {external_id} failed (simulated)"
            )
        self._cloud.add(external_id, spec.tags, self.provider.name)
        if roll < s.failure_rate + s.timeout_rate:
            yield from self._hang()
        return self._instance(external_id, spec.tags)

    def delete(self, external_id: str) -> Operation[None]:
        return StepOperation(self._delete(external_id, self._dice()))

    def _delete(self, external_id: str, rng: random.Random) -> Generator[float, None, None]:
        roll = rng.random()
        latency = self._latency(rng)
        if latency:
            yield latency
        s = self.settings
        if roll < s.failure_rate:
            raise DriverError(
                f"provider {self.provider.name}: delete of {external_id} failed (simulated)"
            )
        if roll < s.failure_rate + s.timeout_rate:
            yield from self._hang()
        if roll < s.failure_rate + s.timeout_rate + s.lie_rate:
            return  # reports success; the instance stays for leak cleanup to find
        self._cloud.remove(external_id)

    def list_instances(self) -> list[Instance]:
        return [
            self._instance(external_id, Tags(self.cluster, node_id, build))
            for external_id, node_id, build in self._cloud.listing(self.cluster, self.provider.name)
        ]

    def run_command(
        self, external_id: str, access: SshAccess | None, command: str, timeout: float
    ) -> CommandResult:
        return _SimCommand(self, external_id, self._dice())

    def _instance(self, external_id: str, tags: Tags) -> Instance:
        access = SshAccess(
            host=f"{external_id}.sim.invalid",
            port=22,
            user="root",
            key_path="",
            known_hosts_path="",
        )
        return Instance(external_id, tags, alive=True, access=access, details={"simulated": True})


class _SimCommand(StepOperation[int], CommandResult):
    def __init__(self, driver: SimDriver, external_id: str, rng: random.Random) -> None:
        super().__init__(self._steps(driver, external_id, rng))

    def _steps(
        self, driver: SimDriver, external_id: str, rng: random.Random
    ) -> Generator[float, None, int]:
        roll = rng.random()
        latency = driver._latency(rng)
        if latency:
            yield latency
        if not driver._cloud.exists(external_id):
            self.output = f"{external_id}: no such instance"
            return 255
        if roll < driver.settings.command_failure_rate:
            self.output = "simulated command failure"
            return 1
        return 0
