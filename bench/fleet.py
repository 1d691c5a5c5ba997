"""fleet: launchers and API servers on one PostgreSQL (`python -m bench fleet`).

  scale     4 `freshpool serve` launchers, 50 sim providers at 1 s API latency and
            a rate limit each; once the fleet has formed at min-ready 0, a reload
            asks for N ready nodes (50,000; 5,000 with --quick): the time from the
            reload to the first launch, the launch rate from there against the
            providers' summed rate, each launcher's pass
            (its controllers' p99, from the metrics it publishes), its peak RSS,
            and the CPU the database's processes spent per node launched
  failover  4 launchers, 8 providers, jobs taking and giving back nodes: kill -9 one
            launcher's process group, time until one of its providers is leased
            again and until one launches a node again (lease TTL 5 s), 3 rounds
  http      hand-out over HTTP, POST /requests to fulfilled, 1/10/50 clients spread
            over 2 `serve --api-only` servers (bench/http_handoff.py's client):
            the PostgreSQL figures to set beside that bench's SQLite ones

The database is a throwaway PostgreSQL cluster on this host (tests/store/pg.py:
unix socket, fsync off), sharing the host's 2 cores with everything it serves.
In `http` the pool is ready rows made through the store with no instance behind
them, as http_handoff's store pool is, so no launcher drives it; a heartbeat
stands in for one (an API server hands out only while some launcher is live).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from bench.common import percentile
from freshpool.core.states import BuildState, NodeState
from freshpool.observed import PUBLISHED
from freshpool.store import Store
from tests.store.pg import TempPostgres
from tests.support import stop_group

Figures = dict[str, float]
LAUNCHERS = ("a", "b", "c", "d")


class BenchFleet:
    """A database, shared sim clouds, and `serve` processes on them."""

    def __init__(self, root: Path, providers: int, per: int, latency: float, rate: float,
                 min_ready: int, ttl: float = 15.0) -> None:  # fmt: skip
        self.root = root
        self.postgres = TempPostgres()
        self.url = self.postgres.new_database()
        self.store = Store(self.url)
        build = self.store.new_build("img-1", "img", str(root / "no-layers"))
        self.store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "bench")
        self.clouds = [f"cloud-{i}" for i in range(providers)]
        self.providers = "".join(
            f"  - {{name: {c}, driver: sim, max-nodes: {per}, max-parallel-launches: {per},"
            f" rate: {rate}, boot-timeout: 30, sim: {{latency: {latency},"
            f" path: {root / (c + '.db')}}}}}\n"
            for c in self.clouds
        )
        self.min_ready = min_ready
        self.ttl = ttl
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, name: str, api_only: bool = False) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(f"""
state-dir: {self.root / name}
database-url: "{self.url}"
launcher-id: {name}
lease-ttl: {self.ttl}
log-level: warning
api: {{{"port: 0" if api_only else "enabled: false"}}}
providers:
{self.providers}
labels:
  - {{name: debian, image: img, health-interval: 0, min-ready: {self.min_ready}}}
