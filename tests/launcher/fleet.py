"""A fleet for the tests: a throwaway PostgreSQL database, simulated clouds kept in
files every launcher sees (as they would a real cloud), and real `freshpool serve`
processes, each with a state directory and launcher id of its own, each in a
process group of its own so a test can kill -9 one whole."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from freshpool.config import Config, parse
from freshpool.core.errors import AcquireTimeout
from freshpool.core.states import BuildState
from freshpool.dispatch import direct
from freshpool.store import Store
from tests.support import stop_group


class Fleet:
    def __init__(self, root: Path, url: str, clouds: int, label: str, ttl: float) -> None:
        self.root = root
        self.url = url
        self.clouds = [f"cloud-{i}" for i in range(clouds)]
        self.label = label
        self.ttl = ttl
        self.launchers: dict[str, subprocess.Popen[bytes]] = {}
        self.store = Store(url)
        build = self.store.new_build("img-1", "img", str(root / "no-layers"))
        self.store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "sim")

    def config_text(self, name: str, api: bool = False, quiet: bool = False) -> str:
        """`name`'s config; `quiet`: its launcher passes only when woken (a change in
        the store, an operation's next step), not on timers of its own."""
        providers = "".join(
            f"  - {{name: {cloud}, driver: sim, max-nodes: 10, boot-timeout: 5,"
            f" sim: {{latency: 0.05, path: {self.root / (cloud + '.db')}}}}}\n"
            for cloud in self.clouds
        )
        return f"""
state-dir: {self.root / name}
database-url: "{self.url}"
launcher-id: {name}
lease-ttl: {self.ttl}
interval: {600 if quiet else 0.2}
cleanup-interval: {600 if quiet else 1}
api: {{{"port: 0" if api else "enabled: false"}}}
providers:
{providers}
labels:
  - {{name: debian, image: img, health-interval: 0, {self.label}}}
images: [{{name: img}}]
"""

    def config(self, name: str) -> Config:
        return parse(self.config_text(name), f"{name}.yaml")

    def start(
        self, name: str, api: bool = False, quiet: bool = False, source: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start launcher `name`; with `api`, its API process too (its URL in
        `api_url(name)` once it listens); `quiet` as in `config_text`; `source`, the
        `src` directory of another freshpool version to run instead of this one."""
        path = self.root / f"{name}.yaml"
        path.write_text(self.config_text(name, api, quiet))
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.launchers[name] = subprocess.Popen(
            [sys.executable, "-m", "freshpool", "serve", "--no-build", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(source)} if source else None,
        )
        log.close()
        return self.launchers[name]

    def start_api(self, name: str) -> None:
        """Start `serve --api-only` as `name` (its URL in `api_url(name)` once it
        listens); stopped and killed as a launcher is."""
        path = self.root / f"{name}.yaml"
        path.write_text(self.config_text(name, api=True))
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.launchers[name] = subprocess.Popen(
            [sys.executable, "-m", "freshpool", "serve", "--api-only", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def api_url(self, name: str) -> str | None:
        found = self.root / name / "api.url"
        return found.read_text().strip() if found.exists() else None

    def kill(self, name: str) -> None:
        """kill -9 the launcher's whole process group: nothing of it runs on."""
        process = self.launchers.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for process in self.launchers.values():
            stop_group(process, grace=30)
        self.launchers.clear()
        self.store.close()

    def owners(self) -> dict[str, str]:
        """provider -> launcher, for every lease not yet expired."""
        now = time.time()
        return {
            p: lease.owner for p, lease in self.store.leases().items() if lease.expires_at > now
        }

    def instances(self) -> Counter[str]:
        """Every simulated instance, by external id (a count above 1 would be a bug)."""
        found: Counter[str] = Counter()
        for cloud in self.clouds:
            path = self.root / f"{cloud}.db"
            if path.exists():
                with sqlite3.connect(path) as db:
                    found.update(row[0] for row in db.execute("SELECT external_id FROM instances"))
        return found

    def launched(self) -> int:
        """How many nodes were ever launched (their first history line)."""
        return sum(1 for _ in self._events("SELECT 1 FROM node_events WHERE from_state IS NULL"))

    def handed_out(self) -> Counter[int]:
        """How many times each node went to a job."""
        rows = self._events("SELECT node_id FROM node_events WHERE to_state = 'in-use'")
        return Counter(node for (node,) in rows)

    def _events(self, query: str) -> list[tuple[int, ...]]:
        from sqlalchemy import text

        with self.store.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]

    def describe(self) -> str:
        """The nodes and the instances, for a failure's message."""
        rows = [(r.id, r.provider, r.state, r.external_id, r.reason) for r in self.store.nodes()]
        requests = [
            (r.id, r.state, r.reason)
            for r in (self.store.request(n.request_id) for n in self.store.nodes(["in-use"]))
        ]
        return (
            f"nodes {rows}; their requests {requests}; instances {dict(self.instances())};"
            f" leases {self.owners()}"
        )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


class Jobs:
    """CI jobs on a thread: take a node, give it back, again, until stopped; every
    node any job got is kept, to show none went to two."""

    def __init__(self, fleet: Fleet) -> None:
        self.config = fleet.config("client")
        self.store = Store(fleet.url)
        self.got: list[int] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                (node,) = direct.acquire(self.config, self.store, ["debian"], timeout=3.0)
            except AcquireTimeout:  # no node in time
                continue
            self.got.append(node.id)
            try:
                self.store.release_set(node.id, "job done")
            except Exception as exc:
                self.errors.append(f"release of node {node.id}: {exc!r}")

    def stop(self) -> list[int]:
        self.done.set()
        self.thread.join()
        # Every acquire that gave up cancelled its request: no node is in use with
        # nobody holding it.
        stray = [n.id for n in self.store.nodes(["in-use"])]
        self.store.close()
        assert not stray, f"nodes {stray} in use with no job holding them"
        return self.got


def settled(fleet: Fleet, ready: int) -> bool:
    """The pool is full and quiet: `ready` nodes, nothing else, and each live node's
    instance and only those at the clouds."""
    rows = fleet.store.nodes()
    instances = fleet.instances()
    return (
        [r.state for r in rows] == ["ready"] * ready
        and set(instances) == {r.external_id for r in rows}
        and max(instances.values(), default=1) == 1
    )


def wait_for(
    check: Callable[[], bool], timeout: float, what: str, seen: Callable[[], str] = str
) -> float:
    """Poll `check` until true; the monotonic time it became so. On a timeout the
    failure says what `seen` saw."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {seen()}"
        time.sleep(0.05)
    return time.monotonic()
