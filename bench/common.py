"""Shared pieces of the benchmarks: pools to measure against, percentiles, results."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from freshpool import launcher as launching
from freshpool.config import Config, Image, load, parse
from freshpool.core.states import BuildState
from freshpool.dispatch.scheduler import Scheduler
from freshpool.drivers.base import load_driver
from freshpool.images.debootstrap import build_cached
from freshpool.store import Store

RESULTS = Path(__file__).parent / "results"
# Hand-out scenarios first let every client ask this many times untimed (ClosedLoop).
WARM_ROUNDS = 3
IMAGE_CACHE = Path(os.environ.get("FRESHPOOL_TEST_CACHE", "/var/tmp/freshpool-test-cache"))
# The same definition as the tests' image, so both share one cached build.
BENCH_IMAGE = Image(name="debian-bookworm", packages=["python3"], prefetch=["make"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class ClosedLoop:
    """Clients that each ask again as soon as answered, `total` times in all, timed
    after the first `warm` asks.

    The warm-up runs in the same flow, so what is timed is the steady state: not the
    first instant, when every client asks at once (the burst scenario times that),
    nor a server's first calls (caches, connections).
    """

    total: int
    warm: int = 0
    samples: list[float] = field(default_factory=list)
    issued: int = 0
    first: float = float("inf")
    last: float = 0.0

    def turn(self) -> bool | None:
        """The next ask: None when all have been issued, else whether it is timed."""
        if self.issued >= self.warm + self.total:
            return None
        self.issued += 1
        return self.issued > self.warm

    def timed(self, started: float, ended: float) -> None:
        self.first = min(self.first, started)
        self.last = max(self.last, ended)
        self.samples.append((ended - started) * 1000)

    def figures(self) -> dict[str, float]:
        return {
            "p50_ms": round(percentile(self.samples, 50), 2),
            "p99_ms": round(percentile(self.samples, 99), 2),
            "per_s": round(len(self.samples) / (self.last - self.first), 1),
            "mean_ms": round(statistics.fmean(self.samples), 2),
        }


def sim_providers(
    count: int,
    max_nodes: int,
    latency: float = 0.0,
    rate: float = 1000.0,
    parallel: int = 1000,
    persist: bool = False,
) -> str:
    """Sim providers; `persist` keeps their instances in a file, so that a launcher in
    another process (BenchPool.serving) sees the ones this process made."""
    return "".join(
        f"  - name: sim{i}\n    driver: sim\n    max-nodes: {max_nodes}\n"
        f"    max-parallel-launches: {parallel}\n    rate: {rate}\n    boot-timeout: 30\n"
        f"    sim: {{latency: {latency}, persist: {str(persist).lower()}}}\n"
        for i in range(count)
    )


# Every limit a node can have, small enough for 100 nodes on a 24 GiB host.
NODE_LIMITS = "{cpus: 0.5, memory: 192MiB, pids: 512, disk: 1GiB}"


def local_provider(max_nodes: int, subnet: str, limits: str = "") -> str:
    return (
        f"  - name: local\n    driver: local\n    max-nodes: {max_nodes}\n"
        f"    max-parallel-launches: {max_nodes}\n    rate: 1000\n"
        f"    network: {{subnet: {subnet}}}\n" + (f"    limits: {limits}\n" if limits else "")
    )


class BenchPool:
    """A store, drivers and a launcher on a fresh state dir, with one serving build."""

    def __init__(
        self,
        root: Path,
        name: str,
        providers: str,
        min_ready: int,
        image_dir: Path | None = None,
        extra: str = "",
    ) -> None:
        self.state_dir = root / name
        text = f"""
state-dir: {self.state_dir}
interval: 1.0
{extra}
providers:
{providers}
labels:
  - name: debian
    image: debian-bookworm
    min-ready: {min_ready}
    health-interval: 0
images:
  - name: debian-bookworm
