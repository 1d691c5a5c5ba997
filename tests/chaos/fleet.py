"""The fleet chaos run: `freshpool serve` launchers and `serve --api-only` servers on
one PostgreSQL, sim clouds with faults in shared files, ~1,000 client requests in
flight at once through the API servers; kill -9 a launcher's whole process group at
seeded points, cut one launcher's database connections through a TCP proxy, kill -9
an API server and a client process now and then; then check the invariants from
the history and from what the clients were told.

    python -m tests.chaos.fleet --seed 1        # the full size: the flags' defaults

Launchers a, b, c drive six sim providers with their APIs off; c reaches PostgreSQL
through the proxy (tests/chaos/proxy.py). Two API servers (api-1, api-2) serve
the clients (tests/chaos/fleetclient.py: processes of asyncio tasks, each keeping
one request in flight: POST, long-poll to its end, then release, hold, delete or
walk away from the node got). With the label capped at 16 nodes most requests
fail at their deadline: that is the load, not a fault.

A launcher is restarted after a seeded delay, often armed at a crash point
(freshpool.crashpoints), where it kills itself; the others die by timed kill -9. One
launcher disturbance at a time: no kill while c is cut off, no kill or cut until
every launcher is up again (heartbeating since its restart), so a takeover always
has a launcher to go to. An API server is killed only while the other is up, and
restarted after a delay (on a new port: clients find it by its api.url); its
clients move to the other, and go on waiting there for the requests they had.

After the last disturbance the clients stop, the faults stop, the launchers
restart calm, the pool settles (every request ended: each had a deadline), and the
run checks (tests/chaos/invariants.py): each node's history follows the state
table, no node went to two requests nor two clients, no request was lost (every
one a server accepted is stored and ended as its client was told; none stored
twice, none the API refused stored), the clouds and the store agree, no provider
was driven by two launchers at once (the lease generations in the history), every
provider a dead launcher held was taken again within one lease TTL plus one pass
(plus `slack` for a loaded machine), and provider and label max-nodes held
throughout.
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import make_url

from freshpool.api import tokens
from freshpool.core.states import BuildState
from freshpool.store import Store
from tests.chaos import fleetclient, invariants
from tests.chaos.proxy import CutProxy
from tests.store.pg import TempPostgres
from tests.support import stop_group

LAUNCHERS = ("a", "b", "c")
CUT = "c"  # the launcher behind the proxy
API_SERVERS = ("api-1", "api-2")
PROVIDERS = [f"cloud-{i}" for i in range(6)]
PROVIDER_MAX = 4
LABEL_MAX = 16
MIN_READY = 6
PHASES = ("launch", "created", "tested", "delete", "deleted")


@dataclass(frozen=True)
class Size:
    """How much chaos: disturbances of each kind, and the clients' load."""

    kills: int = 55
    cuts: int = 22
    api_kills: int = 10
    client_kills: int = 4
    concurrency: int = 1000  # client tasks, each with one request in flight
    client_procs: int = 4
    timeouts: tuple[float, float] = (5.0, 15.0)  # each request's, drawn between these


@dataclass
class FleetReport:
    seed: int
    ttl: float
    kill_points: int = 0
    crash_point_kills: dict[str, int] = field(default_factory=dict)
    timed_kills: int = 0
    cuts: int = 0
    cut_blocks: int = 0
    connections_dropped: int = 0
    api_kills: int = 0
    client_kills: int = 0
    concurrency: int = 0
    # The most requests pending in the store at once (sampled each second).
    pending_peak: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    # Accepted by one API server, seen to their end on the other (the first died).
    resumed_elsewhere: int = 0
    unanswered: int = 0  # POSTs whose server died before answering
    unanswered_stored: int = 0  # of those, stored before it died (ended all the same)
    refused: dict[str, int] = field(default_factory=dict)  # by HTTP status
    moves: int = 0  # long-polls moved to the other server
    acquired: int = 0
    nodes_seen: int = 0
    handed_out: int = 0
    lease_takes: int = 0
    generations_writing: int = 0
    failovers: int = 0
    failover_p50_s: float = 0.0
    failover_max_s: float = 0.0
    failover_limit_s: float = 0.0
    most_nodes: dict[str, int] = field(default_factory=dict)
    # Processes that ended other than as the run ended them (a bug the run found).
    unexpected_exits: list[str] = field(default_factory=list)
    violations: int = 0
    settle_s: float = 0.0
    wall_s: float = 0.0


