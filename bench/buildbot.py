"""Buildbot: a job queued -> its first step running on a freshpool node.

A real master and `freshpool serve` (tests/integrations/buildbot/harness.py). Each
build is forced over the master's REST API and its first step prints the node's
clock (a local node shares the host's); the figure is that time minus the moment
the force was sent. Builds run one after another, so with a warm pool each finds a
ready node (the pool refills between builds), and with an empty pool each launches
one: node, worker start, PB attach, first step.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import BENCH_IMAGE, IMAGE_CACHE, percentile
from freshpool.images.debootstrap import build_cached
from tests.integrations.buildbot.harness import Master, ServedPool, wait_for, worker_wheels


def _queued_to_running(m: Master, pool: ServedPool, builds: int, warm: bool) -> list[float]:
    samples = []
    for _ in range(builds):
        if warm:
            wait_for(lambda: pool.ready() >= 1, 120, "a ready node")
        sent = time.time()
        request = m.force()
        (build,) = wait_for(lambda r=request: m.finished([r]), 300, "the build")
        samples.append(float(m.output_of(build, "started").strip()) - sent)
    return samples


def run(root: Path, builds: int = 50) -> dict[str, float]:
    image = build_cached(BENCH_IMAGE, IMAGE_CACHE)
    wheels = worker_wheels(IMAGE_CACHE)
    figures: dict[str, float] = {}
    for name, ready in (("warm", 2), ("empty", 0)):
        pool = ServedPool.start(root / f"buildbot-{name}", image, wheels, min_ready=ready,
                                max_nodes=4)  # fmt: skip
        m = None
        try:
            # The worker image is built by the pool itself; wait for it either way.
            wait_for(lambda p=pool: p.store.serving_build("buildbot-worker"), 600, "the image")
            m = Master(root / f"master-{name}", pool, workers=1)
            _queued_to_running(m, pool, 2, warm=ready > 0)  # untimed: caches, first connects
            samples = _queued_to_running(m, pool, builds, warm=ready > 0)
        finally:
            if m is not None:
                m.stop()
            pool.stop()
        figures[f"buildbot_{name}_p50_s"] = round(percentile(samples, 50), 3)
        figures[f"buildbot_{name}_p99_s"] = round(percentile(samples, 99), 3)
        print(f"buildbot, {name} pool: queued -> first step p50"
              f" {figures[f'buildbot_{name}_p50_s']} s, p99 {figures[f'buildbot_{name}_p99_s']} s"
              f" over {builds} builds", flush=True)  # fmt: skip
    return figures


if __name__ == "__main__":
    import tempfile

    run(Path(tempfile.mkdtemp(prefix="freshpool-bench-")))
