"""Node commands over the HTTP API: the client's answers and refusals, as the CLI expects them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from freshpool.api.client import ApiClient, ApiError, RequestFailed
from freshpool.core.errors import AcquireTimeout, NotFound, error_for_status
from freshpool.dispatch.direct import requestor
from freshpool.store import EventRow, NodeRow


class ApiBackend:
    def __init__(self, url: str, token: str | None) -> None:
        self.client = ApiClient(url, token)

    def acquire(
        self, labels: list[str], timeout: float, ssh_keys: Sequence[str] = ()
    ) -> list[NodeRow]:
        try:
            return _cli_errors(self.client.request_nodes)(
                labels, timeout, requestor=requestor(), ssh_keys=ssh_keys
            )
        except RequestFailed as exc:
            reason = exc.request.get("reason", "")
            raise AcquireTimeout(
                f"no ready {', '.join(labels)} node within {timeout:g} s"
                f"{f' ({reason})' if reason else ''}; the pool may be exhausted or still"
                " filling (see `freshpool list`)"
            ) from None

    def release(self, node_id: int, why: str) -> list[NodeRow]:
        return _cli_errors(self.client.release)(node_id)

    def hold(self, node_id: int) -> NodeRow:
        return _cli_errors(self.client.hold)(node_id)

    def delete(self, node_id: int) -> NodeRow:
        return _cli_errors(self.client.delete)(node_id)

    def nodes(self) -> list[NodeRow]:
        return _cli_errors(self.client.nodes)()

    def node(self, node_id: int) -> NodeRow:
        return _cli_errors(self.client.node)(node_id)[0]

    def events(self, node_id: int) -> list[EventRow]:
        # The API shows history only while the node exists.
        try:
            return _cli_errors(self.client.node)(node_id)[1]
        except NotFound:
            return []


T = TypeVar("T")


def _cli_errors(call: Callable[..., T]) -> Callable[..., T]:
    """The API's refusals as the errors the CLI turns into messages and exit codes."""

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return call(*args, **kwargs)
        except ApiError as exc:
            raise error_for_status(exc.status or 503, str(exc)) from None

    return wrapper
