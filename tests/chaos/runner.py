"""The chaos run: kill -9 the launcher (and clients) at seeded points, restart, check invariants.

    python -m tests.chaos.runner --driver sim --kills 200 --faults --seed 1
    python -m tests.chaos.runner --driver local --kills 20

Each cycle forks a launcher and a client that acquires and releases nodes, then
kills the launcher either at a named crash point (freshpool.crashpoints: launch,
created, tested, delete, deleted; the client at handoff) or after a random time.
After the last kill the faults stop, a fresh launcher recovers, and the run checks:
every node's history follows the state table, no node went to two requests, no
request was lost, and store and driver agree (no leak, no ghost row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from freshpool import crashpoints
from freshpool import launcher as launching
from freshpool.config import Config, parse
from freshpool.core.errors import AcquireTimeout
from freshpool.core.states import BuildState, NodeState
from freshpool.dispatch import direct
from freshpool.drivers.base import load_driver
from freshpool.launcher import Launcher
from freshpool.store import Store
from tests.chaos import invariants

SIM_FAULTS = "{failure-rate: 0.3, timeout-rate: 0.1, lie-rate: 0.2, seed: %d}"


@dataclass
class ChaosReport:
    driver: str
    seed: int
    faults: bool
    kill_points: int = 0
    crash_point_kills: dict[str, int] = field(default_factory=dict)
    timed_kills: int = 0
    client_kills: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    nodes_seen: int = 0
    handed_out: int = 0
    violations: int = 0
    recovery_s: float = 0.0
    wall_s: float = 0.0


def config_text(
    state_dir: Path, driver: str, faults: bool, seed: int, min_ready: int, subnet: int
) -> str:
    if driver == "sim":
        sim = f"    sim: {SIM_FAULTS % seed}\n" if faults else f"    sim: {{seed: {seed}}}\n"
        provider = (
            "  - name: cloud\n    driver: sim\n    max-nodes: 12\n    boot-timeout: 0.3\n"
            "    breaker-cooldown: 0.2\n" + sim
        )
    else:
        provider = (
            "  - name: local\n    driver: local\n    max-nodes: 8\n"
            f"    network: {{subnet: 10.{subnet}.0.0/24}}\n"
        )
    return f"""
state-dir: {state_dir}
interval: 0.02
cleanup-interval: 0.1
providers:
{provider}
labels:
  - name: debian
    image: debian-bookworm
    min-ready: {min_ready}
    job-timeout: 1.0
    max-hold-age: 0.5
    health-interval: 0
images:
  - name: debian-bookworm
