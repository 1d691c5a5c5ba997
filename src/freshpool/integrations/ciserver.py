"""Talking to a CI server over HTTP: what counts as a passing failure, the one backoff,
the server's own `Retry-After`, and a health record an operator can read."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from freshpool.core.backoff import CI_SERVER, with_retries
from freshpool.integrations import metrics

log = logging.getLogger("freshpool.integrations")
T = TypeVar("T")

# A busy or briefly broken server; anything else (401, 404, 422...) is the caller's to handle.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Never wait longer than this for a server's Retry-After before trying again.
MAX_RETRY_AFTER = 300.0


class CiServerError(Exception):
    """The CI server refused (status set), or could not be reached (status None)."""

    def __init__(self, message: str, status: int | None, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        # A 403 that is a spent rate limit (GitHub's answer) waits for its reset.
        return self.status is None or self.status in TRANSIENT_STATUSES or self.retry_after > 0


def retry_after(response: httpx.Response, now: Callable[[], float] = time.time) -> float:
    """Seconds the server asks us to wait: `Retry-After`, or a spent rate limit's reset."""
    header = response.headers.get("retry-after", "")
    if header.isdigit():
        return min(float(header), MAX_RETRY_AFTER)
    if response.headers.get("x-ratelimit-remaining") == "0":
        reset = response.headers.get("x-ratelimit-reset", "")
        if reset.isdigit():
            return min(max(0.0, float(reset) - now()), MAX_RETRY_AFTER)
    return 0.0


@dataclass
class Health:
    """How the CI server has answered lately, for status pages and logs."""

    ok_at: float | None = None
    error: str = ""
    failing_since: float | None = None
    retries: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok_at": self.ok_at,
            "error": self.error,
            "failing_since": self.failing_since,
            "retries": self.retries,
            "healthy": self.failing_since is None,
        }


class CiServer:
    """An HTTP client of one CI server: every call retried with the CI-server backoff
    while the server is unreachable, busy or failing; other refusals raised at once."""

    def __init__(
        self,
        integration: str,
        base_url: str,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        tries: int = 6,
        verify: bool | str = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.integration = integration
        self.base_url = base_url.rstrip("/")
        self.tries = tries
        self.health = Health()
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers or {}, timeout=timeout, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def call(
        self, method: str, path: str, ok: Collection[int] = (), **kwargs: Any
    ) -> httpx.Response:
        """The server's answer to one request. A 2xx answer, or a status in `ok`, is
        returned; a transient failure is retried; anything else raises CiServerError."""

        def attempt() -> httpx.Response:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise CiServerError(f"cannot reach {self.base_url}: {exc}", None) from None
            if response.is_success or response.status_code in ok:
                return response
            raise CiServerError(
                f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}",
                response.status_code,
                retry_after(response),
            )

        return self.guarded(attempt)

    def guarded(self, attempt: Callable[[], T]) -> T:
        """`attempt()`, tried again with the CI-server backoff (or the server's own
        Retry-After) while it raises a transient CiServerError, and counted in the
        server's health; a client library's calls go through here as HTTP calls do."""
        waits: list[float] = []

        def on_retry(number: int, delay: float, exc: Exception) -> None:
            assert isinstance(exc, CiServerError)
            waits.append(max(delay, exc.retry_after))
            self._failed(str(exc))
            log.warning(
                "%s: %s; try %d of %d in %.1f s", self.integration, exc, number + 1,
                self.tries, waits[-1],
            )  # fmt: skip

        try:
            result = with_retries(
                attempt, self.tries, CI_SERVER,
                retryable=lambda exc: isinstance(exc, CiServerError) and exc.transient,
                on_retry=on_retry, sleep=lambda _delay: self._sleep(waits[-1]),
            )  # fmt: skip
        except CiServerError as exc:
            if exc.transient:
                self._failed(str(exc))
            raise
        self.health.ok_at = time.time()
        self.health.error = ""
        self.health.failing_since = None
        return result

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        return response.json() if response.content else None

    def _failed(self, error: str) -> None:
        metrics.CI_SERVER_ERRORS.labels(self.integration).inc()
        self.health.error = error
        self.health.retries += 1
        if self.health.failing_since is None:
            self.health.failing_since = time.time()
