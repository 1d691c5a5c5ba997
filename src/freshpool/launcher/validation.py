"""Validating a new image build: boot a fresh node from it, run the checks, delete the node.

The node has a row like any other (label `image:<name>`, never handed out), so a
crash mid-way leaves something the launcher's recovery fails and deletes. It stays
in `testing` while this operation deletes it, and its row goes once the driver
confirms the instance gone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from freshpool.config import Image
from freshpool.core.states import NodeState
from freshpool.drivers.base import Driver, Instance, Operation, StepOperation
from freshpool.launcher.context import node_spec
from freshpool.store import BuildRow, StaleState, Store

N = NodeState
TAIL_LINES = 10


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    seconds: float


def validation_label(image: str) -> str:
    # Not a valid label name, so it can never match a configured label or a request.
    return f"image:{image}"


class Validation(StepOperation[Verdict]):
    """An operation (advance() never blocks) whose result says whether the build passed."""

    def __init__(
        self,
        store: Store,
        driver: Driver,
        provider: str,
        build: BuildRow,
        image: Image,
        external_id: str | None,
        log: Callable[[str], None],
    ) -> None:
        self.node_id: int | None = None
        super().__init__(
            self._guarded(
                store, self._validate(store, driver, provider, build, image, external_id, log)
            )
        )

    def _guarded(
        self, store: Store, steps: Generator[float, None, Verdict]
    ) -> Generator[float, None, Verdict]:
        try:
            return (yield from steps)
        except BaseException:
            # Stopped half-way (an error, or the keeper dropped it): the launcher's deleter
            # takes a failed node from here.
            if self.node_id is not None:
                _fail_if_unfinished(store, self.node_id)
            raise

    def _validate(
        self,
        store: Store,
        driver: Driver,
        provider: str,
        build: BuildRow,
        image: Image,
        external_id: str | None,
        log: Callable[[str], None],
    ) -> Generator[float, None, Verdict]:
        started = time.monotonic()
        row = store.new_node(validation_label(image.name), provider, build.id, "validate")
        self.node_id = row.id
        spec = node_spec(store, row, build, "root", external_id, driver.provider.limits)
        log(f"==> validate: booting node {row.id} ({row.hostname}) on {provider}")
        create = driver.create(spec)
        yield from _drive(create)
        if create.error is not None or create.result is None:
            # A failed create leaves nothing behind (the driver's contract): forget the row.
            store.transition(row.id, N.BUILDING, N.DELETING, f"validation node: {create.error}")
            store.remove_node(row.id, "never came up")
            why = f"the validation node did not start: {create.error}"
            log(why)
            return Verdict(False, why, time.monotonic() - started)
        instance = create.result
        values = {
            "external_id": instance.external_id,
            "access": instance.access.as_dict() if instance.access else None,
        }
        store.transition(row.id, N.BUILDING, N.TESTING, f"validating build {build.id}", **values)
        verdict = yield from _run_checks(driver, instance, image, log)
        delete = driver.delete(instance.external_id)
        yield from _drive(delete)
        if delete.error is not None:
            # The launcher retries deleting failed nodes.
            store.transition(
                row.id, N.TESTING, N.FAILED, f"validation done; delete: {delete.error}"
            )
        else:
            with contextlib.suppress(StaleState):
                store.transition(row.id, N.TESTING, N.DELETING, "image validation finished")
                store.remove_node(row.id, "instance confirmed gone")
        seconds = time.monotonic() - started
        if verdict.passed:
            log(f"validated in {seconds:.1f} s")
        return Verdict(verdict.passed, verdict.reason, seconds)


def _run_checks(
    driver: Driver, instance: Instance, image: Image, log: Callable[[str], None]
) -> Generator[float, None, Verdict]:
    """The image's validate commands on the node, in order; the first failure decides."""
    for command in image.validate_commands or ["true"]:
        log(f"$ {command}")
        run = driver.run_command(
            instance.external_id, instance.access, command, image.validate_timeout
        )
        yield from _drive(run)
        output = (run.output or "").rstrip("\n").splitlines()
        for line in output:
            log(line)
        if run.error is not None or run.result != 0:
            status = f"failed: {run.error}" if run.error is not None else f"exited {run.result}"
            tail = " | ".join(output[-TAIL_LINES:])
            why = f"validate command {command!r} {status}" + (f": {tail}" if tail else "")
            log(why)
            return Verdict(False, why, 0.0)
    return Verdict(True, "", 0.0)


def _fail_if_unfinished(store: Store, node_id: int) -> None:
    try:
        row = store.node(node_id)
    except LookupError:
        return
    if row.state in (N.BUILDING, N.TESTING):
        with contextlib.suppress(StaleState):
            store.transition(node_id, N(row.state), N.FAILED, "image validation stopped")


def _drive(op: Operation) -> Generator[float, None, None]:
    """Advance a driver operation from inside another, yielding its waits."""
    while True:
        if time.monotonic() >= op.not_before:
            op.advance()
        if op.done:
            return
        yield max(0.0, op.not_before - time.monotonic())