"""
        self.config: Config = parse(text, f"bench-{name}.yaml")
        self.config_path = root / f"{name}.yaml"
        self.config_path.write_text(text)
        self.store = Store.open(self.state_dir)
        build_dir = image_dir or self.state_dir / "no-layers"
        manifest = json.loads((build_dir / "manifest.json").read_text()) if image_dir else None
        row = self.store.new_build("bench", "debian-bookworm", str(build_dir))
        self.store.build_transition(
            row.id, BuildState.BUILDING, BuildState.READY, "bench", manifest=manifest
        )
        self.drivers = {
            p.name: load_driver(p, self.store.cluster_id, self.state_dir)
            for p in self.config.providers
        }
        self.launcher = launching.build(
            self.config, self.store, self.drivers, images=False, publish=False
        )

    def ready(self) -> int:
        return sum(n for (_, _, state), n in self.store.node_counts().items() if state == "ready")

    def run_until(self, done: Callable[[], bool], timeout: float = 600) -> float:
        """Run the launcher as `serve` does (passes plus its own sleeps) until done()."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout

        def finished() -> bool:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.state_dir.name}: not done within {timeout} s")
            return done()

        self.launcher.drive(threading.Event(), finished)
        return time.perf_counter() - started

    @contextmanager
    def serving(self) -> Iterator[Scheduler]:
        """`freshpool serve`'s layout: the launcher (metrics publishing included) in a
        process of its own, the scheduler in this one (not started: the caller starts
        it on its event loop), linked as serve links them. Sim providers need
        `persist` for the launcher to see this process's instances."""
        from freshpool.serve.link import PASS, WAKE, pair

        link, theirs = pair()
        launcher = multiprocessing.get_context("spawn").Process(
            target=_launcher_main, args=(self.config_path, theirs), daemon=True
        )
        launcher.start()
        theirs.close()
        self.store.checkpoint_in_background()
        scheduler = Scheduler(self.config, self.store, short=lambda: link.send(WAKE))

        def follow() -> None:
            while message := link.receive():
                if message == PASS:
                    scheduler.launcher_passed()

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            deadline = time.monotonic() + 60
            while not scheduler.started.wait(0.1):
                if not launcher.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the launcher made no pass (exit code {launcher.exitcode})")
            yield scheduler
        finally:
            link.close()  # the launcher reads EOF and stops
            launcher.join(60)
            follower.join(10)

    def destroy(self) -> None:
        for driver in self.drivers.values():
            # All deletes at once: one at a time would take n x latency.
            ops = [driver.delete(i.external_id) for i in driver.list_instances()]
            deadline = time.monotonic() + 120
            while not all(op.done for op in ops) and time.monotonic() < deadline:
                for op in ops:
                    if not op.done and time.monotonic() >= op.not_before:
                        op.advance()
                time.sleep(0.005)
            teardown = getattr(driver, "teardown", None)
            if teardown:
                teardown()
        self.store.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _launcher_main(config_path: Path, end: socket.socket) -> None:
    """The launcher's process of BenchPool.serving (spawned: a fresh interpreter)."""
    from freshpool.serve.link import PASS, WAKE, Link

    config = load(config_path)
    store = Store.open(config.state_dir)
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    link = Link(end)
    launcher = launching.build(
        config, store, drivers, images=False, after_pass=[lambda: link.send(PASS)]
    )
    stop = threading.Event()

    def relay() -> None:
        while message := link.receive():
            if message == WAKE:
                launcher.wake()
        stop.set()  # the bench closed its end

    threading.Thread(target=relay, daemon=True).start()
    try:
        launcher.run(stop)
    finally:
        store.close()


def test_image() -> Path:
    return build_cached(BENCH_IMAGE, IMAGE_CACHE)


def host_reference_ms() -> float:
    """Milliseconds for a fixed piece of pure-Python work (median of five): how fast
    this host runs right now. On this project's CI kind of VM, runs of the same code
    vary by 15-40% from minute to minute; a figure that moved with this one moved
    with the host, not with freshpool."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i * i % 7
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


_ECHO = "import socket,sys\ns=socket.socket(fileno=int(sys.argv[1]))\nwhile b:=s.recv(1): s.send(b)"


def host_wakeup_us(rounds: int = 2000) -> float:
    """Microseconds for a one-byte round trip to another process (median): how fast
    this host wakes a waiting process on the other core right now, which the CPU
    reference does not show and every hand-out over HTTP pays several times."""
    ours, theirs = socket.socketpair()
    echo = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    times = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            ours.send(b"x")
            ours.recv(1)
            times.append((time.perf_counter() - started) * 1e6)
    finally:
        ours.close()
        echo.wait(10)
    return round(statistics.median(times), 1)


def host_now() -> tuple[float, float]:
    """(host_reference_ms, host_wakeup_us)."""
    return host_reference_ms(), host_wakeup_us()


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} cores, Linux {platform.release()}"
