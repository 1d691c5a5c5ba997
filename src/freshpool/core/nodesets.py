"""Node-set rules: what a set needs, which providers can serve it, whether it can ever
be fulfilled. A set comes whole from one provider."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Serving(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def max_nodes(self) -> int: ...
    def serves(self, label: str) -> bool: ...


P = TypeVar("P", bound=Serving)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a node set, and where (a key path like ("labels", 2))."""

    where: tuple[str | int, ...]
    message: str


@functools.cache
def needs(labels: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(label, how many) for a node set; cached, as every pass asks it of every request."""
    return tuple(Counter(labels).items())


def providers_serving(providers: Iterable[P], labels: Iterable[str]) -> list[P]:
    """The providers that serve every label of a set, in config order."""
    wanted = set(labels)
    return [p for p in providers if all(p.serves(label) for label in wanted)]


def check(
    labels: Sequence[str],
    known: Iterable[str],
    providers: Sequence[Serving],
    tenant_quota: int | None = None,
) -> list[Problem]:
    """Everything that would keep a node set from ever being fulfilled, each with its
    place; `tenant_quota` is the most nodes the asking tenant may hold at once."""
    if tenant_quota is not None and len(labels) > tenant_quota:
        return [
            Problem(
                ("labels",),
                f"{len(labels)} nodes asked for; the tenant may hold at most {tenant_quota}"
                " at once (its max-nodes)",
            )
        ]
    names = set(known)
    problems = [
        Problem(
            ("labels", i),
            f"unknown label {name!r} (known: {', '.join(sorted(names)) or 'none'})",
        )
        for i, name in enumerate(labels)
        if name not in names
    ]
    if problems:
        return problems
    serving = providers_serving(providers, labels)
    if not serving:
        return [
            Problem(
                ("labels",),
                f"no provider serves all of {', '.join(sorted(set(labels)))};"
                " a node set comes from one provider",
            )
        ]
    biggest = max(p.max_nodes for p in serving)
    if len(labels) > biggest:
        return [
            Problem(
                ("labels",),
                f"{len(labels)} nodes asked for; no provider that serves them has room for"
                f" more than {biggest}",
            )
        ]
    return []
