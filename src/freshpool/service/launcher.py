"""The launcher: a level-triggered loop that makes the pool what the config wants.

Each pass compares wanted (min-ready plus waiting requests, per label) with what
exists, starts launches within provider limits, advances every operation in flight
without blocking, tests new nodes, and deletes used and failed ones. One thread
drives thousands of operations; drivers return non-blocking operations.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from freshpool import crashpoints
from freshpool.config import Config, Label, Provider
from freshpool.core import timeouts
from freshpool.core.states import (
    NODE_SUPPLY_STATES,
    NODE_TO_DELETE_STATES,
    NODE_TRANSITIONS,
    BuildState,
    NodeState,
    RequestState,
)
from freshpool.drivers.base import (
    CommandResult,
    DoneOperation,
    Driver,
    Instance,
    NodeSpec,
    Operation,
    SshAccess,
    Tags,
)
from freshpool.service.cleanup import LeakSweeper
from freshpool.service.gate import ProviderGate
from freshpool.service.imaging import uses_layers_in_place
from freshpool.service.retry import DRIVER_RETRY, RetryPolicy
from freshpool.store import NodeRow, StaleState, Store
from freshpool.store.builds import ServingBuild
from freshpool.store.nodes import Move

# Passes that change nothing, started by a change or a wake, take at most this
# share of the time.
CHANGE_SHARE = 0.2

log = logging.getLogger("freshpool.launcher")
N = NodeState


@dataclass
class InFlight:
    """Operations this process is advancing, by node id."""

    creating: dict[int, Operation[Instance]] = field(default_factory=dict)
    testing: dict[int, CommandResult] = field(default_factory=dict)
    deleting: dict[int, Operation[None]] = field(default_factory=dict)
    # Health checks of ready nodes.
    checking: dict[int, CommandResult] = field(default_factory=dict)
    # When each delete in flight is given up on (monotonic), per provider delete-timeout.
    delete_deadline: dict[int, float] = field(default_factory=dict)
    # The provider of each delete in flight (its gate hears how the call went).
    delete_on: dict[int, str] = field(default_factory=dict)
    # Instances with no row (strays found by tag), by (provider, external id).
    strays: dict[tuple[str, str], Operation[None]] = field(default_factory=dict)
    # (provider, label) of each node being created or tested.
    launch_of: dict[int, tuple[str, str]] = field(default_factory=dict)

    def operations(self) -> list[Operation]:
        return [
            *self.creating.values(),
            *self.testing.values(),
            *self.deleting.values(),
            *self.checking.values(),
            *self.strays.values(),
        ]

    def busy(self) -> set[int]:
        return {*self.creating, *self.testing, *self.deleting}

    def launches_on(self, provider: str) -> int:
        return sum(1 for p, _ in self.launch_of.values() if p == provider)


class Launcher:
    def __init__(
        self,
        config: Config,
        store: Store,
        drivers: dict[str, Driver],
        retry: RetryPolicy = DRIVER_RETRY,
    ) -> None:
        self.config = config
        self.store = store
        self.drivers = drivers
        self.retry = retry
        self.ops = InFlight()
        self._warned: dict[str, float] = {}
        # Consecutive launch failures per (provider, label), and when launching may resume:
        # a broken image must not turn into a tight create-fail-delete loop.
        self._failures: Counter[tuple[str, str]] = Counter()
        self._paused_until: dict[tuple[str, str], float] = {}
        # Other services that run once per pass in this loop (the request scheduler,
        # the image keeper...), so one thread and one wake-up drive them all.
        self._passes: list[Callable[[], None]] = []
        self._woken = threading.Event()
        self._last_pass = 0.0
        self._last_took = 0.0
        self._last_wrote = False
        self.gates = {p.name: ProviderGate(p) for p in config.providers if p.name in drivers}
        self.sweeper = LeakSweeper()
        self.leaks_found = 0
        self._next_sweep = 0.0
        self._throttled: set[str] = set()
        self._providers = {p.name: p for p in config.providers}
        self._labels = {x.name: x for x in config.labels}
        self._next_periodic: dict[str, float] = {}
        self._shortest_limit = min(
            (
                limit
                for label in config.labels
                for provider in config.providers
                for state in timeouts.TIMED_STATES
                if (limit := timeouts.limit(state, label, provider)) is not None
            ),
            default=0.0,
        )

    def wake(self) -> None:
        """Start the next pass now (thread-safe; e.g. an API request just arrived)."""
        self._woken.set()

    def add_pass(self, work: Callable[[], None]) -> None:
        """Run `work` once per reconcile pass, after launching; it must not block."""
        self._passes.append(work)

    # ------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        self.recover()
        watcher = self.store.change_watcher()
        try:
            while not stop.is_set():
                self.reconcile()
                self._sleep(stop, watcher.changed)
        finally:
            watcher.close()
            self.shutdown()

    def _sleep(self, stop: threading.Event, changed) -> None:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        wake = now + self.config.interval
        pending = self.ops.operations()
        if pending:
            wake = min(wake, max(now, min(op.not_before for op in pending)))
        if self._throttled:
            # Demand was left unmet by a rate limit: come back when a call is allowed.
            wake = min(wake, now + min(self.gates[p].next_token_in() for p in self._throttled))
        # Poll the store's change counter (one cheap pragma) so a release or a new
        # request from another process is acted on within milliseconds. After a
        # pass that changed nothing, a change or a wake starts the next pass no
        # sooner than would make such passes take more than CHANGE_SHARE of the
        # time (a 5 ms pass: 25 ms after it began): under a stream of hand-outs
        # every commit is a change, and back-to-back idle passes would take half
        # the process's time (the GIL) from the hand-outs. A pass that wrote made
        # progress, and the next one follows at once.
        idle_gap = 0.0 if self._last_wrote else self._last_took / CHANGE_SHARE
        soonest = self._last_pass + idle_gap
        poked = False
        while not stop.is_set():
            now = time.monotonic()
            if now >= wake:
                return
            if not poked:
                poked = changed()
                if not poked and self._woken.wait(min(0.02, wake - now)):
                    self._woken.clear()
                    poked = True
            if poked:
                if now >= soonest:
                    return
                stop.wait(min(soonest, wake) - now)

    def reconcile(self) -> None:
        """One pass: advance operations, delete what must go, launch what is missing."""
        self._last_pass = time.monotonic()
        writes = self.store.writes_here()
        try:
            self._reconcile()
        finally:
            self._last_took = time.monotonic() - self._last_pass
            self._last_wrote = self.store.writes_here() != writes

    def _reconcile(self) -> None:
        self._advance()
        self._expire_requests()
        self._enforce_timeouts()
        self._sweep_leaks()
        self._start_deletes()
        self._launch()
        self._health_checks()
        for work in self._passes:
            work()

    # ------------------------------------------------------- start and stop

    def recover(self) -> None:
        """Reconcile with what exists after a start: adopt known live nodes, delete strays."""
        self.store.release_delete_leases(time.time())
        for name, driver in self.drivers.items():
            instances = {i.tags.node_id: i for i in driver.list_instances() if i.tags}
            rows = {row.id: row for row in self.store.nodes(provider=name)}
            for row in rows.values():
                instance = instances.get(row.id)
                if row.state in (N.BUILDING, N.TESTING):
                    self._fail(row, f"launcher restarted while the node was {row.state}")
                elif row.state in (N.READY, N.IN_USE, N.HOLD):
                    if instance is None or not instance.alive:
                        self._fail(row, "instance vanished while the launcher was down")
                    else:
                        log.info("node %s: adopted (%s)", row.id, row.state)
            for node_id, instance in instances.items():
                if node_id not in rows:
                    log.warning(
                        "provider %s: stray instance %s (node %s has no row): deleting",
                        name,
                        instance.external_id,
                        node_id,
                    )
                    self.ops.strays[(name, instance.external_id)] = driver.delete(
                        instance.external_id
                    )

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop cleanly: finish deletes, and undo launches that did not reach ready."""
        deadline = time.monotonic() + timeout
        for node_id in list(self.ops.testing):
            self.ops.testing.pop(node_id)
            self.ops.launch_of.pop(node_id, None)
            self._fail_id(node_id, N.TESTING, "launcher stopped before the test finished")
        while time.monotonic() < deadline and (
            self.ops.creating or self.ops.deleting or self.ops.strays
        ):
            self._advance(shutting_down=True)
            self._start_deletes()
            time.sleep(0.01)
        if self.ops.operations():
            log.warning(
                "stopped with %d operations unfinished; the next start cleans them up",
                len(self.ops.operations()),
            )

    # --------------------------------------------------- advancing operations

    def _advance(self, shutting_down: bool = False) -> None:
        # Operations that finish together are recorded together: one transaction for
        # all the nodes a pass finds created, one for all it finds tested. A rate
        # limit's burst makes hundreds finish in the same pass, and a transaction
        # each took the pass past half a second.
        now = time.monotonic()
        created: list[tuple[int, Operation[Instance]]] = []
        for node_id, op in list(self.ops.creating.items()):
            if now >= op.not_before:
                op.advance()
            if op.done:
                del self.ops.creating[node_id]
                created.append((node_id, op))
        self._created(created, shutting_down)
        tested: list[tuple[int, CommandResult]] = []
        for node_id, test in list(self.ops.testing.items()):
            if now >= test.not_before:
                test.advance()
            if test.done:
                del self.ops.testing[node_id]
                tested.append((node_id, test))
        self._tested(tested)
        for node_id, check in list(self.ops.checking.items()):
            if now >= check.not_before:
                check.advance()
            if check.done:
                del self.ops.checking[node_id]
                self._checked(node_id, check)
        deleted: list[tuple[int, str, Operation[None]]] = []
        for node_id, op in list(self.ops.deleting.items()):
            if now >= op.not_before:
                op.advance()
            if not op.done and now > self.ops.delete_deadline.get(node_id, now):
                op = DoneOperation(error=TimeoutError("the delete did not finish in time"))
            if op.done:
                del self.ops.deleting[node_id]
                self.ops.delete_deadline.pop(node_id, None)
                deleted.append((node_id, self.ops.delete_on.pop(node_id, ""), op))
        self._deleted(deleted)
        for key, op in list(self.ops.strays.items()):
            if now >= op.not_before:
                op.advance()
            if op.done:
                del self.ops.strays[key]
                if op.error:
                    log.warning("stray %s on %s: delete failed: %s", key[1], key[0], op.error)
                else:
                    log.info("stray %s on %s: deleted", key[1], key[0])

    def _launch_outcome(self, node_id: int, ok: bool) -> None:
        key = self.ops.launch_of.pop(node_id, None)
        if key is None:
            return
        if ok:
            self._failures.pop(key, None)
            self._paused_until.pop(key, None)
            return
        self._failures[key] += 1
        delay = self.retry.delay(self._failures[key] - 1)
        self._paused_until[key] = time.monotonic() + delay
        log.warning(
            "provider %s label %s: %d launch failures in a row; next launch in %.0f s",
            key[0],
            key[1],
            self._failures[key],
            delay,
        )

    def _created(
        self, done: list[tuple[int, Operation[Instance]]], shutting_down: bool = False
    ) -> None:
        up: list[tuple[int, Instance]] = []
        for node_id, op in done:
            gate = self.gates.get(self.ops.launch_of.get(node_id, ("", ""))[0])
            if op.error is not None:
                if gate is not None:
                    gate.failure(str(op.error))
                self._launch_outcome(node_id, ok=False)
                self._fail_id(node_id, N.BUILDING, f"launch failed: {op.error}")
                continue
            if gate is not None:
                gate.success()
            assert op.result is not None
            if shutting_down:
                self._fail_id(
                    node_id,
                    N.BUILDING,
                    "launcher stopped before the node was tested",
                    _instance_values(op.result),
                )
                continue
            crashpoints.point("created")
            up.append((node_id, op.result))
        moves = [
            Move(node_id, N.BUILDING, N.TESTING, "instance up", _instance_values(instance))
            for node_id, instance in up
        ]
        for (node_id, instance), row in zip(up, self.store.transitions(moves), strict=True):
            if isinstance(row, StaleState):
                # Someone deleted it while it was being created; the deleter takes it
                # from here.
                self.ops.launch_of.pop(node_id, None)
                self.store.set_instance(node_id, **_instance_values(instance))
                continue
            label = self.config.label(row.label)
            test = self.drivers[row.provider].run_command(
                instance.external_id, instance.access, label.ready_command, label.test_timeout
            )
            test.advance()
            self.ops.testing[node_id] = test

    def _tested(self, done: list[tuple[int, CommandResult]]) -> None:
        passed: list[int] = []
        for node_id, test in done:
            ok = test.error is None and test.result == 0
            self._launch_outcome(node_id, ok=ok)
            if ok:
                crashpoints.point("tested")
                passed.append(node_id)
                continue
            tail = test.output.strip().splitlines()[-3:]
            why = (
                f"test failed: {test.error}"
                if test.error is not None
                else f"ready command exited {test.result}"
            )
            if tail:
                why += f": {' | '.join(tail)}"
            self._fail_id(node_id, N.TESTING, why)
        moves = [Move(node_id, N.TESTING, N.READY, "ready command passed") for node_id in passed]
        for node_id, row in zip(passed, self.store.transitions(moves), strict=True):
            if not isinstance(row, StaleState):
                log.info("node %s: ready", node_id)

    def _deleted(self, done: list[tuple[int, str, Operation[None]]]) -> None:
        gone: list[int] = []
        for node_id, provider, op in done:
            gate = self.gates.get(provider)
            if gate is not None:
                if op.error is None:
                    gate.success()
                else:
                    gate.failure(str(op.error))
            if op.error is None:
                crashpoints.point("deleted")
                gone.append(node_id)
            else:
                self._delete_failed(node_id, op.error)
        removals = [(node_id, "instance confirmed gone") for node_id in gone]
        for node_id, stale in zip(gone, self.store.remove_nodes(removals), strict=True):
            if stale is None:
                log.info("node %s: deleted", node_id)
            else:
                log.error("node %s: %s", node_id, stale)

    def _delete_failed(self, node_id: int, error: BaseException) -> None:
        row = self.store.node(node_id)
        attempt = row.delete_attempts
        delay = self.retry.delay(attempt)
        log.warning(
            "node %s: delete failed (try %d), retry in %.0f s: %s",
            node_id,
            attempt + 1,
            delay,
            error,
        )
        self.store.record_delete_failure(node_id, str(error), time.time() + delay)

    def _fail(self, row: NodeRow, reason: str) -> None:
        self._fail_id(row.id, N(row.state), reason)

    def _fail_id(
        self, node_id: int, expect: NodeState, reason: str, values: dict | None = None
    ) -> None:
        # A held node is never quarantined as failed (the state table says so):
        # when it must go, it goes straight to deleting.
        target = N.FAILED if N.FAILED in NODE_TRANSITIONS[expect] else N.DELETING
        try:
            self.store.transition(node_id, expect, target, reason, **(values or {}))
            log.warning("node %s: %s: %s", node_id, target, reason)
        except StaleState:
            if values:
                self.store.set_instance(node_id, **values)

    # ------------------------------------------------------------- deleting

    def _start_deletes(self) -> None:
        self.store.transitions(
            [
                Move(row.id, N(row.state), N.DELETING, f"{row.state}: delete")
                for row in self.store.nodes(states_in=sorted(NODE_TO_DELETE_STATES))
                if row.id not in self.ops.creating
            ]
        )
        now = time.time()
        never_created: list[tuple[int, str]] = []
        # (row, its driver, its instance, its delete timeout)
        starting: list[tuple[NodeRow, Driver, str, float]] = []
        for row in self.store.due_for_delete(now):
            if row.id in self.ops.deleting or row.id in self.ops.creating:
                continue
            driver = self.drivers.get(row.provider)
            if driver is None:
                self._warn_once(
                    f"provider:{row.provider}",
                    f"node {row.id}: provider {row.provider!r} is not configured;"
                    " cannot delete it until it is",
                )
                continue
            external_id = row.external_id or driver.external_id_for(
                Tags(self.store.cluster_id, row.id, row.build_id)
            )
            if external_id is None:
                external_id = self._find_external_id(driver, row.id)
            if external_id is None:
                # Never created at the provider: nothing to delete.
                never_created.append((row.id, "no instance was ever created"))
                continue
            if not self.gates[row.provider].take():
                self._throttled.add(row.provider)
                continue
            timeout = self._providers[row.provider].delete_timeout
            starting.append((row, driver, external_id, timeout))
        self.store.remove_nodes(never_created)
        # The leases keep these rows out of the next passes' queries while the
        # deletes run; each expires by itself if this launcher dies. Written before
        # the calls, so no other launcher starts the same delete meanwhile.
        self.store.lease_deletes({row.id: now + timeout for row, _, _, timeout in starting})
        for row, driver, external_id, timeout in starting:
            op = driver.delete(external_id)
            op.advance()
            crashpoints.point("delete")
            self.ops.deleting[row.id] = op
            self.ops.delete_deadline[row.id] = time.monotonic() + timeout
            self.ops.delete_on[row.id] = row.provider

    @staticmethod
    def _find_external_id(driver: Driver, node_id: int) -> str | None:
        for instance in driver.list_instances():
            if instance.tags and instance.tags.node_id == node_id:
                return instance.external_id
        return None

    def _periodic_due(self, task: str) -> bool:
        """Timeouts and health checks need second-scale precision, not every pass."""
        now = time.monotonic()
        if now < self._next_periodic.get(task, 0.0):
            return False
        self._next_periodic[task] = now + self.config.interval
        return True

    def _enforce_timeouts(self) -> None:
        """Move on every node that stayed too long in its state (see service/timeouts.py)."""
        if not self._periodic_due("timeouts"):
            return
        now = time.time()
        # Only rows older than the shortest limit anywhere can be overdue.
        for row in self.store.in_state_since_before(
            timeouts.TIMED_STATES, now - self._shortest_limit
        ):
            provider = self._providers.get(row.provider)
            label = self._labels.get(row.label)
            if provider is None or label is None:
                continue
            due = timeouts.overdue(N(row.state), now - row.state_at, label, provider)
            if due is None:
                continue
            # Give up on an operation that never finished; the delete cleans up after it.
            self.ops.creating.pop(row.id, None)
            self.ops.testing.pop(row.id, None)
            self.ops.checking.pop(row.id, None)
            if row.id in self.ops.launch_of:
                self._launch_outcome(row.id, ok=False)
            with contextlib.suppress(StaleState):
                self.store.transition(row.id, N(row.state), due.target, due.reason)
                log.warning("node %s: %s", row.id, due.reason)

    def _health_checks(self) -> None:
        """Re-test ready nodes now and then; a failing one is replaced before a job gets it."""
        if not self._periodic_due("health"):
            return
        now = time.time()
        for label in self.config.labels:
            if label.health_interval <= 0:
                continue
            for row in self.store.due_for_check(label.name, now - label.health_interval):
                if row.id in self.ops.checking:
                    continue
                driver = self.drivers.get(row.provider)
                if driver is None or row.external_id is None:
                    continue
                access = SshAccess(**row.access) if row.access else None
                check = driver.run_command(
                    row.external_id, access, label.ready_command, label.test_timeout
                )
                check.advance()
                self.ops.checking[row.id] = check

    def _checked(self, node_id: int, check: CommandResult) -> None:
        if check.error is None and check.result == 0:
            self.store.mark_checked(node_id)
            return
        why = (
            f"health check failed: {check.error}"
            if check.error is not None
            else f"health check: ready command exited {check.result}"
        )
        with contextlib.suppress(StaleState):  # handed out meanwhile: its job decides
            self.store.transition(node_id, N.READY, N.FAILED, why)
            log.warning("node %s: %s", node_id, why)

    def _sweep_leaks(self, force: bool = False) -> None:
        """Every cleanup-interval: delete leaked instances, replace vanished nodes."""
        now = time.monotonic()
        if not force and now < self._next_sweep:
            return
        self._next_sweep = now + self.config.cleanup_interval
        busy = self.ops.busy()
        for name, driver in self.drivers.items():
            try:
                instances = driver.list_instances()
            except Exception as exc:  # a listing failure must not stop the loop
                log.warning("provider %s: listing instances failed: %s", name, exc)
                self.gates[name].failure(f"list: {exc}")
                continue
            rows = self.store.nodes(provider=name)
            result = self.sweeper.sweep(name, instances, rows, busy)
            for instance in result.leaked:
                key = (name, instance.external_id)
                if key in self.ops.strays:
                    continue
                log.warning(
                    "provider %s: leaked instance %s (no node row, seen twice): deleting",
                    name,
                    instance.external_id,
                )
                self.leaks_found += 1
                self.ops.strays[key] = driver.delete(instance.external_id)
            for row in result.vanished:
                self._fail(row, "instance vanished at the provider")
            for row in result.gone:
                with contextlib.suppress(StaleState):
                    self.store.remove_node(row.id, "instance no longer listed by the provider")

    def _expire_requests(self) -> None:
        for request in self.store.overdue_requests(time.time(), self.config.request_timeout):
            with contextlib.suppress(StaleState):
                self.store.finish_request(
                    request.id, RequestState.FAILED, "deadline passed before nodes were ready"
                )

    # ------------------------------------------------------------ launching

    def _launch(self) -> None:
        self._throttled.clear()
        counts = self.store.node_counts()
        demand = self.store.pending_demand()
        used_by_provider: Counter[str] = Counter()
        supply: Counter[str] = Counter()
        for (provider, label, state), n in counts.items():
            used_by_provider[provider] += n
            if state in NODE_SUPPLY_STATES:
                supply[label] += n
        for label in self.config.labels:
            want = label.min_ready + demand.get(label.name, 0)
            missing = want - supply[label.name]
            if missing <= 0:
                continue
            build = self.store.serving_build(label.image)
            if build is None:
                self._no_build(label)
                continue
            for provider in self._providers_by_room(label, used_by_provider):
                if self._paused_until.get((provider.name, label.name), 0) > time.monotonic():
                    continue
                gate = self.gates[provider.name]
                room = min(
                    # The driver's own limit (host RAM for VMs, addresses...) may be lower.
                    self.drivers[provider.name].limits().max_nodes
                    - used_by_provider[provider.name],
                    provider.max_parallel_launches - self.ops.launches_on(provider.name),
                    missing,
                )
                if room <= 0:
                    continue
                if gate.next_token_in() > 0:
                    # Asked before the build: at 20 providers that query was a sixth
                    # of a pass, and most passes find most providers at their rate.
                    self._throttled.add(provider.name)
                    continue
                # Only a build whose upload to this provider is ready (image keeper).
                in_place = uses_layers_in_place(self.drivers[provider.name])
                serving = self.store.serving_on(label.image, provider.name, in_place)
                if serving is None:
                    continue
                allowed = 0
                while allowed < room and gate.take():
                    allowed += 1
                if allowed < room:
                    self._throttled.add(provider.name)
                self._start_launches(provider, label, serving, allowed)
                used_by_provider[provider.name] += allowed
                missing -= allowed
                if missing <= 0:
                    break

    def _no_build(self, label: Label) -> None:
        building = [b.id for b in self.store.builds(label.image) if b.state == BuildState.BUILDING]
        if building:
            message = (
                f"label {label.name}: waiting for image {label.image!r}"
                f" (build {building[0]} in progress)"
            )
        else:
            message = (
                f"label {label.name}: image {label.image!r} has no ready build yet"
                " (`serve` builds it unless started with --no-build; or run"
                f" `freshpool image build {label.image}`)"
            )
        self._warn_once(f"image:{label.image}:{bool(building)}", message)

    def _providers_by_room(self, label: Label, used: Counter[str]) -> list[Provider]:
        # A provider whose breaker is open gets no launches; its demand goes elsewhere.
        mine = [
            p
            for p in self.config.providers_for(label.name)
            if p.name in self.drivers and not self.gates[p.name].is_open()
        ]
        return sorted(mine, key=lambda p: used[p.name] - p.max_nodes)

    def _start_launches(
        self, provider: Provider, label: Label, serving: ServingBuild, count: int
    ) -> None:
        build_id = serving.build.id
        # Every row first, in one transaction, then the calls: a crash in between
        # leaves rows without instances, which recovery removes.
        rows = self.store.new_nodes(label.name, provider.name, build_id, label.name, count)
        layers = serving.build.layer_paths()
        for row in rows:
            crashpoints.point("launch")
            spec = NodeSpec(
                node_id=row.id,
                cluster=self.store.cluster_id,
                label=label.name,
                hostname=row.hostname,
                build_id=build_id,
                layers=layers,
                user=label.user,
                image_external_id=serving.external_id,
            )
            op = self.drivers[provider.name].create(spec)
            op.advance()
            self.ops.creating[row.id] = op
            self.ops.launch_of[row.id] = (provider.name, label.name)

    def _warn_once(self, key: str, message: str, every: float = 60.0) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -every) >= every:
            self._warned[key] = now
            log.warning("%s", message)


def _instance_values(instance: Instance) -> dict[str, object]:
    """What a node row records of its instance."""
    return {
        "external_id": instance.external_id,
        "access": instance.access.as_dict() if instance.access else None,
    }
