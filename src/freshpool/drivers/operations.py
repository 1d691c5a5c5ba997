"""Non-blocking operations: what driver calls return, advanced in short steps by one loop."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Generator
from typing import Generic, TypeVar, cast

T = TypeVar("T")


class Operation(ABC, Generic[T]):
    """A long-running driver action; `advance()` does a bounded step and returns."""

    done: bool = False
    result: T | None = None
    error: BaseException | None = None
    # Monotonic time before which advancing again is pointless.
    not_before: float = 0.0

    @abstractmethod
    def advance(self) -> None: ...

    def wait(self, timeout: float | None = None, step: float = 0.005) -> T:
        """Advance until done; for callers that may block (CLI, tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TimeoutError(f"operation not done after {timeout} s")
            if now >= self.not_before:
                self.advance()
            else:
                time.sleep(min(step, self.not_before - now))
        if self.error is not None:
            raise self.error
        # Done without an error: `result` holds a T (None itself for Operation[None]).
        return cast(T, self.result)


class StepOperation(Operation[T]):
    """An operation written as a generator.

    The generator yields a number of seconds to wait (0 for "call again soon")
    and returns its result. Each step between yields must be short.
    """

    def __init__(self, steps: Generator[float, None, T]) -> None:
        self._generator = steps

    def advance(self) -> None:
        if self.done:
            return
        try:
            pause = next(self._generator)
            self.not_before = time.monotonic() + max(0.0, pause)
        except StopIteration as stop:
            self.result, self.done = stop.value, True
        except Exception as exc:
            self.error, self.done = exc, True


class DoneOperation(Operation[T]):
    def __init__(self, result: T | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True

    def advance(self) -> None:
        return None


class CommandResult(Operation[int]):
    """A command running on a node: the result is its exit status, `output` its text."""

    output: str = ""


class FailedCommand(CommandResult):
    def __init__(self, error: BaseException) -> None:
        self.error, self.done = error, True

    def advance(self) -> None:
        return None


def follow(op: Operation[T]) -> Generator[float, None, T]:
    """Steps that wait for an operation others may also be advancing and waiting for."""
    while not op.done:
        if time.monotonic() >= op.not_before:
            op.advance()
        if not op.done:
            yield max(0.0, op.not_before - time.monotonic())
    if op.error is not None:
        raise op.error
    return cast(T, op.result)
