"""The one exception root, and what each kind of failure means to a person.

    FreshpoolError
    ├── BadInput          what was asked is wrong: fix the input        (exit 2, HTTP 422)
    │   ├── ConfigError       a config file's problems, each with file, line and key
    │   ├── UnknownName       no label, image, provider... of that name
    │   └── NotFound          no such node, request, build, token        (HTTP 404)
    ├── Refused           the state does not allow it, or it failed     (exit 1, HTTP 409)
    │   ├── StaleState        someone else moved the row first
    │   ├── InvalidTransition the state table has no such edge
    │   └── ...               build, commit and launcher-lock refusals
    ├── Unavailable       this host or a provider cannot do it now      (exit 3, HTTP 503)
    │   ├── DriverError       a provider call failed (drivers/base.py has its tree)
    │   └── NothingToServe    a label's image has no ready build
    ├── TimedOut          nothing came in time                          (exit 4, HTTP 504)
    │   └── AcquireTimeout    no node set within the wait
    └── WriteBusy         a write that was not to wait found the lock taken (never
                          leaves the dispatcher: it tries again)

The CLI's exit codes (`EXIT_CODES`) and the API's statuses (`HTTP_STATUS`) are read
from the classes here, one table each, so a new error only has to pick its parent.
"""

from __future__ import annotations


class FreshpoolError(Exception):
    """Every error freshpool raises on purpose; the message says what and why."""


class BadInput(FreshpoolError):
    """The input is wrong (a config line, a name, an id): fix it and try again."""


class NotFound(BadInput, LookupError):
    """No such node, request, build or token."""


class UnknownName(BadInput, LookupError):
    """No label, image or provider of that name in the config."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r} (known: {', '.join(known) or 'none'})")


class Refused(FreshpoolError):
    """What was asked did not happen: the state does not allow it, or it failed."""


class StaleState(Refused):
    """The row was not in the state the caller expected (someone else moved it first)."""


class LeaseLost(Refused):
    """This launcher no longer holds the provider's lease (another took it over): its
    write for that provider was refused, and nothing was changed."""


class Unavailable(FreshpoolError):
    """This host or a provider cannot do it now (not root, a tool missing, a cloud down)."""


class NothingToServe(Unavailable):
    """A label's image has no ready build, so no node of it can become ready."""


class TimedOut(FreshpoolError):
    """Nothing came within the time allowed."""


class AcquireTimeout(TimedOut):
    """No node set was handed over within the wait."""


class WriteBusy(FreshpoolError):
    """Another writer holds the write lock now, and this write was not to wait for it.
    Nothing was done."""


# The most specific class listed wins (see code_for).
EXIT_CODES: dict[type[FreshpoolError], int] = {
    Refused: 1,
    BadInput: 2,
    Unavailable: 3,
    TimedOut: 4,
}
HTTP_STATUS: dict[type[FreshpoolError], int] = {
    Refused: 409,
    BadInput: 422,
    NotFound: 404,
    Unavailable: 503,
    TimedOut: 504,
}


def code_for(error: BaseException, table: dict[type[FreshpoolError], int], default: int) -> int:
    """The table's value for the nearest class of `error` that the table lists."""
    for kind in type(error).__mro__:
        if kind in table:
            return table[kind]
    return default


def error_for_status(status: int, message: str) -> FreshpoolError:
    """The error an API answer of `status` stands for: the API's table read backwards
    (most specific first), and the few statuses FastAPI itself answers."""
    by_status = {code: kind for kind, code in reversed(HTTP_STATUS.items())}
    by_status.update({400: BadInput, 401: Refused, 403: Refused})
    return by_status.get(status, Unavailable)(message)
