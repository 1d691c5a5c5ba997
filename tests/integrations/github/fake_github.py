"""A GitHub that runs here, faithful to the parts of its published REST API and webhooks
that `freshpool github serve` uses, for the integration's tests.

Emulated from GitHub's REST description (api.github.com, version 2022-11-28):
self-hosted runners (list with `Link` pagination, get, delete with 422 while busy),
`generate-jitconfig` (201, a runner registration and `encoded_jit_config`), runner
groups, workflow runs and their jobs, one job, and `workflow_job` webhooks signed with
`X-Hub-Signature-256` and carrying `X-GitHub-Delivery`. Bearer tokens are checked
(401 `Bad credentials` otherwise), a GitHub App's RS256 JWT is verified and traded for
an installation token and a spent rate limit can be played (403 with
`x-ratelimit-remaining: 0` and `retry-after`).

Not public, so replaced: the Actions service a runner talks to once registered. The
stand-in runner (`runner/run.sh`) opens a session, long-polls for a job and reports
its result over three plain routes under /_fake/broker/. What it keeps of GitHub's
behaviour: a JIT config works for one session only; a job goes to an online runner
whose labels include all of the job's; a JIT runner is deleted by GitHub after its
job; a deleted runner's session ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

REPO = "octo-org/octo-repo"
SCOPE = f"/repos/{REPO}"
# How long a broker poll is held before "no message" (the real service holds ~50 s).
POLL_HOLD = 1.0


def stamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@dataclass
class FakeRunner:
    id: int
    name: str
    labels: list[str]
    group_id: int
    work_folder: str
    token: str
    status: str = "offline"
    busy: bool = False
    sessions: int = 0
    job_id: int | None = None

    def as_json(self) -> dict[str, Any]:
        labels = [{"id": i + 1, "name": n, "type": "custom"} for i, n in enumerate(self.labels)]
        return {"id": self.id, "name": self.name, "os": "Linux", "status": self.status,
                "busy": self.busy, "ephemeral": True, "runner_group_id": self.group_id,
                "labels": labels}  # fmt: skip


@dataclass
class FakeJob:
    id: int
    run_id: int
    name: str
    labels: list[str]
    script: str
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    conclusion: str | None = None
    runner_name: str | None = None
    started_at: float | None = None
    output: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "run_id": self.run_id, "name": self.name, "labels": self.labels,
            "status": self.status, "conclusion": self.conclusion,
            "created_at": stamp(self.created_at),
            "started_at": stamp(self.started_at) if self.started_at else None,
            "runner_name": self.runner_name, "head_branch": "main", "workflow_name": "ci",
        }  # fmt: skip


class FakeGithub:
    def __init__(self, token: str, webhook_secret: str, per_page_cap: int = 100) -> None:
        self.token = token
        self.webhook_secret = webhook_secret
        self.per_page_cap = per_page_cap
        self.hook_url: str | None = None
        self.send_webhooks = True
        self.runners: dict[int, FakeRunner] = {}
        self.jobs: dict[int, FakeJob] = {}
        self.deliveries: list[tuple[str, int]] = []
        self.requests: list[tuple[str, str]] = []
        self.rate_limited = 0  # answer this many next calls with a spent rate limit
        self.ids = itertools.count(1001)
        self.url = ""
        # A GitHub App: its id, its public key, and the installation tokens it was given.
        self.app_id: str | None = None
        self.app_public_key: Any = None
        self.installation_tokens: set[str] = set()
        self.lock = threading.RLock()
        self.app = self._routes()

    # ------------------------------------------------------------ the test's side

    def queue(self, labels: list[str], script: str = "true", name: str = "build") -> FakeJob:
        """A workflow run with one job waiting for a runner, and its `queued` webhook."""
        with self.lock:
            job = FakeJob(next(self.ids), next(self.ids), name, labels, script)
            self.jobs[job.id] = job
        self._hook("queued", job)
        return job

    def cancel(self, job: FakeJob) -> None:
        with self.lock:
            job.status, job.conclusion = "completed", "cancelled"
        self._hook("completed", job)

    def add_offline_runner(self, name: str) -> FakeRunner:
        """A registration left behind with no runner process (a ghost)."""
        with self.lock:
            runner = FakeRunner(next(self.ids), name, ["self-hosted"], 1, "_work", "")
            self.runners[runner.id] = runner
            return runner

    def _hook(self, action: str, job: FakeJob) -> None:
        if not self.send_webhooks or not self.hook_url:
            return
        body = json.dumps({"action": action, "workflow_job": job.as_json(),
                           "repository": {"full_name": REPO}}).encode()  # fmt: skip
        delivery = secrets.token_hex(8)
        self.deliveries.append((action, job.id))
        headers = {"X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": delivery,
                   "X-Hub-Signature-256": sign(self.webhook_secret, body),
                   "Content-Type": "application/json"}  # fmt: skip
        # GitHub delivers from its own side, asynchronously; a failed delivery is lost.
        threading.Thread(target=_deliver, args=(self.hook_url, body, headers), daemon=True).start()

    # ------------------------------------------------------------------- the API

    def _routes(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Response:
            path = request.url.path
            self.requests.append((request.method, path))
            if path.startswith("/_fake/"):
                return await call_next(request)  # type: ignore[no-any-return]
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if path.endswith("/installation") or path.startswith("/app/"):
                if not self._valid_app_jwt(given):
                    return JSONResponse({"message": "A JSON web token could not be decoded"}, 401)
                return await call_next(request)  # type: ignore[no-any-return]
            if given != self.token and given not in self.installation_tokens:
                return JSONResponse({"message": "Bad credentials"}, 401)
            if self.rate_limited > 0:
                self.rate_limited -= 1
                return JSONResponse(
                    {"message": "API rate limit exceeded"}, 403,
                    headers={"x-ratelimit-remaining": "0", "retry-after": "1"},
                )  # fmt: skip
            return await call_next(request)  # type: ignore[no-any-return]

        self._app_routes(app)
        self._runner_routes(app)
        self._job_routes(app)
        self._broker_routes(app)
        return app

    def _page(self, request: Request, items: list[dict[str, Any]], key: str) -> Response:
        per_page = min(int(request.query_params.get("per_page", 30)), self.per_page_cap)
        page = int(request.query_params.get("page", 1))
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(items):
            query = dict(request.query_params) | {"page": str(page + 1),
                                                   "per_page": str(per_page)}  # fmt: skip
            nxt = request.url.replace_query_params(**query)
            headers["Link"] = f'<{nxt}>; rel="next"'
        return JSONResponse({"total_count": len(items), key: chunk}, headers=headers)

    def _valid_app_jwt(self, token: str) -> bool:
        if self.app_public_key is None:
            return False
        try:
            claims = jwt.decode(token, self.app_public_key, algorithms=["RS256"],
                                options={"require": ["iat", "exp", "iss"]})  # fmt: skip
        except jwt.PyJWTError:
            return False
        # GitHub refuses a JWT meant to live longer than ten minutes.
        return str(claims["iss"]) == self.app_id and claims["exp"] - claims["iat"] <= 600

    def _app_routes(self, app: FastAPI) -> None:
        @app.get(SCOPE + "/installation")
        def installation() -> Response:
            return JSONResponse({"id": 42, "app_id": self.app_id})

        @app.post("/app/installations/{installation_id}/access_tokens")
        def access_token(installation_id: int) -> Response:
            if installation_id != 42:
                return JSONResponse({"message": "Not Found"}, 404)
            token = "ghs_" + secrets.token_hex(18)
            self.installation_tokens.add(token)
            return JSONResponse({"token": token, "expires_at": stamp(time.time() + 3600)}, 201)

    def _runner_routes(self, app: FastAPI) -> None:
        @app.get(SCOPE + "/actions/runners")
        def runners(request: Request) -> Response:
            with self.lock:
                listed = [r.as_json() for r in self.runners.values()]
            return self._page(request, listed, "runners")

        @app.get(SCOPE + "/actions/runners/{runner_id}")
        def runner(runner_id: int) -> Response:
            found = self.runners.get(runner_id)
            if found is None:
                return JSONResponse({"message": "Not Found"}, 404)
            return JSONResponse(found.as_json())

        @app.delete(SCOPE + "/actions/runners/{runner_id}")
        def delete(runner_id: int) -> Response:
            with self.lock:
                found = self.runners.get(runner_id)
                if found is None:
                    return JSONResponse({"message": "Not Found"}, 404)
                if found.busy:
                    return JSONResponse({"message": "Bad request - Runner is busy"}, 422)
                del self.runners[runner_id]
            return Response(status_code=204)

        @app.post(SCOPE + "/actions/runners/generate-jitconfig")
        async def jit(request: Request) -> Response:
            body = await request.json()
            name, labels = body.get("name"), body.get("labels")
            if not name or not labels or "runner_group_id" not in body:
                return JSONResponse({"message": "Invalid request: name, runner_group_id and "
                                                "labels are required"}, 422)  # fmt: skip
            with self.lock:
                if any(r.name == name for r in self.runners.values()):
                    return JSONResponse({"message": "Already exists"}, 409)
                work = body.get("work_folder", "_work")
                group, token = int(body["runner_group_id"]), secrets.token_hex(16)
                runner = FakeRunner(next(self.ids), name, list(labels), group, work, token)
                self.runners[runner.id] = runner
            files = {
                ".runner": b64json({"agentId": runner.id, "agentName": name,
                                    "serverUrl": self.url, "workFolder": runner.work_folder}),
                ".credentials": b64json({"scheme": "OAuthAccessToken",
                                         "data": {"token": runner.token}}),
                ".credentials_rsaparams": b64json({"d": secrets.token_hex(8)}),
            }  # fmt: skip
            return JSONResponse({"runner": runner.as_json(), "encoded_jit_config": b64json(files)},
                                201)  # fmt: skip

    def _job_routes(self, app: FastAPI) -> None:
        @app.get(SCOPE + "/actions/runs")
        def runs(request: Request) -> Response:
            status = request.query_params.get("status")
            with self.lock:
                by_run: dict[int, list[FakeJob]] = {}
                for job in self.jobs.values():
                    by_run.setdefault(job.run_id, []).append(job)
            listed = []
            for run_id, jobs in by_run.items():
                run_status = ("queued" if all(j.status == "queued" for j in jobs) else
                              "completed" if all(j.status == "completed" for j in jobs) else
                              "in_progress")  # fmt: skip
                if status is None or status == run_status:
                    listed.append({"id": run_id, "status": run_status, "name": "ci"})
            return self._page(request, listed, "workflow_runs")

        @app.get(SCOPE + "/actions/runs/{run_id}/jobs")
        def run_jobs(request: Request, run_id: int) -> Response:
            with self.lock:
                listed = [j.as_json() for j in self.jobs.values() if j.run_id == run_id]
            return self._page(request, listed, "jobs")

        @app.get(SCOPE + "/actions/jobs/{job_id}")
        def job(job_id: int) -> Response:
            found = self.jobs.get(job_id)
            if found is None:
                return JSONResponse({"message": "Not Found"}, 404)
            return JSONResponse(found.as_json())

    def _broker_routes(self, app: FastAPI) -> None:
        def runner_of(request: Request, agent_id: int) -> FakeRunner | None:
            found = self.runners.get(agent_id)
            given = request.headers.get("authorization", "")
            return found if found is not None and given == f"Bearer {found.token}" else None

        @app.post("/_fake/broker/sessions")
        async def session(request: Request) -> Response:
            body = await request.json()
            with self.lock:
                runner = runner_of(request, int(body.get("agentId", 0)))
                if runner is None:
                    return JSONResponse({"message": "unknown runner"}, 404)
                runner.sessions += 1
                if runner.sessions > 1:  # a JIT config is good for one runner process
                    return JSONResponse({"message": "session already used"}, 409)
                runner.status = "online"
            return JSONResponse({"sessionId": secrets.token_hex(8)}, 201)

        @app.get("/_fake/broker/message")
        async def message(request: Request, agentId: int) -> Response:
            deadline = time.monotonic() + POLL_HOLD
            while time.monotonic() < deadline:
                with self.lock:
                    runner = runner_of(request, agentId)
                    if runner is None:
                        return JSONResponse({"message": "runner deleted"}, 404)
                    job = self._assign(runner)
                if job is not None:
                    self._hook("in_progress", job)
                    return JSONResponse({"job": {"id": job.id, "name": job.name,
                                                 "script": job.script}})  # fmt: skip
                await asyncio.sleep(0.05)
            return Response(status_code=204)

        @app.post("/_fake/broker/jobs/{job_id}/finish")
        async def finish(request: Request, job_id: int) -> Response:
            body = await request.json()
            with self.lock:
                job = self.jobs[job_id]
                job.status, job.conclusion = "completed", body["conclusion"]
                job.output = body.get("output", "")
                # GitHub removes an ephemeral (JIT) runner once its job is done.
                for runner_id, runner in list(self.runners.items()):
                    if runner.job_id == job_id:
                        del self.runners[runner_id]
            self._hook("completed", job)
            return Response(status_code=204)

    def _assign(self, runner: FakeRunner) -> FakeJob | None:
        if runner.busy:
            return None
        mine = {label.lower() for label in runner.labels}
        for job in sorted(self.jobs.values(), key=lambda j: j.created_at):
            if job.status == "queued" and {label.lower() for label in job.labels} <= mine:
                job.status, job.runner_name = "in_progress", runner.name
                job.started_at = time.time()
                runner.busy, runner.job_id = True, job.id
                return job
        return None

    # --------------------------------------------------------------- serving

    def serve(self, host: str, port: int) -> uvicorn.Server:
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                access_log=False)  # fmt: skip
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True, name="fake-github").start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline:
                raise AssertionError("the fake GitHub did not start")
            time.sleep(0.02)
        return server


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _deliver(url: str, body: bytes, headers: dict[str, str]) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, content=body, headers=headers, timeout=10)
