"""The fleet chaos run: several `freshpool serve` launchers on one PostgreSQL, sim
clouds with faults in shared files, clients acquiring and releasing; kill -9 a
launcher's whole process group at seeded points and cut one launcher's database
connections through a TCP proxy; then check the invariants from the history.

    python -m tests.chaos.fleet --kills 55 --cuts 22 --requests 1000 --seed 1
    python -m tests.chaos.fleet --clients http      # acquire through serve's own APIs

Launchers a, b, c drive six sim providers; c reaches PostgreSQL through the proxy
(tests/chaos/proxy.py). A launcher is restarted after a seeded delay, often armed
at a crash point (freshpool.crashpoints), where it kills itself; the others die by
timed kill -9. One disturbance at a time: no kill while c is cut off, no kill or
cut until every launcher is up again (heartbeating since its restart), so a
takeover always has a launcher to go to. After the last,
the faults stop, the launchers restart calm, the pool settles, and the run checks
(tests/chaos/invariants.py): each node's history follows the state table, no node
went to two requests, no request was lost, the clouds and the store agree, no
provider was driven by two launchers at once (the lease generations in the
history), every provider a dead launcher held was taken again within one lease TTL
plus one pass (plus `slack` for a loaded machine), and provider and label
max-nodes held throughout.

The API servers are a parameter: `--clients store` acquires through the store
(dispatch/direct.py, as the CLI does), `--clients http` through the launchers'
own `serve` APIs (a client whose server died moves to another).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import make_url

from freshpool.config import parse
from freshpool.core.states import BuildState
from freshpool.store import Store
from tests.chaos import invariants
from tests.chaos.proxy import CutProxy
from tests.store.pg import TempPostgres
from tests.support import stop_group

LAUNCHERS = ("a", "b", "c")
CUT = "c"  # the launcher behind the proxy
PROVIDERS = [f"cloud-{i}" for i in range(6)]
PROVIDER_MAX = 4
LABEL_MAX = 16
MIN_READY = 6
PHASES = ("launch", "created", "tested", "delete", "deleted")


@dataclass
class FleetReport:
    seed: int
    clients: str
    ttl: float
    kill_points: int = 0
    crash_point_kills: dict[str, int] = field(default_factory=dict)
    timed_kills: int = 0
    client_kills: int = 0
    cuts: int = 0
    cut_blocks: int = 0
    connections_dropped: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    acquired: int = 0
    concurrency: int = 0
    nodes_seen: int = 0
    handed_out: int = 0
    lease_takes: int = 0
    generations_writing: int = 0
    failovers: int = 0
    failover_p50_s: float = 0.0
    failover_max_s: float = 0.0
    failover_limit_s: float = 0.0
    most_nodes: dict[str, int] = field(default_factory=dict)
    # Launchers that ended other than at their crash point (a bug the run found).
    unexpected_exits: list[str] = field(default_factory=list)
    violations: int = 0
    settle_s: float = 0.0
    wall_s: float = 0.0


class Chaos:
    def __init__(
        self, root: Path, postgres: TempPostgres, seed: int, ttl: float, clients: str
    ) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.seed = seed
        self.ttl = ttl
        self.mode = clients
        self.url = postgres.new_database()
        self.proxy = CutProxy(str(postgres.socket / ".s.PGSQL.5432"))
        dbname = make_url(self.url).database
        self.proxied_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.proxy.port}/{dbname}"
        self.store = Store(self.url)
        build = self.store.new_build("img-1", "img", str(root / "no-layers"))
        self.store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "chaos")
        self.token = ""
        if clients == "http":
            from freshpool.api import tokens

            self.token = tokens.create(self.store, "chaos")[1]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.armed: dict[str, str] = {}  # launcher -> the crash point it was started at
        self.starts = 0
        self.deaths: list[tuple[float, str]] = []
        self.clients: dict[int, subprocess.Popen[bytes]] = {}
        self.client_runs = 0
        self.armed_at: dict[str, float] = {}
        self.started_wall: dict[str, float] = {}
        self.up_at: dict[str, float] = {}  # launcher -> when it was first seen up

    # ----------------------------------------------------------- configs

    def config_text(self, name: str, faults: bool) -> str:
        seed = self.seed * 1000 + self.starts
        sim = (
            f"failure-rate: 0.15, timeout-rate: 0.05, lie-rate: 0.1, seed: {seed}"
            if faults
            else f"seed: {seed}"
        )
        providers = "".join(
            f"  - {{name: {p}, driver: sim, max-nodes: {PROVIDER_MAX}, boot-timeout: 0.5,"
            f" breaker-cooldown: 0.2, sim: {{latency: 0.02, {sim},"
            f" path: {self.root / (p + '.db')}}}}}\n"
            for p in PROVIDERS
        )
        url = self.proxied_url if name == CUT else self.url
        api = "port: 0" if self.mode == "http" and name in LAUNCHERS else "enabled: false"
        return f"""
