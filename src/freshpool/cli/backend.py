"""Where node commands go: straight to the store, or to the API when FRESHPOOL_URL / --url is set.

Both return store rows, so every command prints the same whichever way it went.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

import typer

from freshpool.cli.app import opened
from freshpool.core.states import NodeState

if TYPE_CHECKING:
    from freshpool.config import Config
    from freshpool.store import EventRow, NodeRow, Store

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Talk to a freshpool API at this URL instead of the local store"
        " (token: FRESHPOOL_TOKEN).",
        envvar="FRESHPOOL_URL",
        show_default=False,
    ),
]


class Backend(Protocol):
    def acquire(
        self, labels: list[str], timeout: float, ssh_keys: Sequence[str] = ()
    ) -> list[NodeRow]: ...
    def release(self, node_id: int, why: str) -> list[NodeRow]: ...
    def hold(self, node_id: int) -> NodeRow: ...
    def delete(self, node_id: int) -> NodeRow: ...
    def nodes(self) -> list[NodeRow]: ...
    def node(self, node_id: int) -> NodeRow: ...
    def events(self, node_id: int) -> list[EventRow]: ...


class StoreBackend:
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store

    def acquire(
        self, labels: list[str], timeout: float, ssh_keys: Sequence[str] = ()
    ) -> list[NodeRow]:
        from freshpool.dispatch import direct

        return direct.acquire(self.config, self.store, labels, timeout, ssh_keys=ssh_keys)

    def release(self, node_id: int, why: str) -> list[NodeRow]:
        return self.store.release_set(node_id, why)

    def hold(self, node_id: int) -> NodeRow:
        return self.store.move(node_id, NodeState.HOLD, "held")

    def delete(self, node_id: int) -> NodeRow:
        return self.store.move(node_id, NodeState.DELETING, "deleted by operator")

    def nodes(self) -> list[NodeRow]:
        return self.store.nodes()

    def node(self, node_id: int) -> NodeRow:
        return self.store.node(node_id)

    def events(self, node_id: int) -> list[EventRow]:
        return self.store.events(node_id)


@contextmanager
def backend(config_path: Path | None, url: str | None) -> Iterator[Backend]:
    url = url or os.environ.get("FRESHPOOL_URL")
    if not url:
        with opened(config_path) as (config, store):
            yield StoreBackend(config, store)
        return
    # Imported here: plain store commands do not pay for loading an HTTP client.
    from freshpool.cli.remote import ApiBackend

    api = ApiBackend(url, os.environ.get("FRESHPOOL_TOKEN") or None)
    try:
        yield api
    finally:
        api.client.close()