class Chaos:
    def __init__(
        self, root: Path, postgres: TempPostgres, seed: int, ttl: float, size: Size
    ) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.seed = seed
        self.ttl = ttl
        self.size = size
        self.url = postgres.new_database()
        self.proxy = CutProxy(str(postgres.socket / ".s.PGSQL.5432"))
        dbname = make_url(self.url).database
        self.proxied_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.proxy.port}/{dbname}"
        self.store = Store(self.url)
        build = self.store.new_build("img-1", "img", str(root / "no-layers"))
        self.store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "chaos")
        # One tenant's token, good on every API server: tokens live in the database.
        self.token = tokens.create(self.store, "chaos")[1]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # launchers
        self.apis: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: dict[int, subprocess.Popen[bytes]] = {}
        self.armed: dict[str, str] = {}  # launcher -> the crash point it was started at
        self.starts = 0
        self.deaths: list[tuple[float, str]] = []
        self.client_runs = 0
        self.started_wall: dict[str, float] = {}
        self.up_at: dict[str, float] = {}  # launcher -> when it was first seen up

    # ----------------------------------------------------------- processes

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
        api = "port: 0" if name in API_SERVERS else "enabled: false"
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

    def _spawn(
        self, name: str, argv: list[str], faults: bool, crash: str | None
    ) -> subprocess.Popen[bytes]:
        self.starts += 1
        path = self.root / f"{name}.yaml"
        path.write_text(self.config_text(name, faults))
        (self.root / name / "api.url").unlink(missing_ok=True)
        env = dict(os.environ)
        env.pop("FRESHPOOL_CRASH_AT", None)
        if crash:
            env["FRESHPOOL_CRASH_AT"] = crash
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "freshpool", "serve", *argv, "-c", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        finally:
            log.close()

    def start(self, name: str, faults: bool = True, crash: str | None = None) -> None:
        self.started_wall[name] = time.time()
        self.up_at.pop(name, None)
        if crash:
            self.armed[name] = crash
        else:
            self.armed.pop(name, None)
        self.procs[name] = self._spawn(name, ["--no-build"], faults, crash)

    def start_api(self, name: str) -> None:
        self.apis[name] = self._spawn(name, ["--api-only"], False, None)

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

    def api_up(self, name: str) -> bool:
        """Whether API server `name` listens (it writes api.url once it serves)."""
        return name in self.apis and (self.root / name / "api.url").exists()

    def kill(self, name: str) -> None:
        """kill -9 the launcher's whole process group (every process of it)."""
        _kill_group(self.procs.pop(name))
        self.deaths.append((time.time(), name))
        self.armed.pop(name, None)

    def kill_api(self, name: str) -> None:
        _kill_group(self.apis.pop(name))

    def start_client(self, i: int) -> None:
        """Client process `i` (again, if it died), with its share of the tasks."""
        size = self.size
        share = size.concurrency // size.client_procs
        share += 1 if i < size.concurrency % size.client_procs else 0
        self.client_runs += 1
        argv = [
            sys.executable, "-m", "tests.chaos.fleetclient",
            "--root", str(self.root), "--servers", ",".join(API_SERVERS),
            "--token", self.token, "--stop", str(self.root / "stop"),
            "--out", str(self.root / f"client-{self.client_runs}.jsonl"),
            "--name", f"c{self.client_runs}", "--concurrency", str(share),
            "--seed", str(self.seed * 100 + self.client_runs),
            "--min-timeout", str(size.timeouts[0]), "--max-timeout", str(size.timeouts[1]),
        ]  # fmt: skip
        self.clients[i] = subprocess.Popen(argv, start_new_session=True)

    def kill_client(self, i: int) -> None:
        _kill_group(self.clients.pop(i))

    # ----------------------------------------------------------- looks

    def pending(self) -> int:
        with self.store.engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM requests WHERE state = 'pending'"
                ).scalar()
                or 0
            )

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
            and self.pending() == 0
        )

    def live_owners(self) -> dict[str, str]:
        now = time.time()
        return {p: x.owner for p, x in self.store.leases().items() if x.expires_at > now}

    def describe(self) -> str:
        rows = [(r.id, r.provider, r.state, r.external_id, r.reason) for r in self.store.nodes()]
        return (
            f"nodes {rows}; instances {self.instances()}; leases {self.live_owners()};"
            f" pending requests {self.pending()}"
        )

    def close(self) -> None:
        for process in [*self.clients.values(), *self.apis.values(), *self.procs.values()]:
            stop_group(process, grace=20)
        self.procs.clear()
        self.apis.clear()
        self.clients.clear()
        self.proxy.close()
        self.store.close()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_fleet_chaos(
    root: Path,
    postgres: TempPostgres,
    size: Size = Size(),
    seed: int = 1,
    ttl: float = 2.0,
    slack: float = 1.0,
    timeout: float = 3600.0,
) -> FleetReport:
    started = time.monotonic()
    report = FleetReport(seed=seed, ttl=ttl, concurrency=size.concurrency)
    chaos = Chaos(root, postgres, seed, ttl, size)
    try:
        for name in LAUNCHERS:
            chaos.start(name)
        for name in API_SERVERS:
            chaos.start_api(name)
        _wait(lambda: len(chaos.live_owners()) == len(PROVIDERS), 120, "every provider leased",
              chaos.describe)  # fmt: skip
        _wait(lambda: all(chaos.api_up(n) for n in API_SERVERS), 120, "the API servers up")
        for i in range(size.client_procs):
            chaos.start_client(i)
        Disturbance(chaos, report, started + timeout).run()
        _calm(chaos, report)
        _check(chaos, report, ttl + ttl / 10 + slack)
    except invariants.Violation:
        report.violations += 1
        raise
    finally:
        chaos.close()
        report.wall_s = round(time.monotonic() - started, 1)
    return report


