"""The node controller: launches what is missing, tests each new node, deletes what must
go, and records what a pass finds at once, in one transaction each.

Every driver operation is non-blocking and advanced here from one thread, so
thousands of launches need no thread each. A node's row is written before the
provider is asked for its instance, so a crash in between leaves a row to clean up,
never an instance nobody knows of; a row is removed only once the provider confirms
the instance gone.
"""

from __future__ import annotations

import logging
import time

from freshpool import crashpoints
from freshpool.core.errors import StaleState
from freshpool.core.states import NODE_TO_DELETE_STATES, NodeState
from freshpool.drivers.base import CommandResult, DriverError, Instance, Operation, Tags
from freshpool.launcher.context import Shared, instance_values, node_spec
from freshpool.launcher.launches import LaunchFailures, plan_launches
from freshpool.launcher.work import Kind, Work
from freshpool.store import Move, NewNodes, NodeRow

log = logging.getLogger("freshpool.launcher")
N = NodeState


class NodeController:
    name = "nodes"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.failures = LaunchFailures()
        self._throttled: set[str] = set()
        self._stopping = False

    # ------------------------------------------------------------ the pass

    def start(self) -> None:
        if not self.shared.leased:
            # Deletes the previous launcher had in flight are due again.
            self.shared.store.release_delete_leases(time.time())
        for name in list(self.shared.drivers):
            self.recover(name)

    def recover(self, name: str) -> None:
        """Provider `name` was taken over: the deletes its last owner had in flight are
        due again (without leases, `start` did that for every provider at once)."""
        if self.shared.leased:
            self.shared.store.release_delete_leases(time.time(), name)

    def tick(self) -> None:
        self._record(self.shared.work.advance())
        self._start_deletes()
        if not self._stopping:
            self._launch()

    def due(self) -> float:
        due = self.shared.work.not_before()
        if self._throttled:
            # Demand was left unmet by a rate limit: come back when a call is allowed.
            wait = min(self.shared.gates[p].next_token_in() for p in self._throttled)
            due = min(due, time.monotonic() + wait)
        return due

    def stop(self, deadline: float) -> None:
        """Finish deletes, and undo launches that did not reach ready."""
        self._stopping = True
        for work in self.shared.work.of(Kind.TEST):
            self.shared.work.pop(work.node_id)
            self.shared.fail(work.node_id, N.TESTING, "launcher stopped before the test finished")
        while time.monotonic() < deadline and any(
            w.kind in (Kind.CREATE, Kind.DELETE) for w in self.shared.work
        ):
            self.tick()
            time.sleep(0.01)
        if len(self.shared.work):
            log.warning(
                "stopped with %d operations unfinished; the next start cleans them up",
                len(self.shared.work),
            )

    def _record(self, finished: list[Work]) -> None:
        self._created([w for w in finished if w.kind == Kind.CREATE])
        self._tested([w for w in finished if w.kind == Kind.TEST])
        for work in finished:
            if work.kind == Kind.CHECK:
                self._checked(work)
        self._deleted([w for w in finished if w.kind == Kind.DELETE])

    # ------------------------------------------------------------ launching

    def _launch(self) -> None:
        launches, self._throttled = plan_launches(self.shared, self.failures)
        if not launches:
            return
        store = self.shared.store
        # Every row first, in one transaction for the whole pass, then the calls: a
        # crash in between leaves rows without instances, which recovery removes.
        made = store.new_node_sets([
            NewNodes(x.label.name, x.provider.name, x.serving.build.id, x.label.name, x.count,
                     x.room)
            for x in launches
        ])  # fmt: skip
        for launch, rows in zip(launches, made, strict=True):
            driver = self.shared.drivers[launch.provider.name]
            limits = launch.label.limits.over(launch.provider.limits)
            for row in rows:
                crashpoints.point("launch")
                spec = node_spec(store, row, launch.serving.build, launch.label.user,
                                 launch.serving.external_id, limits)  # fmt: skip
                op = driver.create(spec)
                op.advance()
                self.shared.work.add(Work(row.id, row.provider, row.label, Kind.CREATE, op))

    def _created(self, done: list[Work]) -> None:
        up: list[tuple[Work, Instance]] = []
        for work in done:
            gate = self.shared.gates[work.provider]
            if work.op.error is not None:
                gate.failure(str(work.op.error))
                self.failures.outcome(work.provider, work.label, ok=False)
                self.shared.fail(work.node_id, N.BUILDING, f"launch failed: {work.op.error}")
                continue
            gate.success()
            instance = work.op.result
            assert isinstance(instance, Instance)
            if self._stopping:
                why = "launcher stopped before the node was tested"
                self.shared.fail(work.node_id, N.BUILDING, why, instance_values(instance))
                continue
            crashpoints.point("created")
            up.append((work, instance))
        moves = [
            Move(work.node_id, N.BUILDING, N.TESTING, "instance up", instance_values(instance))
            for work, instance in up
        ]
        for (work, instance), row in zip(up, self.shared.store.transitions(moves), strict=True):
            if isinstance(row, StaleState):
                # Deleted while it was being created; the deleter takes it from here.
                self.shared.store.set_instance(
                    work.node_id, instance.external_id, instance_values(instance)["access"]
                )
                continue
            label = self.shared.labels[row.label]
            test = self.shared.drivers[row.provider].run_command(
                instance.external_id, instance.access, label.ready_command, label.test_timeout
            )
            test.advance()
            self.shared.work.add(Work(row.id, row.provider, row.label, Kind.TEST, test))

    def _tested(self, done: list[Work]) -> None:
        passed: list[int] = []
        for work in done:
            test: CommandResult = work.op  # type: ignore[assignment]  # TEST work runs commands
            ok = test.error is None and test.result == 0
            self.failures.outcome(work.provider, work.label, ok=ok)
            if ok:
                crashpoints.point("tested")
                passed.append(work.node_id)
                continue
            self.shared.fail(work.node_id, N.TESTING, _test_failure("test", test))
        moves = [Move(node_id, N.TESTING, N.READY, "ready command passed") for node_id in passed]
        for node_id, row in zip(passed, self.shared.store.transitions(moves), strict=True):
            if not isinstance(row, StaleState):
                log.info("node %s: ready", node_id)

    def _checked(self, work: Work) -> None:
        check: CommandResult = work.op  # type: ignore[assignment]  # CHECK work runs commands
        if check.error is None and check.result == 0:
            self.shared.store.mark_checked(work.node_id)
            return
        why = _test_failure("health check", check)
        try:  # handed out meanwhile: its job decides
            self.shared.store.transition(work.node_id, N.READY, N.FAILED, why)
            log.warning("node %s: %s", work.node_id, why)
        except StaleState:
            pass

    # ------------------------------------------------------------- deleting

    def _start_deletes(self) -> None:
        store, work = self.shared.store, self.shared.work
        store.transitions(
            [
                Move(row.id, N(row.state), N.DELETING, self._delete_reason(row))
                for row in store.nodes(states_in=sorted(NODE_TO_DELETE_STATES))
                if row.id not in work and self.shared.drives(row.provider)
            ]
        )
        now = time.time()
        never_created: list[tuple[int, str]] = []
        starting: list[tuple[NodeRow, str, float]] = []
        listings: dict[str, dict[int, str] | None] = {}
        for row in store.due_for_delete(now):
            if row.id in work or not self.shared.drives(row.provider):
                continue
            external_id = self._external_id(row, listings)
            if external_id is None:
                never_created.append((row.id, "no instance was ever created"))
            elif external_id and self.shared.gates[row.provider].take():
                starting.append(
                    (row, external_id, self.shared.providers[row.provider].delete_timeout)
                )
            elif external_id:
                self._throttled.add(row.provider)
        store.remove_nodes(never_created)
        # The leases keep these rows out of the next passes' queries while the
        # deletes run; each expires by itself if this launcher dies. Written before
        # the calls, so no other launcher starts the same delete meanwhile.
        store.lease_deletes({row.id: now + timeout for row, _, timeout in starting})
        for row, external_id, timeout in starting:
            op = self.shared.drivers[row.provider].delete(external_id)
            op.advance()
            crashpoints.point("delete")
            give_up = time.monotonic() + timeout
            work.add(Work(row.id, row.provider, row.label, Kind.DELETE, op, give_up))

    def _delete_reason(self, row: NodeRow) -> str:
        """Why the node goes, led by what went wrong inside it during its job, if anything
        (an out-of-memory kill), so its history says so."""
        driver = self.shared.drivers.get(row.provider)
        faults = driver.faults(row.external_id) if driver and row.external_id else []
        for fault in faults:
            log.warning("node %s: %s", row.id, fault)
        return "; ".join([*faults, f"{row.state}: delete"])

    def _external_id(self, row: NodeRow, listings: dict[str, dict[int, str] | None]) -> str | None:
        """The node's instance id; None if none was ever made; "" if it cannot be told
        now (its provider is not configured, or its listing failed: then it waits).
        A provider is listed at most once per pass (`listings`), for all its nodes."""
        driver = self.shared.drivers.get(row.provider)
        if driver is None:
            self.shared.warn_once(
                f"provider:{row.provider}",
                f"node {row.id}: provider {row.provider!r} is not configured;"
                " cannot delete it until it is",
            )
            return ""
        found = row.external_id or driver.external_id_for(
            Tags(self.shared.store.cluster_id, row.id, row.build_id)
        )
        if found is not None:
            return found
        if row.provider not in listings:
            try:
                listed = driver.list_instances()
                listings[row.provider] = {i.tags.node_id: i.external_id for i in listed if i.tags}
            except DriverError as exc:  # one provider's outage must not stop the others
                log.warning("provider %s: listing for deletes failed: %s", row.provider, exc)
                listings[row.provider] = None
        by_node = listings[row.provider]
        return "" if by_node is None else by_node.get(row.id)

    def _deleted(self, done: list[Work]) -> None:
        gone: list[int] = []
        for work in done:
            op: Operation[None] = work.op
            gate = self.shared.gates.get(work.provider)
            if op.error is None:
                if gate is not None:
                    gate.success()
                crashpoints.point("deleted")
                gone.append(work.node_id)
                continue
            if gate is not None:
                gate.failure(str(op.error))
            self._delete_failed(work.node_id, op.error)
        removals = [(node_id, "instance confirmed gone") for node_id in gone]
        for node_id, stale in zip(gone, self.shared.store.remove_nodes(removals), strict=True):
            if stale is None:
                log.info("node %s: deleted", node_id)
            else:
                log.error("node %s: %s", node_id, stale)

    def _delete_failed(self, node_id: int, error: BaseException) -> None:
        attempt = self.shared.store.node(node_id).delete_attempts
        delay = self.shared.retry.delay(attempt)
        log.warning(
            "node %s: delete failed (try %d), retry in %.0f s: %s",
            node_id,
            attempt + 1,
            delay,
            error,
        )
        self.shared.store.record_delete_failure(node_id, str(error), time.time() + delay)


def _test_failure(what: str, command: CommandResult) -> str:
    """Why a node's test (what="test") or health check failed, with its output's end."""
    if command.error is not None:
        why = f"{what} failed: {command.error}"
    else:
        lead = "" if what == "test" else f"{what}: "
        why = f"{lead}ready command exited {command.result}"
    tail = command.output.strip().splitlines()[-3:]
    return f"{why}: {' | '.join(tail)}" if tail else why
