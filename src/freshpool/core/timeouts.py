"""The timeout of every node state, and where an overdue node goes: the one table.

The driver bounds a create by `boot-timeout` and a test by `test-timeout`; the
launcher's own limits for `building` and `testing` are looser backstops for a
driver or command that never returns. `deleting` has no timeout here: a delete is
abandoned after the provider's `delete-timeout` and retried with the one backoff,
and leak cleanup confirms by listing when it is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from freshpool.core.states import NodeState

N = NodeState
# Slack over the driver's own limits before the launcher gives up on an operation.
BACKSTOP = 2.0
TIMED_STATES = (N.BUILDING, N.TESTING, N.READY, N.IN_USE, N.HOLD)


class LabelTimes(Protocol):
    @property
    def test_timeout(self) -> float: ...
    @property
    def max_ready_age(self) -> float | None: ...
    @property
    def job_timeout(self) -> float: ...
    @property
    def max_hold_age(self) -> float: ...


class ProviderTimes(Protocol):
    @property
    def boot_timeout(self) -> float: ...


@dataclass(frozen=True)
class Overdue:
    target: NodeState
    reason: str


def limit(state: NodeState, label: LabelTimes, provider: ProviderTimes) -> float | None:
    """Seconds a node may stay in `state`, or None for no limit."""
    return {
        N.BUILDING: provider.boot_timeout * BACKSTOP,
        N.TESTING: label.test_timeout * BACKSTOP + provider.boot_timeout,
        N.READY: label.max_ready_age,
        N.IN_USE: label.job_timeout,
        N.HOLD: label.max_hold_age,
    }.get(state)


def overdue(
    state: NodeState, seconds_in_state: float, label: LabelTimes, provider: ProviderTimes
) -> Overdue | None:
    allowed = limit(state, label, provider)
    if allowed is None or seconds_in_state <= allowed:
        return None
    if state in (N.BUILDING, N.TESTING):
        return Overdue(N.FAILED, f"{state} for longer than {allowed:g} s")
    if state == N.IN_USE:
        return Overdue(N.FAILED, f"job timeout: in use for longer than {allowed:g} s")
    if state == N.READY:
        return Overdue(N.DELETING, f"ready longer than max-ready-age ({allowed:g} s)")
    return Overdue(N.DELETING, f"held longer than max-hold-age ({allowed:g} s)")


def shortest(labels: list[LabelTimes], providers: list[ProviderTimes]) -> dict[NodeState, float]:
    """Each timed state's shortest limit anywhere: only rows in it for longer can be
    overdue. A state no label or provider limits is left out (ready nodes with no
    max-ready-age, the bulk of a large pool, are never looked at)."""
    found: dict[NodeState, float] = {}
    for state in TIMED_STATES:
        limits = [x for label in labels for provider in providers
                  if (x := limit(state, label, provider)) is not None]  # fmt: skip
        if limits:
            found[state] = min(limits)
    return found
