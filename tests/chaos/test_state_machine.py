"""Property-based: random sequences of events never break an invariant.

Hypothesis drives a real store and the sim driver (a simulated cloud in SQLite)
through launcher passes, hand-outs, releases, holds, deletes, launcher crashes
(the launcher object is dropped and a new one recovers), instances vanishing
behind our back, and driver faults switched on and off. After every step the
history must follow the state table and no node may have gone to two requests.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from freshpool import launcher as launching
from freshpool.config import parse
from freshpool.core.errors import AcquireTimeout
from freshpool.core.states import BuildState, InvalidTransition, NodeState
from freshpool.dispatch import direct
from freshpool.drivers.base import load_driver
from freshpool.drivers.sim import SimDriver
from freshpool.launcher import Launcher
from freshpool.store import StaleState, Store
from tests.chaos import invariants

CONFIG = """
state-dir: {state}
cleanup-interval: 0.01
providers:
  - name: a
    driver: sim
    max-nodes: 6
    boot-timeout: 0.05
    breaker-cooldown: 0.01
  - name: b
    driver: sim
    max-nodes: 6
    boot-timeout: 0.05
    breaker-cooldown: 0.01
labels:
  - name: x
    image: img
    min-ready: 2
    job-timeout: 0.05
    max-hold-age: 0.05
    health-interval: 0
  - name: y
    image: img
    min-ready: 1
    health-interval: 0
images:
  - name: img
"""


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="freshpool-prop-"))
        self.config = parse(CONFIG.format(state=self.tmp / "state"))
        self.store = Store.open(self.config.state_dir)
        build = self.store.new_build("img-1", "img", str(self.tmp))
        self.store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "sim")
        self.launcher = self._new_launcher()
        self.held: list[int] = []

    def _new_launcher(self) -> Launcher:
        drivers = {
            p.name: load_driver(p, self.store.cluster_id, self.config.state_dir)
            for p in self.config.providers
        }
        launcher = launching.build(self.config, self.store, drivers, images=False, publish=False)
        launcher.pass_once()  # recovery first, as a restarted launcher does
        return launcher

    def teardown(self) -> None:
        if self.store.engine.dialect.name == "postgresql":
            # One database serves the test's every example: the next starts empty.
            with self.store.engine.begin() as conn:
                conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(passes=st.integers(min_value=1, max_value=8))
    def reconcile(self, passes: int) -> None:
        for _ in range(passes):
            self.launcher.pass_once()

    @rule(labels=st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=3))
    def acquire(self, labels: list[str]) -> None:
        try:
            nodes = direct.acquire(self.config, self.store, labels, timeout=0)
        except AcquireTimeout:
            return
        assert len({n.id for n in nodes}) == len(labels)
        assert len({n.provider for n in nodes}) == 1

    # Nodes are picked by a fixed-range index: which rows exist depends on timing,
    # and Hypothesis needs the drawn data itself to be independent of it.
    @rule(pick=st.integers(0, 999), action=st.sampled_from(["release", "hold", "delete"]))
    def act_on_a_node(self, pick: int, action: str) -> None:
        rows = self.store.nodes()
        if not rows:
            return
        node = rows[pick % len(rows)]
        # Refused moves are fine; a forbidden one must raise, never happen.
        # The calls the API and the CLI make.
        with contextlib.suppress(InvalidTransition, StaleState):
            if action == "release":
                self.store.release_set(node.id, "released")
            else:
                to = NodeState.HOLD if action == "hold" else NodeState.DELETING
                self.store.move(node.id, to, action)

    @rule()
    def crash_and_restart(self) -> None:
        self.launcher = self._new_launcher()

    @rule(pick=st.integers(0, 999))
    def instance_vanishes(self, pick: int) -> None:
        rows = [n for n in self.store.nodes() if n.state in ("ready", "in-use")]
        if not rows:
            return
        node = rows[pick % len(rows)]
        db = sqlite3.connect(self.config.state_dir / "providers" / node.provider / "sim.db")
        db.execute("DELETE FROM instances WHERE node_id = ?", (node.id,))
        db.commit()
        db.close()

    @rule(
        provider=st.sampled_from(["a", "b"]),
        failure=st.sampled_from([0.0, 0.5, 1.0]),
        lie=st.sampled_from([0.0, 1.0]),
    )
    def set_faults(self, provider: str, failure: float, lie: float) -> None:
        driver = self.launcher.drivers[provider]
        assert isinstance(driver, SimDriver)
        driver.settings = driver.settings.model_copy(
            update={"failure_rate": failure, "lie_rate": lie}
        )

    @invariant()
    def history_is_sound(self) -> None:
        invariants.history_follows_the_state_table(self.store)
        invariants.no_node_handed_out_twice(self.store)
        invariants.no_request_lost(self.store)

    @invariant()
    def ready_means_tested(self) -> None:
        for node in self.store.nodes(["ready"]):
            steps = [e.to_state for e in self.store.events(node.id)]
            assert steps[:3] == ["building", "testing", "ready"], steps


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
