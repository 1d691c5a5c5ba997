"""Clouds: quotas, launch rate and failover, over sim providers that behave as clouds
do (API latency, a quota the cloud enforces, outages).

- quota: 1,000 nodes over two clouds whose quotas (450 each) are below their
  `max-nodes` (1,000 each), plus a 100-node provider; each takes 20 calls/s. The
  figures: fill time, launch rate against the rate the providers allow, and the
  launches the clouds refused for quota (the launcher should foresee every one).
- failover: a label on two clouds; with its pool full, one cloud goes down and half
  the pool is handed out; the figure is the time until the pool is full again from
  the other cloud, against one breaker cool-down.

The cloud drivers' own calls (boto3, openstacksdk) are measured by their tests, not
here: these are the launcher's decisions at scale.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import BenchPool
from freshpool.dispatch import direct
from freshpool.drivers.sim import SimDriver

LATENCY = 0.2
RATE = 20.0


def _cloud(name: str, max_nodes: int, quota: int | None, cooldown: float = 30.0) -> str:
    sim = f"{{latency: {LATENCY}" + (f", quota: {quota}" if quota is not None else "") + "}"
    return (f"  - name: {name}\n    driver: sim\n    max-nodes: {max_nodes}\n"
            f"    max-parallel-launches: {max_nodes}\n    rate: {RATE}\n    boot-timeout: 30\n"
            f"    breaker-cooldown: {cooldown}\n    sim: {sim}\n")  # fmt: skip


def quota(root: Path, nodes: int = 1000) -> dict[str, float]:
    providers = (
        _cloud("cloud-a", 1000, 450) + _cloud("cloud-b", 1000, 450) + _cloud("host", 100, None)
    )
    pool = BenchPool(root, "clouds-quota", providers, nodes, extra="cleanup-interval: 3600\n")
    try:
        wall = pool.run_until(lambda: pool.ready() >= nodes, timeout=1800)
        refused = sum(1 for n in pool.store.nodes()
                      for e in pool.store.events(n.id) if "quota" in e.reason)  # fmt: skip
        by_provider = {p: sum(1 for n in pool.store.nodes(["ready"]) if n.provider == p)
                       for p in pool.drivers}  # fmt: skip
    finally:
        pool.destroy()
    # Each provider launches its share at RATE; each node needs a create and a test
    # call, LATENCY each: the best wall time is the largest share's.
    best = max(by_provider.values()) / RATE + 2 * LATENCY
    figures = {
        f"clouds_{nodes}_fill_s": round(wall, 2),
        f"clouds_{nodes}_launch_rate_pct": round(100 * best / wall, 1),
        f"clouds_{nodes}_quota_refusals": float(refused),
    }
    print(f"clouds: {nodes} nodes in {wall:.1f} s over {by_provider}; launch rate "
          f"{100 * best / wall:.1f}% of allowed; {refused} quota refusals", flush=True)  # fmt: skip
    return figures


def failover(root: Path, pool_size: int = 40, cooldown: float = 30.0) -> dict[str, float]:
    providers = _cloud("cloud-a", pool_size, None, cooldown) + _cloud(
        "cloud-b", pool_size, None, cooldown
    )
    pool = BenchPool(root, "clouds-failover", providers, pool_size)
    try:
        pool.run_until(lambda: pool.ready() >= pool_size, timeout=600)
        down = pool.drivers["cloud-a"]
        assert isinstance(down, SimDriver)
        down.settings = down.settings.model_copy(
            update={"failure_rate": 1.0, "leak_on_failure": 0.0}
        )
        started = time.perf_counter()
        for _ in range(pool_size // 2):
            direct.acquire(pool.config, pool.store, ["debian"], timeout=30)
        pool.run_until(lambda: pool.ready() >= pool_size, timeout=600)
        served = time.perf_counter() - started
    finally:
        pool.destroy()
    print(f"clouds: one cloud down, its share served by the other in {served:.2f} s "
          f"(breaker cool-down {cooldown:.0f} s)", flush=True)  # fmt: skip
    return {"clouds_failover_s": round(served, 2), "clouds_breaker_cooldown_s": cooldown}


def run(root: Path, nodes: int = 1000) -> dict[str, float]:
    return {**quota(root, nodes), **failover(root)}