"""


def _launcher(config: Config) -> tuple[Store, Launcher]:
    store = Store.open(config.state_dir)
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    return store, launching.build(config, store, drivers, images=False, publish=False)


def _child(work) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _run_launcher(config: Config, phase: str | None, nth: int) -> None:
    if phase:
        crashpoints.arm(phase, nth)
    _store, launcher = _launcher(config)
    while True:
        launcher.pass_once()
        time.sleep(0.005)


def _run_client(config: Config, seed: int, crash_nth: int | None) -> None:
    rng = random.Random(seed)
    if crash_nth:
        crashpoints.arm("handoff", crash_nth)
    store = Store.open(config.state_dir)
    while True:
        try:
            (node,) = direct.acquire(config, store, ["debian"], timeout=0.3)
        except AcquireTimeout:
            continue
        roll = rng.random()
        try:
            if roll < 0.6:
                # The calls the API and the CLI make.
                store.release_set(node.id, "released")
            elif roll < 0.7:
                store.move(node.id, NodeState.HOLD, "held")
            elif roll < 0.8:
                store.move(node.id, NodeState.DELETING, "deleted by operator")
            # else: the "job" dies holding the node; the job timeout reclaims it
        except Exception:
            pass


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # reaped already
    return done == 0


def run_chaos(
    root: Path,
    driver: str = "sim",
    kills: int = 50,
    seed: int = 1,
    faults: bool = False,
    image_dir: Path | None = None,
    min_ready: int = 4,
    subnet: int = 217,
) -> ChaosReport:
    started = time.monotonic()
    # Thousands of expected warnings (timeouts, restarts) would drown the report.
    logging.getLogger("freshpool").setLevel(logging.ERROR)
    rng = random.Random(seed)
    report = ChaosReport(driver=driver, seed=seed, faults=faults)
    state_dir = root / "state"
    chaos_config = parse(config_text(state_dir, driver, faults, seed, min_ready, subnet))
    calm_config = parse(config_text(state_dir, driver, False, seed, min_ready, subnet))
    store = Store.open(state_dir)
    build_path = image_dir or root / "no-layers"
    build = store.new_build("debian-bookworm-chaos", "debian-bookworm", str(build_path))
    store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "chaos")
    store.close()

    client = 0
    phases = [p for p in crashpoints.PHASES if p != "handoff"]
    try:
        for cycle in range(kills):
            if not client or not _alive(client):
                crash_nth = rng.randint(1, 6) if rng.random() < 0.3 else None
                client = _child(
                    lambda s=seed * 1000 + cycle, n=crash_nth: _run_client(chaos_config, s, n)
                )
            phase = rng.choice(phases) if rng.random() < 0.5 else None
            nth = rng.randint(1, 4)
            pid = _child(lambda p=phase, n=nth: _run_launcher(chaos_config, p, n))
            deadline = time.monotonic() + rng.uniform(0.02, 0.4 if driver == "sim" else 1.0)
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.005)
            if _alive(pid):
                _kill(pid)
                report.timed_kills += 1
            else:
                report.crash_point_kills[phase or "?"] = (
                    report.crash_point_kills.get(phase or "?", 0) + 1
                )
            report.kill_points += 1
            if rng.random() < 0.2:
                _kill(client)
                client = 0
                report.client_kills += 1
    finally:
        if client:
            _kill(client)

    # Faults off: a fresh launcher must bring everything back in line.
    calm_started = time.monotonic()
    store, launcher = _launcher(calm_config)
    try:
        deadline = time.monotonic() + 120
        while True:
            launcher.pass_once()
            # Extra ready nodes (launched for requests whose clients died) may stay warm;
            # everything else must be gone.
            rows = store.nodes()
            settled = (
                len(rows) >= min_ready
                and {n.state for n in rows} == {"ready"}
                and not launcher.busy()
            )
            if settled:
                report.recovery_s = round(time.monotonic() - calm_started, 2)
                # Two sweeps agree before anything counts as leaked.
                launcher.leaks.sweep()
                launcher.leaks.sweep()
                while launcher.leaks.deleting:
                    launcher.pass_once()
                    time.sleep(0.005)
                try:
                    invariants.store_and_driver_agree(store, launcher.drivers)
                    break
                except invariants.Violation:
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise invariants.Violation(
                    f"pool did not settle: {[(n.id, n.state, n.reason) for n in store.nodes()]}"
                )
            time.sleep(0.005)
        figures = invariants.check_history(store)
        report.nodes_seen = figures["nodes"]
        report.handed_out = figures["handed_out"]
        report.requests = {
            k.removeprefix("requests_"): v for k, v in figures.items() if k.startswith("requests_")
        }
    finally:
        for driver_ in launcher.drivers.values():
            for instance in driver_.list_instances():
                driver_.delete(instance.external_id).wait(timeout=30)
            teardown = getattr(driver_, "teardown", None)
            if teardown:
                teardown()
        store.close()
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--driver", choices=("sim", "local"), default="sim")
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", action="store_true")
    args = parser.parse_args()
    image_dir = None
    if args.driver == "local":
        from freshpool.images.debootstrap import build_cached
        from tests.conftest import IMAGE_CACHE, TEST_IMAGE

        image_dir = build_cached(TEST_IMAGE, IMAGE_CACHE)
    with tempfile.TemporaryDirectory(prefix="freshpool-chaos-") as tmp:
        try:
            report = run_chaos(
                Path(tmp), args.driver, args.kills, args.seed, args.faults, image_dir
            )
        except invariants.Violation as exc:
            print(f"VIOLATION: {exc}")
            raise SystemExit(1) from None
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
