"""Named points where the chaos suite can kill this process, as `kill -9` would.

Off unless armed: `FRESHPOOL_CRASH_AT=phase:n` (or `arm()` in a forked test
process) makes the n-th pass through `point(phase)` SIGKILL the process, so the
suite can stop the launcher exactly between two steps that must both happen or
be repaired: a row written but no instance made, a node created but not yet
tested, a node handed out but the client gone, a delete confirmed but the row
still there. Costs one dict lookup when off.
"""

from __future__ import annotations

import os
import signal

PHASES = ("launch", "created", "tested", "handoff", "delete", "deleted")
_armed: dict[str, int] = {}


def arm(phase: str, nth: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown crash point {phase!r} (known: {', '.join(PHASES)})")
    _armed.clear()
    _armed[phase] = max(1, nth)


def point(phase: str) -> None:
    if not _armed or phase not in _armed:
        return
    _armed[phase] -= 1
    if _armed[phase] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _from_environment() -> None:
    spec = os.environ.get("FRESHPOOL_CRASH_AT")
    if spec:
        phase, _, nth = spec.partition(":")
        arm(phase, int(nth or 1))


_from_environment()