class Disturbance:
    """Kill and cut until every kind of disturbance is done as often as the size
    says and the clients' requests were in flight at once, one launcher disturbance
    at a time."""

    def __init__(self, chaos: Chaos, report: FleetReport, deadline: float) -> None:
        self.chaos, self.report, self.deadline = chaos, report, deadline
        self.rng, self.ttl, self.size = chaos.rng, chaos.ttl, chaos.size
        self.restart_at: dict[str, float] = {}  # launcher -> when
        self.api_restart_at: dict[str, float] = {}
        self.next_at = time.monotonic() + self.rng.uniform(0.5, 1.5) * self.ttl
        self.unblocked_at = 0.0
        self.sample_at = 0.0

    def left(self) -> dict[str, int]:
        size, report = self.size, self.report
        return {
            "kill": size.kills - report.kill_points,
            "cut": size.cuts - report.cuts,
            "api": size.api_kills - report.api_kills,
            "client": size.client_kills - report.client_kills,
        }

    def loaded(self) -> bool:
        """The clients have had (nearly) all their requests pending at once."""
        return self.report.pending_peak >= 0.9 * self.size.concurrency

    def run(self) -> None:
        while any(n > 0 for n in self.left().values()) or not self.loaded():
            if time.monotonic() > self.deadline:
                raise invariants.Violation(f"chaos not done in time: {asdict(self.report)}")
            time.sleep(0.05)
            now = time.monotonic()
            if now >= self.sample_at:
                self.sample_at = now + 1.0
                self.report.pending_peak = max(self.report.pending_peak, self.chaos.pending())
            self.reap(now)
            self.restart(now)
            self.disturb(now)
        # Whatever is down comes back for the calm.
        for name in self.api_restart_at:
            self.chaos.start_api(name)

    def reap(self, now: float) -> None:
        """Processes that ended on their own: a launcher at the crash point it was armed
        at (the rest of its group goes too); anything else is a bug."""
        chaos, report = self.chaos, self.report
        for name, process in list(chaos.procs.items()):
            if process.poll() is not None:
                if process.returncode != -signal.SIGKILL or name not in chaos.armed:
                    report.unexpected_exits.append(f"{name}: exit {process.returncode}")
                phase = chaos.armed.get(name, "?").split(":")[0]
                chaos.kill(name)
                report.crash_point_kills[phase] = report.crash_point_kills.get(phase, 0) + 1
                report.kill_points += 1
                self.restart_at[name] = now + self.rng.uniform(0.3, 2.0) * self.ttl
        for name, process in list(chaos.apis.items()):
            if process.poll() is not None:
                report.unexpected_exits.append(f"{name}: exit {process.returncode}")
                chaos.kill_api(name)
                chaos.start_api(name)
        for i, process in list(chaos.clients.items()):
            if process.poll() is not None:
                report.unexpected_exits.append(f"client {i}: exit {process.returncode}")
                chaos.start_client(i)
        # An armed launcher that never came to its crash point within a few TTLs of
        # being up (its share handed over to it, launches made): a timed kill instead.
        for name in list(chaos.armed):
            if name in chaos.procs and chaos.up(name) and now - chaos.up_at[name] > 5 * self.ttl:
                chaos.kill(name)
                report.timed_kills += 1
                report.kill_points += 1
                self.restart_at[name] = now + self.rng.uniform(0.3, 2.0) * self.ttl

    def restart(self, now: float) -> None:
        chaos, rng = self.chaos, self.rng
        for name, when in list(self.restart_at.items()):
            if now >= when:
                del self.restart_at[name]
                # At most one launcher armed or down at a time.
                calm = not self.restart_at and not chaos.armed
                crash = None
                if calm and self.left()["kill"] > 0 and rng.random() < 0.6:
                    crash = f"{rng.choice(PHASES)}:{rng.randint(1, 6)}"
                chaos.start(name, crash=crash)
                self.next_at = max(self.next_at, now + rng.uniform(0.5, 1.0) * self.ttl)
        for name, when in list(self.api_restart_at.items()):
            if now >= when:
                del self.api_restart_at[name]
                chaos.start_api(name)

    def disturb(self, now: float) -> None:
        chaos, report, rng, ttl = self.chaos, self.report, self.rng, self.ttl
        left = {kind: n for kind, n in self.left().items() if n > 0}
        if now < self.next_at or not left:
            return
        (kind,) = rng.choices(list(left), weights=list(left.values()))
        if kind in ("kill", "cut"):
            # Every launcher up (a restarted one can take seconds on a loaded host): a
            # kill then always leaves live launchers to take over, as a cut does.
            if self.restart_at or now < self.unblocked_at:
                return
            if len(chaos.procs) < len(LAUNCHERS) or not all(chaos.up(n) for n in chaos.procs):
                return
        if kind == "kill" and not chaos.armed:
            victim = rng.choice(sorted(chaos.procs))
            chaos.kill(victim)
            report.timed_kills += 1
            report.kill_points += 1
            self.restart_at[victim] = now + rng.uniform(0.3, 2.0) * ttl
        elif kind == "cut" and not any(n != CUT for n in chaos.armed):
            block = rng.choice([0.0, 0.0, rng.uniform(0.2, 0.8) * ttl, rng.uniform(1.0, 2.0) * ttl])
            report.connections_dropped += chaos.proxy.cut(block)
            report.cuts += 1
            report.cut_blocks += 1 if block else 0
            self.unblocked_at = now + block
        elif kind == "api" and not self.api_restart_at and all(map(chaos.api_up, API_SERVERS)):
            victim = rng.choice(API_SERVERS)
            chaos.kill_api(victim)
            report.api_kills += 1
            self.api_restart_at[victim] = now + rng.uniform(0.5, 3.0) * ttl
        elif kind == "client":
            victim = rng.choice(sorted(chaos.clients))
            chaos.kill_client(victim)
            report.client_kills += 1
            chaos.start_client(victim)
        else:
            return
        self.next_at = now + rng.uniform(0.5, 1.5) * ttl


