"""The benchmark scenarios; each returns {figure name: value}."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

from bench.common import (
    NODE_LIMITS,
    WARM_ROUNDS,
    BenchPool,
    ClosedLoop,
    local_provider,
    percentile,
    sim_providers,
    test_image,
)
from freshpool.dispatch import direct
from freshpool.dispatch.scheduler import Scheduler
from freshpool.store import NewRequest

Figures = dict[str, float]


def handoff_in_process(
    root: Path, clients: tuple[int, ...] = (1, 10, 50), hand_outs: int = 3000
) -> Figures:
    """Warm pool, many clients calling acquire at once: latency and throughput."""
    figures: Figures = {}
    for count in clients:
        figures.update(_handoff(root, count, hand_outs))
    return figures


def _handoff(root: Path, count: int, total: int) -> Figures:
    """`count` clients ask at once, each again as soon as it has its node, through the
    scheduler's asyncio entry (the one the API's handlers await), in `serve`'s layout:
    the front's scheduler in this process, the launcher and observer in their own.

    The pool is at its provider's max-nodes, so the launcher makes its passes (woken
    by the hand-outs) but launches no replacements: this times the hand-out, not
    the refill (fill and burst time that).
    """
    loop = ClosedLoop(total, warm=WARM_ROUNDS * count)
    nodes = loop.warm + total
    pool = BenchPool(root, f"handoff-{count}", sim_providers(1, nodes, persist=True), nodes)

    async def client(scheduler: Scheduler) -> None:
        while (timed := loop.turn()) is not None:
            started = time.perf_counter()
            ask = NewRequest(("debian",), requestor="bench", deadline=time.time() + 10)
            row, nodes = await scheduler.submit(ask)
            if timed:
                loop.timed(started, time.perf_counter())
            if row.state != "fulfilled" or len(nodes) != 1:
                raise RuntimeError(f"request {row.id} is {row.state}: {row.reason}")

    async def clients(scheduler: Scheduler) -> None:
        scheduler.start()
        try:
            await asyncio.gather(*(client(scheduler) for _ in range(count)))
        finally:
            await scheduler.stop()

    try:
        pool.run_until(lambda: pool.ready() >= nodes)
        with pool.serving() as scheduler:
            asyncio.run(clients(scheduler))
    finally:
        pool.destroy()
    got = loop.figures()
    return {f"handoff_c{count}_{name}": got[name] for name in ("p50_ms", "p99_ms", "per_s")}


def fill_sim(root: Path, sizes: tuple[int, ...] = (50, 500)) -> Figures:
    figures: Figures = {}
    for n in sizes:
        pool = BenchPool(root, f"fill-sim-{n}", sim_providers(1, n), n)
        try:
            figures[f"fill_sim_{n}_s"] = round(
                pool.run_until(lambda p=pool, k=n: p.ready() >= k), 3
            )
        finally:
            pool.destroy()
    return figures


def fill_local(root: Path, sizes: tuple[int, ...] = (20, 50, 100), limits: str = "") -> Figures:
    """Time to n ready real nodes (the network policy is always on; `limits`: each
    node's cgroup and disk limits too, figures named fill_limited_*)."""
    figures: Figures = {}
    image = test_image()
    name = "fill_limited" if limits else "fill_local"
    for i, n in enumerate(sizes):
        provider = local_provider(n, f"10.216.{20 + i + (5 if limits else 0)}.0/24", limits)
        pool = BenchPool(root, f"{name}-{n}", provider, n, image_dir=image)
        try:
            figures[f"{name}_{n}_s"] = round(
                pool.run_until(lambda p=pool, k=n: p.ready() >= k, timeout=300), 3
            )
        finally:
            pool.destroy()
    return figures


def fill_limited(root: Path, sizes: tuple[int, ...] = (20, 100)) -> Figures:
    return fill_local(root, sizes, NODE_LIMITS)


def image_to_ready(root: Path, rounds: int = 5) -> Figures:
    """One real node from an image on disk to ready (SSH + ready command)."""
    pool = BenchPool(
        root, "one-local", local_provider(2, "10.216.30.0/24"), 1, image_dir=test_image()
    )
    samples = []
    try:
        for _ in range(rounds):
            samples.append(pool.run_until(lambda: pool.ready() >= 1))
            (node,) = direct.acquire(pool.config, pool.store, ["debian"], timeout=5)
            pool.store.release_set(node.id, "released")
            pool.run_until(lambda: not pool.store.nodes(["used", "deleting"]))
    finally:
        pool.destroy()
    return {
        "image_to_ready_p50_s": round(statistics.median(samples), 3),
        "image_to_ready_max_s": round(max(samples), 3),
    }


def run_true(root: Path, runs: int = 10) -> Figures:
    """`freshpool run -- true` end to end against a served warm pool of real nodes."""
    pool = BenchPool(
        root, "run-true", local_provider(4, "10.216.31.0/24"), 3, image_dir=test_image()
    )
    pool.store.close()
    serve = subprocess.Popen(
        [sys.executable, "-m", "freshpool", "serve", "--no-build", "-c", str(pool.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples = []
    try:
        from freshpool.store import Store

        store = Store.open(pool.state_dir)
        pool.store = store
        deadline = time.monotonic() + 120
        while len(store.nodes(["ready"])) < 3 and time.monotonic() < deadline:
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
                stderr=subprocess.DEVNULL,
            )
            samples.append(time.perf_counter() - started)
            while len(store.nodes(["ready"])) < 3:
                time.sleep(0.02)
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        pool.destroy()
    return {
        "run_true_p50_s": round(statistics.median(samples), 3),
        "run_true_max_s": round(max(samples), 3),
    }


def burst(root: Path, warm: int = 50, requests: int = 200) -> Figures:
    """200 requests at once against a 50-node warm pool (sim, zero latency).

    Requests go to the scheduler as API requests do, all submitted at once: it
    orders and fulfils them while the launcher refills the pool.
    """
    pool = BenchPool(root, "burst", sim_providers(1, requests + warm, persist=True), warm)
    try:
        pool.run_until(lambda: pool.ready() >= warm)
        with pool.serving() as scheduler:
            ids, wall, refill = asyncio.run(_burst(pool, scheduler, warm, requests))
        done = [pool.store.request(i) for i in ids]
        waits = [r.fulfilled_at - r.created_at for r in done if r.fulfilled_at]
        fulfilled = len(waits)
    finally:
        pool.destroy()
    return {
        "burst_wall_s": round(wall, 3),
        "burst_fulfilled": fulfilled,
        "burst_p50_wait_s": round(percentile(waits, 50), 3),
        "burst_p90_wait_s": round(percentile(waits, 90), 3),
        "burst_refill_s": round(refill, 3),
    }


async def _burst(
    pool: BenchPool, scheduler: Scheduler, warm: int, requests: int
) -> tuple[list[int], float, float]:
    scheduler.start()
    started = time.perf_counter()
    deadline = time.time() + 60
    asked = [
        scheduler.submit(NewRequest(("debian",), requestor="bench", deadline=deadline))
        for _ in range(requests)
    ]
    ids = [row.id for row, _ in await asyncio.gather(*asked)]
    while pool.store.pending_requests():
        await asyncio.sleep(0.002)
    wall = time.perf_counter() - started
    while pool.ready() < warm:
        await asyncio.sleep(0.005)
    refill = time.perf_counter() - started
    await scheduler.stop()
    return ids, wall, refill


def scale(
    root: Path,
    sizes: tuple[int, ...] = (1000, 5000, 10000),
    providers: int = 20,
    latency: float = 1.0,
    rate: float = 10.0,
) -> Figures:
    """Many nodes over many slow, rate-limited sim providers: does our loop keep up?

    Runs in a process of its own, as serve's launcher does, so that its memory is the
    launcher's and not what earlier scenarios loaded (the in-process hand-out loads
    the API's modules).
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as worker:
        return worker.submit(_scale_sizes, root, sizes, providers, latency, rate).result()


def _scale_sizes(
    root: Path, sizes: tuple[int, ...], providers: int, latency: float, rate: float
) -> Figures:
    figures: Figures = {}
    for n in sizes:
        figures.update(_scale(root, n, providers, latency, rate))
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def _scale(root: Path, n: int, providers: int, latency: float, rate: float) -> Figures:
    process = psutil.Process()
    per = -(-n // providers)
    pool = BenchPool(
        root,
        f"scale-{n}",
        sim_providers(providers, per, latency, rate, parallel=per),
        n,
        extra="cleanup-interval: 3600\n",
    )
    durations: list[float] = []
    original = pool.launcher.pass_once

    def timed() -> None:
        t = time.perf_counter()
        original()
        durations.append(time.perf_counter() - t)

    try:
        pool.launcher.pass_once = timed  # type: ignore[method-assign]
        cpu = process.cpu_times()
        wall = pool.run_until(lambda: pool.ready() >= n, timeout=3600)
        now = process.cpu_times()
        cpu_used = now.user + now.system - cpu.user - cpu.system
        # Steady state: passes over a full pool with nothing to launch.
        steady: list[float] = []
        for _ in range(20):
            t = time.perf_counter()
            original()
            steady.append(time.perf_counter() - t)
        rss = process.memory_info().rss / 2**20
    finally:
        pool.destroy()
    # Each node needs a create and a test call, `latency` each: the best possible
    # wall time is n / (providers * rate) + 2 * latency.
    achieved = n / max(1e-9, wall - 2 * latency)
    return {
        f"scale_{n}_fill_s": round(wall, 2),
        f"scale_{n}_launch_rate_pct": round(100 * achieved / (providers * rate), 1),
        f"scale_{n}_pass_p50_ms": round(percentile(durations, 50) * 1000, 2),
        f"scale_{n}_pass_max_ms": round(max(durations) * 1000, 2),
        f"scale_{n}_steady_pass_ms": round(statistics.median(steady) * 1000, 2),
        f"scale_{n}_cpu_ms_per_node": round(cpu_used / n * 1000, 3),
        f"scale_{n}_rss_mb": round(rss, 1),
    }


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1


def log_volume(root: Path, lifecycles: int = 100) -> Figures:
    """Log lines at the default level (info) per node, from launch to row removed."""
    counter = _Count()
    logger = logging.getLogger("freshpool")
    old_level, old_handlers = logger.level, list(logger.handlers)
    logger.handlers = [counter]
    logger.setLevel(logging.INFO)
    pool = BenchPool(root, "logs", sim_providers(1, lifecycles), lifecycles)
    try:
        pool.run_until(lambda: pool.ready() >= lifecycles)
        pool.config = pool.config.model_copy(
            update={"labels": [pool.config.labels[0].model_copy(update={"min_ready": 0})]}
        )
        pool.launcher.shared.config = pool.config
        for _ in range(lifecycles):
            (node,) = direct.acquire(pool.config, pool.store, ["debian"], timeout=5)
            pool.store.release_set(node.id, "released")
        pool.run_until(lambda: not pool.store.nodes())
    finally:
        pool.destroy()
        logger.handlers, logger.level = old_handlers, old_level
    return {"log_lines_per_node": round(counter.lines / lifecycles, 2)}
