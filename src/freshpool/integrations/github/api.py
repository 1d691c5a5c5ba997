"""The GitHub REST calls the integration makes, and nothing else.

Every call goes through `CiServer` (the one backoff for unreachable, 408/429/5xx,
`Retry-After`), asks the auth for a current token, follows `Link: rel="next"`
pagination, and waits out a spent rate limit: GitHub answers a spent primary limit,
and a secondary one, with 403 plus `x-ratelimit-remaining: 0` or `Retry-After`,
which `CiServer` treats as a refusal, so it is retried here with the same backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import httpx

from freshpool.core.backoff import CI_SERVER, with_retries
from freshpool.integrations import metrics
from freshpool.integrations.ciserver import CiServer, CiServerError
from freshpool.integrations.github.auth import Auth, AuthError

log = logging.getLogger("freshpool.integrations.github")

INTEGRATION = "github"
API_VERSION = "2022-11-28"
PER_PAGE = 100
# The statuses of runs that can hold queued jobs: a run in progress may have a job
# that still waits for a runner (a matrix, or a job after `needs:`).
OPEN_RUN_STATUSES = ("queued", "in_progress")
RATE_LIMIT_TRIES = 4


def rate_limited(exc: Exception) -> bool:
    return isinstance(exc, CiServerError) and exc.status == 403 and exc.retry_after > 0


class GithubApi:
    def __init__(self, server: CiServer, auth: Auth, scope_path: str,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.server = server
        self.auth = auth
        self.scope_path = scope_path
        self._sleep = sleep

    # ------------------------------------------------------------ plumbing

    def call(self, method: str, path: str, ok: Collection[int] = (),
             **kwargs: Any) -> httpx.Response:  # fmt: skip
        waits: list[float] = []

        def attempt() -> httpx.Response:
            headers = {
                "Authorization": self.auth.header(),
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
            }
            return self.server.call(method, path, ok=ok, headers=headers, **kwargs)

        def on_retry(_number: int, delay: float, exc: Exception) -> None:
            assert isinstance(exc, CiServerError)
            waits.append(max(delay, exc.retry_after))
            metrics.CI_SERVER_ERRORS.labels(INTEGRATION).inc()
            self.server.health.error = f"rate limited: {exc}"
            self.server.health.retries += 1
            log.warning("github: rate limited; waiting %.1f s", waits[-1])

        return with_retries(attempt, RATE_LIMIT_TRIES, CI_SERVER, retryable=rate_limited,
                            on_retry=on_retry, sleep=lambda _d: self._sleep(waits[-1]))  # fmt: skip

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        return response.json() if response.content else None

    def pages(self, path: str, key: str | None, params: dict[str, Any] | None = None
              ) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Every item of a paginated list (`key` names the list in the answer's object;
        None: the answer is the list)."""
        url: str | None = path
        query: dict[str, Any] | None = {"per_page": PER_PAGE, **(params or {})}
        while url:
            response = self.call("GET", url, params=query)
            body = response.json()
            yield from body if key is None else body.get(key, [])
            url = response.links.get("next", {}).get("url")
            query = None  # the next link carries the whole query

    # ------------------------------------------------------------- runners

    def runners(self) -> list[dict[str, Any]]:
        return list(self.pages(f"{self.scope_path}/actions/runners", "runners"))

    def runner(self, runner_id: int) -> dict[str, Any] | None:
        response = self.call("GET", f"{self.scope_path}/actions/runners/{runner_id}", ok=(404,))
        return None if response.status_code == 404 else dict(response.json())

    def delete_runner(self, runner_id: int) -> bool:
        """Remove a runner's registration: True when it is gone (or was already), False
        when GitHub keeps it because it runs a job now (422)."""
        path = f"{self.scope_path}/actions/runners/{runner_id}"
        response = self.call("DELETE", path, ok=(404, 422))
        return response.status_code != 422

    def generate_jitconfig(self, name: str, group_id: int, labels: list[str],
                           work_folder: str) -> tuple[dict[str, Any], str]:  # fmt: skip
        """A just-in-time runner's registration and its encoded config (a secret: it
        lets one runner process take one job)."""
        body = {"name": name, "runner_group_id": group_id, "labels": labels,
                "work_folder": work_folder}  # fmt: skip
        answer = self.json("POST", f"{self.scope_path}/actions/runners/generate-jitconfig",
                           json=body)  # fmt: skip
        return answer["runner"], answer["encoded_jit_config"]

    def runner_group_id(self, group: str | int) -> int:
        if isinstance(group, int) or group.isdigit():
            return int(group)
        if self.scope_path.startswith("/repos/"):
            if group.lower() != "default":
                raise AuthError(f"github.runner-group: a repository has only the Default group, "
                                f"not {group!r}")  # fmt: skip
            return 1  # a repository's runners are all in the Default group, id 1
        groups = list(self.pages(f"{self.scope_path}/actions/runner-groups", "runner_groups"))
        for found in groups:
            if found["name"].lower() == group.lower():
                return int(found["id"])
        known = ", ".join(g["name"] for g in groups) or "none"
        raise AuthError(f"github.runner-group: no runner group {group!r} (known: {known})")

    # ---------------------------------------------------------------- jobs

    def repositories(self, listed: list[str]) -> list[str]:
        if self.scope_path.startswith("/repos/"):
            return [self.scope_path.removeprefix("/repos/")]
        if listed:
            return listed
        return [r["full_name"] for r in self.pages(f"{self.scope_path}/repos", None)]

    def queued_jobs(self, repositories: list[str]) -> list[dict[str, Any]]:
        """Every job that waits for a runner now, each with its repository in `_repo`."""
        jobs: dict[int, dict[str, Any]] = {}
        for repo in repositories:
            for status in OPEN_RUN_STATUSES:
                for run in self.pages(f"/repos/{repo}/actions/runs", "workflow_runs",
                                      {"status": status}):  # fmt: skip
                    for job in self.pages(f"/repos/{repo}/actions/runs/{run['id']}/jobs",
                                          "jobs", {"filter": "latest"}):  # fmt: skip
                        if job.get("status") == "queued":
                            jobs[int(job["id"])] = {**job, "_repo": repo}
        return list(jobs.values())

    def job(self, repo: str, job_id: int) -> dict[str, Any] | None:
        response = self.call("GET", f"/repos/{repo}/actions/jobs/{job_id}", ok=(404,))
        return None if response.status_code == 404 else dict(response.json())

    # --------------------------------------------------------------- start

    def check(self) -> None:
        """Fail now, with what to fix, when the credentials cannot manage runners."""
        try:
            self.call("GET", f"{self.scope_path}/actions/runners", params={"per_page": 1})
        except CiServerError as exc:
            if exc.status == 401:
                raise AuthError(f"github.token: GitHub refused the token (401 Bad credentials) "
                                f"at {self.server.base_url}") from None  # fmt: skip
            if exc.status in (403, 404):
                raise AuthError(
                    f"github: the token cannot manage the self-hosted runners of "
                    f"{self.scope_path.split('/', 2)[2]} (HTTP {exc.status}); it needs "
                    "Administration: read & write (repository) or Self-hosted runners: "
                    "read & write (organization)"
                ) from None
            raise
