"""`python -m bench`: time the core pool with real local nodes and compare with the last run.

Scenarios (real namespaces, overlayfs, sshd; nothing emulated):
  fill-N        time from an empty pool to N ready (SSH-tested) nodes
  image-to-ready  time for one node from launch to ready with the image on disk
  acquire       warm-pool hand-out latency (one store transaction), p50/p99
  run-true      `freshpool run -- true` end to end (process start, acquire, SSH, release)

Results go to bench/results/latest.json; the run before is kept as previous.json and
each figure is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from freshpool.config import Image, parse
from freshpool.drivers.base import load_driver
from freshpool.images.build import build_cached
from freshpool.service import handoff
from freshpool.service.launcher import Launcher
from freshpool.states import BuildState
from freshpool.store import Store

RESULTS = Path(__file__).parent / "results"
IMAGE_CACHE = Path(os.environ.get("FRESHPOOL_TEST_CACHE", "/var/tmp/freshpool-test-cache"))
BENCH_IMAGE = Image(name="debian-bookworm", packages=["python3"], prefetch=["make"])


def image_dir() -> Path:
    """The same cached image the tests use; built once if missing."""
    return build_cached(BENCH_IMAGE, IMAGE_CACHE)


class BenchPool:
    def __init__(self, root: Path, nodes: int, subnet: int) -> None:
        self.state_dir = root / f"state-{nodes}-{subnet}"
        self.config_path = root / f"bench-{nodes}-{subnet}.yaml"
        self.config_path.write_text(f"""
state-dir: {self.state_dir}
interval: 0.2
providers:
  - name: local
    max-nodes: {nodes}
    max-parallel-launches: {nodes}
    network: {{subnet: 10.216.{subnet}.0/24}}
labels:
  - name: debian
    image: debian-bookworm
    min-ready: {nodes}
images:
  - name: debian-bookworm
""")
        self.config = parse(self.config_path.read_text(), str(self.config_path))
        self.store = Store.open(self.state_dir)
        build = image_dir()
        row = self.store.new_build("bench", "debian-bookworm", str(build))
        self.store.build_transition(
            row.id,
            BuildState.BUILDING,
            BuildState.READY,
            "bench",
            manifest=json.loads((build / "manifest.json").read_text()),
        )
        self.drivers = {
            p.name: load_driver(p, self.store.cluster_id, self.state_dir)
            for p in self.config.providers
        }
        self.launcher = Launcher(self.config, self.store, self.drivers)

    def fill(self, timeout: float = 300) -> float:
        want = self.config.labels[0].min_ready
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while len(self.store.nodes(["ready"])) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pool did not fill to {want} within {timeout} s")
            self.launcher.reconcile()
            time.sleep(0.002)
        return time.perf_counter() - started

    def destroy(self) -> None:
        for driver in self.drivers.values():
            for instance in driver.list_instances():
                driver.delete(instance.external_id).wait(timeout=60)
            teardown = getattr(driver, "teardown", None)
            if teardown:
                teardown()
        self.store.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def bench_fill(root: Path, n: int, subnet: int) -> dict[str, float]:
    pool = BenchPool(root, n, subnet)
    try:
        return {f"fill_{n}_s": round(pool.fill(), 3)}
    finally:
        pool.destroy()


def bench_one_node(root: Path) -> dict[str, float]:
    samples = []
    pool = BenchPool(root, 1, 30)
    try:
        for _ in range(5):
            samples.append(pool.fill())
            (node,) = handoff.acquire(pool.config, pool.store, ["debian"], timeout=5)
            handoff.release(pool.store, node.id)
            while pool.store.nodes(["used", "deleting"]):
                pool.launcher.reconcile()
                time.sleep(0.002)
    finally:
        pool.destroy()
    return {
        "image_to_ready_p50_s": round(statistics.median(samples), 3),
        "image_to_ready_max_s": round(max(samples), 3),
    }


def bench_acquire(root: Path, n: int = 50) -> dict[str, float]:
    pool = BenchPool(root, n, 31)
    try:
        pool.fill()
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            handoff.acquire(pool.config, pool.store, ["debian"], timeout=5)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        pool.destroy()
    return {
        "acquire_p50_ms": round(percentile(samples, 50), 2),
        "acquire_p99_ms": round(percentile(samples, 99), 2),
    }


def bench_run_true(root: Path, runs: int = 10) -> dict[str, float]:
    pool = BenchPool(root, 3, 32)
    serve = subprocess.Popen(
        [sys.executable, "-m", "freshpool", "serve", "--no-build", "-c", str(pool.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples = []
    try:
        deadline = time.monotonic() + 120
        while len(pool.store.nodes(["ready"])) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "freshpool",
                    "run",
                    "-c",
                    str(pool.config_path),
                    "--label",
                    "debian",
                    "--",
                    "true",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            samples.append(time.perf_counter() - started)
            # Let the pool refill so every run finds a warm node, as a CI job would.
            while len(pool.store.nodes(["ready"])) < 3:
                time.sleep(0.02)
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        pool.destroy()
    return {
        "run_true_p50_s": round(statistics.median(samples), 3),
        "run_true_max_s": round(max(samples), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (fill 5, 20)")
    parser.add_argument("--no-save", action="store_true", help="do not write results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark runs real local nodes and needs root")
    sizes = (5, 20) if args.quick else (20, 50)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="freshpool-bench-") as tmp:
        root = Path(tmp)
        for i, n in enumerate(sizes):
            figures.update(bench_fill(root, n, 20 + i))
        figures.update(bench_one_node(root))
        figures.update(bench_acquire(root, 20 if args.quick else 50))
        figures.update(bench_run_true(root, 5 if args.quick else 10))
    report(figures, args.no_save)


def report(figures: dict[str, float], no_save: bool) -> None:
    latest = RESULTS / "latest.json"
    previous = json.loads(latest.read_text())["figures"] if latest.exists() else {}
    print(f"{'figure':<24}{'now':>10}{'previous':>10}{'change':>9}")
    for key, value in figures.items():
        before = previous.get(key)
        change = f"{(value - before) / before * 100:+.0f}%" if before else ""
        print(f"{key:<24}{value:>10}{before if before is not None else '-':>10}{change:>9}")
    if no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    if latest.exists():
        shutil.copy(latest, RESULTS / "previous.json")
    latest.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.node()} {os.cpu_count()} cores {platform.release()}",
                "figures": figures,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
