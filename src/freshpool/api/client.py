"""A client of the freshpool API (httpx), returning the same rows the store does."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from freshpool.core.states import RequestState
from freshpool.store import EventRow, NodeRow

# A long-poll is re-issued after this long, well inside proxies' idle timeouts.
POLL_SLICE = 25.0


class ApiError(Exception):
    """The API said no (status is the HTTP status), or could not be reached (status None)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class RequestFailed(Exception):
    """The node-set request failed or was cancelled before it was fulfilled."""

    def __init__(self, request: dict[str, Any]) -> None:
        super().__init__(request.get("reason") or request.get("state", ""))
        self.request = request


def node_row(data: dict[str, Any]) -> NodeRow:
    access = data.get("access")
    return NodeRow(
        id=data["id"],
        label=data["label"],
        provider=data["provider"],
        state=data["state"],
        build_id=data["build"],
        hostname=data["hostname"],
        external_id=data.get("external_id"),
        access={k: v for k, v in access.items() if k != "ssh"} if access else None,
        request_id=data.get("request"),
        reason=data.get("reason", ""),
        created_at=data["created_at"],
        state_at=data["state_at"],
        ready_at=data.get("ready_at"),
        delete_attempts=0,
        next_attempt_at=0.0,
        tenant=data.get("tenant", ""),
    )


def _message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if isinstance(detail, list):
        parts = []
        for problem in detail:
            loc = [str(x) for x in problem.get("loc", []) if x != "body"]
            parts.append(f"{'.'.join(loc)}: {problem.get('msg')}" if loc else problem.get("msg"))
        return "; ".join(parts)
    return str(detail)


class ApiClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout + POLL_SLICE)
        )

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach freshpool at {self.url}: {exc}", None) from None
        if response.is_error:
            raise ApiError(_message(response), response.status_code)
        return response.json()

    # ---------------------------------------------------------- requests

    def request_nodes(
        self,
        labels: Sequence[str],
        timeout: float,
        requestor: str = "",
        priority: int = 0,
        ssh_keys: Sequence[str] = (),
    ) -> list[NodeRow]:
        """Ask for a node set and wait (long-poll) up to `timeout` seconds for it;
        `ssh_keys` may log in to its nodes."""
        give_up = time.monotonic() + timeout
        body: dict[str, Any] = {"labels": list(labels), "requestor": requestor}
        body.update(priority=priority, ssh_keys=list(ssh_keys))
        body["timeout"] = max(timeout, 0.001)
        request = self.call(
            "POST", "/requests", params={"wait": min(timeout, POLL_SLICE)}, json=body
        )
        try:
            while request["state"] == RequestState.PENDING:
                left = give_up - time.monotonic()
                if left <= 0:
                    break
                request = self.call(
                    "GET", f"/requests/{request['id']}", params={"wait": min(left, POLL_SLICE)}
                )
        except BaseException:
            # Interrupted (Ctrl-C) or cut off: do not leave a request behind to be fulfilled.
            self._cancel_quietly(request["id"])
            raise
        if request["state"] == RequestState.PENDING:
            request = self._cancel_quietly(request["id"]) or request
        if request["state"] != RequestState.FULFILLED:
            raise RequestFailed(request)
        return [node_row(n) for n in request["nodes"]]

    def _cancel_quietly(self, request_id: int) -> dict[str, Any] | None:
        try:
            cancelled: dict[str, Any] = self.call("DELETE", f"/requests/{request_id}")
            return cancelled
        except ApiError:
            return None

    # ------------------------------------------------------------- nodes

    def release(self, node_id: int) -> list[NodeRow]:
        return [node_row(n) for n in self.call("POST", f"/nodes/{node_id}/release")]

    def job_started(self, node_id: int, job: str = "") -> NodeRow:
        return node_row(self.call("POST", f"/nodes/{node_id}/in-use", json={"job": job}))

    def hold(self, node_id: int) -> NodeRow:
        return node_row(self.call("POST", f"/nodes/{node_id}/hold", json={}))

    def delete(self, node_id: int) -> NodeRow:
        return node_row(self.call("DELETE", f"/nodes/{node_id}"))

    def nodes(self) -> list[NodeRow]:
        return [node_row(n) for n in self.call("GET", "/nodes")]

    def node(self, node_id: int) -> tuple[NodeRow, list[EventRow]]:
        data = self.call("GET", f"/nodes/{node_id}")
        events = [
            EventRow(
                id=i,
                node_id=node_id,
                at=e["at"],
                from_state=e["from_state"],
                to_state=e["to_state"],
                reason=e["reason"],
            )
            for i, e in enumerate(data.get("events", []))
        ]
        return node_row(data), events