def _calm(chaos: Chaos, report: FleetReport) -> None:
    """Clients stop (each task after its request ends); the launchers restart without
    faults; the pool must settle, with every request ended."""
    (chaos.root / "stop").write_text("")
    wait = chaos.size.timeouts[1] + fleetclient.GRACE + 60
    for i, process in list(chaos.clients.items()):
        try:
            if process.wait(timeout=wait) != 0:
                report.unexpected_exits.append(f"client {i}: exit {process.returncode}")
        except subprocess.TimeoutExpired:
            report.unexpected_exits.append(f"client {i}: did not stop in {wait:.0f} s")
            _kill_group(process)
    chaos.clients.clear()
    for name in LAUNCHERS:
        if name in chaos.procs:
            stop_group(chaos.procs.pop(name), grace=30)
        chaos.start(name, faults=False)
    calm_started = time.monotonic()
    quiet = 0
    deadline = time.monotonic() + 180 + chaos.size.timeouts[1]
    while quiet < 4:
        if time.monotonic() > deadline:
            raise invariants.Violation(f"the fleet did not settle: {chaos.describe()}")
        quiet = quiet + 1 if chaos.settled() else 0
        time.sleep(0.5)
    report.settle_s = round(time.monotonic() - calm_started, 1)


def _check(chaos: Chaos, report: FleetReport, limit: float) -> None:
    store = chaos.store
    for name, process in chaos.apis.items():
        if process.poll() is not None:
            report.unexpected_exits.append(f"{name}: exit {process.returncode}")
    if report.unexpected_exits:
        raise invariants.Violation(f"processes ended on their own: {report.unexpected_exits}")
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
    _check_clients(chaos, report)