state-dir: {self.root / name}
database-url: "{url}"
launcher-id: {name}
lease-ttl: {self.ttl}
interval: 0.1
cleanup-interval: 0.5
api: {{{api}}}
providers:
{providers}
labels:
  - {{name: debian, image: img, health-interval: 0, min-ready: {MIN_READY},
      max-nodes: {LABEL_MAX}, job-timeout: 2.0, max-hold-age: 1.0}}
images: [{{name: img}}]
"""

    def start(self, name: str, faults: bool = True, crash: str | None = None) -> None:
        self.starts += 1
        self.started_wall[name] = time.time()
        self.up_at.pop(name, None)
        path = self.root / f"{name}.yaml"
        path.write_text(self.config_text(name, faults))
        (self.root / name / "api.url").unlink(missing_ok=True)
        env = dict(os.environ)
        env.pop("FRESHPOOL_CRASH_AT", None)
        if crash:
            env["FRESHPOOL_CRASH_AT"] = crash
            self.armed[name] = crash
            self.armed_at[name] = time.monotonic()
        else:
            self.armed.pop(name, None)
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "freshpool", "serve", "--no-build", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        log.close()

    def up(self, name: str) -> bool:
        """Whether launcher `name` has run its first lease pass since it was started
        (heartbeated): a kill before then would only stop a Python interpreter
        importing, which tells nothing about the launcher."""
        if name in self.up_at:
            return True
        if name not in self.procs:
            return False
        since = self.started_wall[name]
        if any(r.id == name and r.seen_at >= since for r in self.store.launcher_rows()):
            self.up_at[name] = time.monotonic()
            return True
        return False

    def kill(self, name: str) -> None:
        """kill -9 the launcher's whole process group (its API process with it)."""
        process = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.deaths.append((time.time(), name))
        self.armed.pop(name, None)

    def api_urls(self) -> list[str]:
        urls = []
        for name in LAUNCHERS:
            found = self.root / name / "api.url"
            if found.exists():
                urls.append(found.read_text().strip())
        return urls

    # ----------------------------------------------------------- clients

    def start_client(self, i: int, threads: int, crash: bool) -> None:
        """Client process `i` (again, if it died); with `crash`, armed to kill itself
        at the n-th hand-out, between the node being handed to it and its job."""
        config = self.root / "client.yaml"
        if not config.exists():
            text = self.config_text("client", False)
            config.write_text(text.replace("api: {port: 0}", "api: {enabled: false}"))
        env = dict(os.environ)
        env.pop("FRESHPOOL_CRASH_AT", None)
        if crash:
            env["FRESHPOOL_CRASH_AT"] = f"handoff:{self.rng.randint(3, 20)}"
        self.client_runs += 1
        argv = [
            sys.executable, "-m", "tests.chaos.fleet", "client", "--config", str(config),
            "--threads", str(threads), "--seed", str(self.seed * 100 + self.client_runs),
            "--mode", self.mode, "--token", self.token,
            "--stop", str(self.root / "stop"),
            "--out", str(self.root / f"client-{self.client_runs}.json"),
            "--urls", str(self.root),
        ]  # fmt: skip
        self.clients[i] = subprocess.Popen(argv, env=env, start_new_session=True)

    def requests(self) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM requests").scalar() or 0)

    # ----------------------------------------------------------- checks

    def instances(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for provider in PROVIDERS:
            path = self.root / f"{provider}.db"
            if path.exists():
                with sqlite3.connect(path, timeout=30) as db:
                    for external_id, node_id in db.execute(
                        "SELECT external_id, node_id FROM instances"
                    ):
                        found[external_id] = node_id
        return found

    def settled(self) -> bool:
        rows = self.store.nodes()
        return (
            len(rows) >= MIN_READY
            and {r.state for r in rows} == {"ready"}
            and set(self.instances()) == {r.external_id for r in rows}
            and len(self.live_owners()) == len(PROVIDERS)
        )

    def live_owners(self) -> dict[str, str]:
        now = time.time()
        return {p: x.owner for p, x in self.store.leases().items() if x.expires_at > now}

    def describe(self) -> str:
        rows = [(r.id, r.provider, r.state, r.external_id, r.reason) for r in self.store.nodes()]
        return f"nodes {rows}; instances {self.instances()}; leases {self.live_owners()}"

    def close(self) -> None:
        for process in [*self.procs.values(), *self.clients.values()]:
            stop_group(process, grace=20)
        self.procs.clear()
        self.proxy.close()
        self.store.close()


def run_fleet_chaos(
    root: Path,
    postgres: TempPostgres,
    kills: int = 55,
    cuts: int = 22,
    requests: int = 1000,
    seed: int = 1,
    ttl: float = 2.0,
    clients: str = "store",
    client_procs: int = 4,
    threads: int = 10,
    slack: float = 1.0,
    timeout: float = 1800.0,
) -> FleetReport:
    started = time.monotonic()
    report = FleetReport(seed=seed, clients=clients, ttl=ttl)
    chaos = Chaos(root, postgres, seed, ttl, clients)
    try:
        for name in LAUNCHERS:
            chaos.start(name)
        _wait(lambda: len(chaos.live_owners()) == len(PROVIDERS), 60, "every provider leased",
              chaos.describe)  # fmt: skip
        for i in range(client_procs):
            chaos.start_client(i, threads, crash=i % 2 == 0)
        report.concurrency = client_procs * threads
        _disturb(chaos, report, kills, cuts, requests, started + timeout, threads)
        _calm(chaos, report)
        _check(chaos, report, ttl + ttl / 10 + slack)
    except invariants.Violation:
        report.violations += 1
        raise
    finally:
        chaos.close()
        report.wall_s = round(time.monotonic() - started, 1)
    return report


def _disturb(
    chaos: Chaos,
    report: FleetReport,
    kills: int,
    cuts: int,
    requests: int,
    deadline: float,
    threads: int,
) -> None:
    """Kill and cut until there were `kills` deaths, `cuts` cuts and `requests`
    requests, one disturbance at a time."""
    rng, ttl = chaos.rng, chaos.ttl
    restart_at: dict[str, float] = {}
    next_at = time.monotonic() + rng.uniform(0.5, 1.5) * ttl
    unblocked_at = 0.0
    while report.kill_points < kills or report.cuts < cuts or chaos.requests() < requests:
        if time.monotonic() > deadline:
            raise invariants.Violation(f"chaos not done in time: {asdict(report)}")
        time.sleep(0.05)
        now = time.monotonic()
        # A launcher armed at a crash point that killed itself: the rest of its group too.
        for name, process in list(chaos.procs.items()):
            if process.poll() is not None:
                if process.returncode != -signal.SIGKILL or name not in chaos.armed:
                    report.unexpected_exits.append(f"{name}: exit {process.returncode}")
                phase = chaos.armed.get(name, "?").split(":")[0]
                chaos.kill(name)
                report.crash_point_kills[phase] = report.crash_point_kills.get(phase, 0) + 1
                report.kill_points += 1
                restart_at[name] = now + rng.uniform(0.3, 2.0) * ttl
        for i, process in list(chaos.clients.items()):
            if process.poll() is not None:
                report.client_kills += 1
                chaos.start_client(i, threads, crash=rng.random() < 0.3)
        # An armed launcher that never came to its crash point within a few TTLs of
        # being up (its share handed over to it, launches made): a timed kill instead.
        for name in list(chaos.armed):
            if name in chaos.procs and chaos.up(name) and now - chaos.up_at[name] > 5 * ttl:
                chaos.kill(name)
                report.timed_kills += 1
                report.kill_points += 1
                restart_at[name] = now + rng.uniform(0.3, 2.0) * ttl
        for name, when in list(restart_at.items()):
            if now >= when:
                del restart_at[name]
                # At most one launcher armed or down at a time.
                calm = not restart_at and not chaos.armed
                crash = None
                if calm and report.kill_points < kills and rng.random() < 0.6:
                    crash = f"{rng.choice(PHASES)}:{rng.randint(1, 6)}"
                chaos.start(name, crash=crash)
                next_at = max(next_at, now + rng.uniform(0.5, 1.0) * ttl)
        if now < next_at or restart_at or now < unblocked_at:
            continue
        want_kill = report.kill_points < kills and (
            report.cuts >= cuts or rng.random() < kills / (kills + cuts)
        )
        # Every launcher up (a restarted one can take seconds on a loaded host): a
        # kill then always leaves live launchers to take over, as a cut does.
        if len(chaos.procs) < len(LAUNCHERS) or not all(chaos.up(n) for n in chaos.procs):
            continue
        if want_kill and not chaos.armed:
            victim = rng.choice(sorted(chaos.procs))
            chaos.kill(victim)
            report.timed_kills += 1
            report.kill_points += 1
            restart_at[victim] = now + rng.uniform(0.3, 2.0) * ttl
        elif not want_kill and not any(n != CUT for n in chaos.armed):
            block = rng.choice([0.0, 0.0, rng.uniform(0.2, 0.8) * ttl, rng.uniform(1.0, 2.0) * ttl])
            report.connections_dropped += chaos.proxy.cut(block)
            report.cuts += 1
            report.cut_blocks += 1 if block else 0
            unblocked_at = now + block
        next_at = now + rng.uniform(0.5, 1.5) * ttl


def _calm(chaos: Chaos, report: FleetReport) -> None:
    """Clients stop; the launchers restart without faults; the pool must settle."""
    (chaos.root / "stop").write_text("")
    for process in chaos.clients.values():
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for name in LAUNCHERS:
        if name in chaos.procs:
            stop_group(chaos.procs.pop(name), grace=30)
        chaos.start(name, faults=False)
    calm_started = time.monotonic()
    quiet = 0
    deadline = time.monotonic() + 180
    while quiet < 4:
        if time.monotonic() > deadline:
            raise invariants.Violation(f"the fleet did not settle: {chaos.describe()}")
        quiet = quiet + 1 if chaos.settled() else 0
        time.sleep(0.5)
    report.settle_s = round(time.monotonic() - calm_started, 1)


def _check(chaos: Chaos, report: FleetReport, limit: float) -> None:
    store = chaos.store
    if report.unexpected_exits:
        raise invariants.Violation(f"launchers ended on their own: {report.unexpected_exits}")
    # The clouds and the store agree: each instance has its row and each row its instance.
    rows = {n.external_id for n in store.nodes()}
    strays = {e: n for e, n in chaos.instances().items() if e not in rows}
    if strays:
        raise invariants.Violation(f"instances with no row (leaked): {strays}")
    figures = invariants.check_history(store)
    report.nodes_seen = figures["nodes"]
    report.handed_out = figures["handed_out"]
    report.requests = {
        k.removeprefix("requests_"): v for k, v in figures.items() if "requests_" in k
    }
    report.generations_writing = invariants.one_driver_at_a_time(store)
    report.lease_takes = len(store.lease_history())
    report.most_nodes = invariants.caps_held(
        store, dict.fromkeys(PROVIDERS, PROVIDER_MAX), {"debian": LABEL_MAX}
    )
    took = invariants.failovers(store, chaos.deaths, limit)
    report.failovers = len(took)
    report.failover_limit_s = round(limit, 2)
    if took:
        seconds = [s for _l, _p, s in took]
        report.failover_p50_s = round(statistics.median(seconds), 2)
        report.failover_max_s = round(max(seconds), 2)
    got: list[int] = []
    for path in sorted(chaos.root.glob("client-*.json")):
        got += json.loads(path.read_text())["got"]
    report.acquired = len(got)
    if len(got) != len(set(got)):
        raise invariants.Violation("a node went to two clients")


def _wait(check, timeout: float, what: str, seen=str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise invariants.Violation(f"timed out waiting for {what}: {seen()}")
        time.sleep(0.1)


# --------------------------------------------------------------- the client process


def client_main(args: argparse.Namespace) -> None:
    """Threads that each acquire a node (timeout 5 s), then release it, hold it,
    delete it or walk away (the job timeout reclaims it), until the stop file is
    there; what they got goes to --out."""
    import logging

    logging.getLogger("freshpool").setLevel(logging.ERROR)
    config = parse(Path(args.config).read_text(), args.config)
    got: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = Path(args.stop)

    def save() -> None:
        with lock:
            # Whole or not at all: a client can be killed mid-save (its crash point).
            part = Path(args.out + ".part")
            part.write_text(json.dumps({"got": got, "errors": errors[-50:]}))
            part.replace(args.out)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        acquire, act = _client_calls(args, config, rng)
        while not stop.exists():
            try:
                node = acquire()
            except Exception as exc:  # a timeout, a dead server: ask again
                with lock:
                    errors.append(repr(exc)[:200])
                time.sleep(0.1)
                continue
            with lock:
                got.append(node)
            save()
            try:
                act(node, rng.random())
            except Exception as exc:
                with lock:
                    errors.append(repr(exc)[:200])

    workers = [
        threading.Thread(target=worker, args=(args.seed * 100 + i,)) for i in range(args.threads)
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    save()


def _client_calls(args, config, rng):  # type: ignore[no-untyped-def]
    from freshpool.core.states import NodeState

    if args.mode == "store":
        from freshpool.dispatch import direct

        store = Store(config.database_url)

        def acquire() -> int:
            (node,) = direct.acquire(config, store, ["debian"], timeout=5.0)
            return node.id

        def act(node: int, roll: float) -> None:
            if roll < 0.7:
                store.release_set(node, "released")
            elif roll < 0.8:
                store.move(node, NodeState.HOLD, "held")
            elif roll < 0.9:
                store.move(node, NodeState.DELETING, "deleted by operator")

        return acquire, act

    from freshpool.api.client import ApiClient

    clients: dict[str, ApiClient] = {}

    def pick() -> ApiClient:
        urls = [
            (Path(args.urls) / n / "api.url").read_text().strip()
            for n in LAUNCHERS
            if (Path(args.urls) / n / "api.url").exists()
        ]
        if not urls:
            raise RuntimeError("no API server up")
        url = rng.choice(urls)
        if url not in clients:
            clients[url] = ApiClient(url, args.token, timeout=10)
        return clients[url]

    current: list[ApiClient] = []

    def acquire_http() -> int:
        if not current:
            current.append(pick())
        try:
            (node,) = current[0].request_nodes(["debian"], timeout=5.0)
        except Exception:
            current.clear()  # its server may have died: the next ask goes to another
            raise
        return node.id

    def act_http(node: int, roll: float) -> None:
        client = current[0] if current else pick()
        if roll < 0.7:
            client.release(node)
        elif roll < 0.8:
            client.hold(node)
        elif roll < 0.9:
            client.delete(node)

    return acquire_http, act_http


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        parser = argparse.ArgumentParser(prog="python -m tests.chaos.fleet client")
        parser.add_argument("client")
        for flag in ("--config", "--stop", "--out", "--urls", "--mode", "--token"):
            parser.add_argument(flag, default="")
        parser.add_argument("--threads", type=int, default=10)
        parser.add_argument("--seed", type=int, default=1)
        client_main(parser.parse_args())
        return
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=55)
    parser.add_argument("--cuts", type=int, default=22)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--clients", choices=("store", "http"), default="store")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--slack", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    postgres = TempPostgres()
    root = Path(tempfile.mkdtemp(prefix="freshpool-fleet-chaos-"))
    try:
        report = run_fleet_chaos(
            root, postgres, args.kills, args.cuts, args.requests, args.seed, args.ttl,
            args.clients, args.client_procs, args.threads, args.slack,
        )  # fmt: skip
    except invariants.Violation as exc:
        print(f"VIOLATION: {exc}\n(run directory {root})")
        raise SystemExit(1) from None
    finally:
        postgres.stop()
    print(json.dumps(asdict(report), indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
