"""nodepool-zk: one Zuul-style client against `freshpool serve` with nodepool-compat,
over a real ZooKeeper (TLS on loopback), as Nodepool's own figures were taken.

The client is tests/integrations/nodepool/zuulside.py (kazoo writing what Zuul
writes); it runs in this process, `serve` in its own (sim provider, one label,
min-ready 50). Figures: time to 50 ready znodes, one request at a time with ready
nodes waiting (submit -> fulfilled, then accept and give back as Zuul does), 200
requests at once, ZooKeeper's own round trip (the floor under every figure), and
the memory of the launcher (serve and its API process) and of ZooKeeper.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from kazoo.recipe.watchers import DataWatch

from bench.common import percentile
from freshpool.core.states import BuildState
from freshpool.store import Store
from tests.integrations.nodepool.conftest import kazoo_client, pool_config
from tests.integrations.nodepool.zookeeper import ZooKeeper
from tests.integrations.nodepool.zuulside import NODES, ZuulSide

SETTLED = ("fulfilled", "failed")


def run(root: Path, rounds: int = 100, burst: int = 200) -> dict[str, float]:
    zookeeper = ZooKeeper(root / "zookeeper")
    zookeeper.start()
    serve: subprocess.Popen[bytes] | None = None
    client = kazoo_client(zookeeper)
    try:
        client.ensure_path("/bench")
        client.stop()
        client = kazoo_client(zookeeper, "/bench")
        side = ZuulSide(client)
        figures = {"nodepool_zk_rtt_p50_ms": _round_trip_ms(side)}
        started = time.perf_counter()
        serve = _serve(root, zookeeper, max_nodes=burst + 60)
        _wait(lambda: len(_ready_znodes(side)) >= 50, 180, "50 ready znodes")
        figures["nodepool_zk_fill_50_s"] = round(time.perf_counter() - started, 2)
        waits = [_one(side) for _ in range(rounds)]
        figures["nodepool_zk_one_p50_ms"] = round(percentile(waits, 50) * 1000, 1)
        figures["nodepool_zk_one_p99_ms"] = round(percentile(waits, 99) * 1000, 1)
        figures.update(_burst(side, burst))
        figures["nodepool_zk_launcher_rss_mb"] = _rss_mb(serve.pid, children=True)
        assert zookeeper.process is not None
        figures["nodepool_zk_zookeeper_rss_mb"] = _rss_mb(zookeeper.process.pid)
        return figures
    finally:
        client.stop()
        if serve is not None:
            serve.terminate()
            serve.wait(60)
        zookeeper.stop()


def _serve(root: Path, zookeeper: ZooKeeper, max_nodes: int) -> subprocess.Popen[bytes]:
    state_dir = root / "nodepool-zk"
    config = root / "nodepool-zk.yaml"
    config.write_text(pool_config(state_dir, zookeeper, "/bench", 50, max_nodes))
    store = Store.open(state_dir)
    row = store.new_build("bench", "debian-bookworm", str(state_dir / "no-layers"))
    store.build_transition(row.id, BuildState.BUILDING, BuildState.READY, "bench")
    store.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = (root / "nodepool-zk-serve.log").open("ab")
    command = [sys.executable, "-m", "freshpool", "serve", "--config", str(config), "--no-build"]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _round_trip_ms(side: ZuulSide, rounds: int = 300) -> float:
    side.zk.ensure_path("/rtt")
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        side.zk.get("/rtt")
        times.append(time.perf_counter() - started)
    return round(percentile(times, 50) * 1000, 2)


def _ready_znodes(side: ZuulSide) -> list[str]:
    if not side.zk.exists(NODES):
        return []
    found = []
    for name in side.zk.get_children(NODES):
        try:
            node = side.node(name)
        except Exception:
            continue
        if node.get("state") == "ready" and node.get("allocated_to") is None:
            found.append(name)
    return found


def _settled(side: ZuulSide, request: str, done: dict[str, tuple[float, dict]]) -> None:
    """Record when `request` settles, from a watch (no polling interval in the figure)."""

    def changed(data: bytes | None, _stat: object) -> bool:
        if data is None:
            return False
        answer = json.loads(data)
        if answer.get("state") in SETTLED:
            done[request] = (time.perf_counter(), answer)
            return False
        return True

    DataWatch(side.zk, f"/nodepool/requests/{request}", changed)


def _one(side: ZuulSide) -> float:
    done: dict[str, tuple[float, dict]] = {}
    started = time.perf_counter()
    request = side.submit(["debian"])
    _settled(side, request, done)
    _wait(lambda: request in done, 60, f"request {request}")
    at, answer = done[request]
    side.accept(request, answer["nodes"])
    side.give_back(answer["nodes"])
    return at - started


def _burst(side: ZuulSide, count: int) -> dict[str, float]:
    """`count` requests sent at once (pipelined creates, as many Zuul schedulers
    submitting together), each watched from its answer's arrival."""
    done: dict[str, tuple[float, dict]] = {}
    started = time.perf_counter()
    creates = [side.submit_async(["debian"]) for _ in range(count)]
    submitted = {str(c.get()).rsplit("/", 1)[1]: started for c in creates}
    for request in submitted:
        _watch_async(side, request, done)
    _wait(lambda: len(done) >= count, 300, f"{count} requests")
    wall = max(at for at, _ in done.values()) - started
    waits = [done[r][0] - submitted[r] for r in submitted]
    fulfilled = sum(1 for _, a in done.values() if a["state"] == "fulfilled")
    for request, (_, answer) in done.items():
        if answer["state"] == "fulfilled":
            side.accept(request, answer["nodes"])
            side.give_back(answer["nodes"])
    return {
        "nodepool_zk_burst_rps": round(count / wall, 1),
        "nodepool_zk_burst_p50_wait_s": round(percentile(waits, 50), 3),
        "nodepool_zk_burst_fulfilled": fulfilled,
    }


def _watch_async(side: ZuulSide, request: str, done: dict[str, tuple[float, dict]]) -> None:
    """Record when `request` settles: a read with a watch, renewed until it has."""
    path = f"/nodepool/requests/{request}"

    def look(_event: object = None) -> None:
        side.zk.get_async(path, watch=look).rawlink(read)

    def read(result: object) -> None:
        try:
            data, _ = result.get()  # type: ignore[attr-defined]
        except Exception:
            return  # deleted: not by us before it settled
        answer = json.loads(data)
        if answer.get("state") in SETTLED and request not in done:
            done[request] = (time.perf_counter(), answer)

    look()


def _rss_mb(pid: int, children: bool = False) -> float:
    process = psutil.Process(pid)
    processes = [process, *(process.children(recursive=True) if children else [])]
    return round(sum(p.memory_info().rss for p in processes) / 2**20, 1)


def _wait(check: object, timeout: float, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodepool-zk: no {what} within {timeout} s")
        time.sleep(0.002)
