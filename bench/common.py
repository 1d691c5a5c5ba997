"""Shared pieces of the benchmarks: pools to measure against, percentiles, results."""

from __future__ import annotations

import json
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from freshpool.config import Config, Image, parse
from freshpool.drivers.base import load_driver
from freshpool.images.build import build_cached
from freshpool.service.launcher import Launcher
from freshpool.service.scheduler import Scheduler
from freshpool.states import BuildState
from freshpool.store import Store

RESULTS = Path(__file__).parent / "results"
IMAGE_CACHE = Path(os.environ.get("FRESHPOOL_TEST_CACHE", "/var/tmp/freshpool-test-cache"))
# The same definition as the tests' image, so both share one cached build.
BENCH_IMAGE = Image(name="debian-bookworm", packages=["python3"], prefetch=["make"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def sim_providers(
    count: int, max_nodes: int, latency: float = 0.0, rate: float = 1000.0, parallel: int = 1000
) -> str:
    return "".join(
        f"  - name: sim{i}\n    driver: sim\n    max-nodes: {max_nodes}\n"
        f"    max-parallel-launches: {parallel}\n    rate: {rate}\n    boot-timeout: 30\n"
        f"    sim: {{latency: {latency}, persist: false}}\n"
        for i in range(count)
    )


def local_provider(max_nodes: int, subnet: str) -> str:
    return (
        f"  - name: local\n    driver: local\n    max-nodes: {max_nodes}\n"
        f"    max-parallel-launches: {max_nodes}\n    rate: 1000\n"
        f"    network: {{subnet: {subnet}}}\n"
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
        self.launcher = Launcher(self.config, self.store, self.drivers)

    def ready(self) -> int:
        return sum(n for (_, _, state), n in self.store.node_counts().items() if state == "ready")

    def run_until(self, done: Callable[[], bool], timeout: float = 600) -> float:
        """Run the launcher as `serve` does (passes plus its own sleeps) until done()."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        stop = threading.Event()
        watcher = self.store.change_watcher()
        try:
            while not done():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.state_dir.name}: not done within {timeout} s")
                self.launcher.reconcile()
                self.launcher._sleep(stop, watcher.changed)
        finally:
            watcher.close()
        return time.perf_counter() - started

    @contextmanager
    def serving(self) -> Iterator[Scheduler]:
        """The launcher and the scheduler on threads of their own, as `serve` runs them."""
        self.store.checkpoint_in_background()
        scheduler = Scheduler(self.config, self.store, short=self.launcher.wake)
        self.launcher.add_pass(scheduler.launcher_pass)
        stop = threading.Event()
        threads = [
            threading.Thread(target=self.launcher.run, args=(stop,), daemon=True),
            threading.Thread(target=scheduler.run, args=(stop,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            if not scheduler.started.wait(30):
                raise RuntimeError("the launcher made no pass within 30 s")
            yield scheduler
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

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


def test_image() -> Path:
    return build_cached(BENCH_IMAGE, IMAGE_CACHE)


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} cores, Linux {platform.release()}"