images: [{{name: img}}]
""")
        return path

    def start(self, name: str, api_only: bool = False) -> None:
        mode = "--api-only" if api_only else "--no-build"
        config = str(self.config(name, api_only))
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "freshpool", "serve", mode, "-c", config],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def kill(self, name: str) -> None:
        process = self.procs.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def count(self, query: str, **params: object) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(text(query), params).scalar() or 0)

    def ready(self) -> int:
        return self.count("SELECT count(*) FROM nodes WHERE state = 'ready'")

    def owners(self) -> dict[str, str]:
        now = time.time()
        return {p: x.owner for p, x in self.store.leases().items() if x.expires_at > now}

    def rss_mb(self, name: str) -> float:
        """The launcher's memory, its children's with it."""
        process = psutil.Process(self.procs[name].pid)
        return sum(p.memory_info().rss for p in [process, *process.children(True)]) / 2**20

    def database_cpu_s(self) -> float:
        """CPU seconds the PostgreSQL server's processes have used."""
        pid = int((self.postgres.data / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        total = 0.0
        for p in [main, *main.children(True)]:
            try:
                times = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def close(self) -> None:
        for process in self.procs.values():
            stop_group(process, grace=60)
        self.procs.clear()
        self.store.close()
        self.postgres.stop()


def wait(check, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench fleet: timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic()


# ------------------------------------------------------------------ scale


def scale(root: Path, nodes: int = 50_000, providers: int = 50, latency: float = 1.0,
          rate: float = 5.0) -> Figures:  # fmt: skip
    """The fleet forms at min-ready 0 (every provider leased, spread evenly, no lease
    moving); then each launcher reloads a config asking for `nodes`, and the fill is
    timed from the first launch: the launch rate of a formed fleet, not of launchers
    still joining and handing providers to each other. The time from the reloads to
    that launch is a figure of its own."""
    per = -(-nodes // providers)
    fleet = BenchFleet(root / "scale", providers, per, latency, rate, min_ready=0)
    (root / "scale").mkdir(parents=True, exist_ok=True)
    peak: dict[str, float] = dict.fromkeys(LAUNCHERS, 0.0)
    try:
        for name in LAUNCHERS:
            fleet.start(name)
        _wait_formed(fleet, providers)
        db_cpu = fleet.database_cpu_s()
        fleet.min_ready = nodes
        for name in LAUNCHERS:
            fleet.config(name)
        # SIGHUP, as `freshpool config reload` sends once it has checked the file: all
        # four at once, so the fill starts together on every launcher.
        started = time.time()
        for name in LAUNCHERS:
            os.kill(fleet.procs[name].pid, signal.SIGHUP)
        deadline = time.monotonic() + 3600
        while fleet.ready() < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench fleet: {fleet.ready()} of {nodes} ready in an hour")
            for name in LAUNCHERS:
                peak[name] = max(peak[name], fleet.rss_mb(name))
            time.sleep(1.0)
        db_cpu = fleet.database_cpu_s() - db_cpu
        with fleet.store.engine.connect() as conn:
            first, last = conn.execute(text(
                "SELECT min(at) FILTER (WHERE to_state = 'building'),"
                " max(at) FILTER (WHERE to_state = 'ready') FROM node_events"
            )).one()  # fmt: skip
        # Each node needs a create and a test call, `latency` each: the best possible
        # wall time from the first launch is nodes / (providers * rate) + 2 * latency.
        # Until then each launcher restarted its run on the new config (its own figure).
        wall = last - first
        achieved = nodes / max(1e-9, wall - 2 * latency)
        passes = [_pass_p99_ms(fleet.root / name / PUBLISHED) for name in LAUNCHERS]
        spread = sorted(list(fleet.owners().values()).count(n) for n in LAUNCHERS)
    finally:
        fleet.close()
    return {
        f"fleet_{nodes}_reload_to_launch_s": round(first - started, 2),
        f"fleet_{nodes}_fill_s": round(wall, 1),
        f"fleet_{nodes}_launch_rate_pct": round(100 * achieved / (providers * rate), 1),
        f"fleet_{nodes}_pass_p99_ms": max(passes),
        f"fleet_{nodes}_rss_mb": round(max(peak.values()), 1),
        f"fleet_{nodes}_db_cpu_ms_per_node": round(db_cpu / nodes * 1000, 3),
        f"fleet_{nodes}_providers_fewest": spread[0],
        f"fleet_{nodes}_providers_most": spread[-1],
    }


def _wait_formed(fleet: BenchFleet, providers: int, steady: float = 5.0) -> None:
    """Until every provider is leased, the launchers hold about as many each, and no
    lease has moved for `steady` seconds."""
    fair = providers // len(LAUNCHERS)
    deadline = time.monotonic() + 300
    last: dict[str, str] = {}
    since = time.monotonic()
    while True:
        owners = fleet.owners()
        if owners != last:
            last, since = owners, time.monotonic()
        counts = [list(owners.values()).count(n) for n in LAUNCHERS]
        even = len(owners) == providers and min(counts) >= fair and max(counts) <= fair + 1
        if even and time.monotonic() - since >= steady:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench fleet: the fleet did not form in 300 s: {counts}")
        time.sleep(0.2)


def _pass_p99_ms(published: Path) -> float:
    """The worst controller's p99 pass, as a bucket bound, from the launcher's
    freshpool_launcher_pass_seconds histogram."""
    import json

    observed = json.loads(published.read_text())
    worst = 0.0
    for family in text_string_to_metric_families(observed["metrics"]):
        if family.name != "freshpool_launcher_pass_seconds":
            continue
        buckets: dict[str, list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets.setdefault(sample.labels["controller"], []).append((bound, sample.value))
        for counts in buckets.values():
            counts.sort()
            total = counts[-1][1]
            bound = next((b for b, c in counts if c >= 0.99 * total), float("inf"))
            worst = max(worst, bound)
    return round(worst * 1000, 1)


# ------------------------------------------------------------------ failover


def failover(root: Path, rounds: int = 3, ttl: float = 5.0) -> Figures:
    from freshpool.config import parse
    from freshpool.core.errors import AcquireTimeout
    from freshpool.dispatch import direct

    (root / "failover").mkdir(parents=True, exist_ok=True)
    fleet = BenchFleet(root / "failover", 8, 4, 0.05, 100.0, min_ready=8, ttl=ttl)
    done = threading.Event()

    def jobs() -> None:
        config = parse(fleet.config("client").read_text(), "client.yaml")
        store = Store(fleet.url)
        while not done.is_set():
            try:
                (node,) = direct.acquire(config, store, ["debian"], timeout=2.0)
            except AcquireTimeout:
                continue
            store.release_set(node.id, "job done")
            time.sleep(0.05)
        store.close()

    leased: list[float] = []
    launching: list[float] = []
    thread = threading.Thread(target=jobs)
    try:
        for name in LAUNCHERS:
            fleet.start(name)
        wait(lambda: len(set(fleet.owners().values())) == 4 and len(fleet.owners()) == 8, 120,
             "8 providers over 4 launchers")  # fmt: skip
        thread.start()
        for i in range(rounds):
            victim = LAUNCHERS[i % len(LAUNCHERS)]
            wait(lambda v=victim: v in fleet.owners().values(), 120, f"{victim} holding a lease")
            held = [p for p, owner in fleet.owners().items() if owner == victim]
            time.sleep(2.0)
            killed_wall, killed = time.time(), time.monotonic()
            fleet.kill(victim)
            taken = wait(lambda h=held, v=victim: any(fleet.owners().get(p, v) != v for p in h),
                         120, "a takeover")  # fmt: skip
            launched = wait(
                lambda h=held, t=killed_wall: fleet.count(
                    "SELECT count(*) FROM node_events WHERE from_state IS NULL AND at > :t"
                    " AND provider = ANY(:held)", t=t, held=h) > 0,
                120, "a launch on a taken-over provider")  # fmt: skip
            leased.append(taken - killed)
            launching.append(launched - killed)
            fleet.start(victim)
    finally:
        done.set()
        if thread.is_alive():
            thread.join(60)
        fleet.close()
    return {
        "fleet_failover_ttl_s": ttl,
        "fleet_failover_leased_p50_s": round(percentile(leased, 50), 2),
        "fleet_failover_leased_max_s": round(max(leased), 2),
        "fleet_failover_launching_p50_s": round(percentile(launching, 50), 2),
        "fleet_failover_launching_max_s": round(max(launching), 2),
    }


# ------------------------------------------------------------------ http


def http(root: Path, quick: bool = False) -> Figures:
    from bench.http_handoff import CONCURRENCY, WARM_ROUNDS, hand_outs
    from freshpool.api import tokens

    per = {1: 100, 10: 300, 50: 500} if quick else {1: 200, 10: 1000, 50: 2000}
    (root / "http").mkdir(parents=True, exist_ok=True)
    fleet = BenchFleet(root / "http", 1, 100_000, 0.0, 1000.0, min_ready=0)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            fleet.store.heartbeat("bench-launcher", [])
            stop.wait(fleet.ttl / 10)

    figures: Figures = {}
    beating = threading.Thread(target=heartbeat, daemon=True)
    try:
        total = sum(per.values()) + WARM_ROUNDS * sum(CONCURRENCY)
        for _ in range(total):
            node = fleet.store.new_node("debian", fleet.clouds[0], "img-1", "img")
            fleet.store.transition(node.id, NodeState.BUILDING, NodeState.TESTING, "bench")
            fleet.store.transition(node.id, NodeState.TESTING, NodeState.READY, "bench")
        beating.start()
        secret = tokens.create(fleet.store, "bench")[1]
        servers = ("api-1", "api-2")
        for name in servers:
            fleet.start(name, api_only=True)
        urls = [_url(fleet.root / name / "api.url") for name in servers]
        for clients in CONCURRENCY:
            got = asyncio.run(hand_outs(urls, secret, clients, per[clients],
                                        warm=WARM_ROUNDS * clients))  # fmt: skip
            print(f"postgres, 2 API servers, {clients:>2} clients: {got}", flush=True)
            for name, value in got.items():
                figures[f"fleet_http_c{clients}_{name}"] = value
    finally:
        stop.set()
        fleet.close()
    return figures


def _url(path: Path) -> str:
    wait(path.exists, 120, f"{path.parent.name} listening")
    return path.read_text().strip()


def run(root: Path, quick: bool = False) -> Figures:
    figures: Figures = {}
    figures.update(scale(root, nodes=5_000 if quick else 50_000))
    figures.update(failover(root, rounds=3))
    figures.update(http(root, quick))
    return figures