def _check_clients(chaos: Chaos, report: FleetReport) -> None:
    """What the clients were told, against the store and each other."""
    seen = fleetclient.read(sorted(chaos.root.glob("client-*.jsonl")))
    accepted, ended = seen["accepted"], seen["ended"]
    report.accepted = len(accepted)
    report.unanswered = len(seen["unanswered"])
    for _tag, status, _detail in seen["refused"]:
        report.refused[str(status)] = report.refused.get(str(status), 0) + 1
    report.resumed_elsewhere = sum(
        1 for r, (_s, _n, via) in ended.items() if r in accepted and accepted[r][1] != via
    )
    report.moves = sum(s["summary"]["moved"] for s in seen["summaries"])
    got = [node for state, nodes, _via in ended.values() if state == "fulfilled" for node in nodes]
    report.acquired = len(got)
    if len(got) != len(set(got)):
        raise invariants.Violation("a node went to two clients")
    stored = invariants.requests_end_as_told(
        chaos.store,
        {r: tag for r, (tag, _via) in accepted.items()},
        {r: (state, nodes) for r, (state, nodes, _via) in ended.items()},
        [tag for tag, _status, _detail in seen["refused"]],
    )
    report.unanswered_stored = sum(1 for tag in seen["unanswered"] if tag in stored)


def _wait(check, timeout: float, what: str, seen=str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise invariants.Violation(f"timed out waiting for {what}: {seen()}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    full = Size()
    parser.add_argument("--kills", type=int, default=full.kills)
    parser.add_argument("--cuts", type=int, default=full.cuts)
    parser.add_argument("--api-kills", type=int, default=full.api_kills)
    parser.add_argument("--client-kills", type=int, default=full.client_kills)
    parser.add_argument("--concurrency", type=int, default=full.concurrency,
                        help="client requests in flight at once")  # fmt: skip
    parser.add_argument("--client-procs", type=int, default=full.client_procs)
    parser.add_argument("--timeouts", type=float, nargs=2, default=full.timeouts,
                        metavar=("MIN", "MAX"), help="each request's timeout, seconds")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--slack", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    size = Size(
        args.kills, args.cuts, args.api_kills, args.client_kills, args.concurrency,
        args.client_procs, tuple(args.timeouts),
    )  # fmt: skip
    postgres = TempPostgres()
    root = Path(tempfile.mkdtemp(prefix="freshpool-fleet-chaos-"))
    try:
        report = run_fleet_chaos(root, postgres, size, args.seed, args.ttl, args.slack)
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
