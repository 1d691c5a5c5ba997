"""A fake Jenkins controller for the Jenkins integration's tests: a real HTTP server
that answers the REST calls `freshpool jenkins serve` makes, the way Jenkins 2.4xx
answers them.

Emulated faithfully, from Jenkins' remote access API and python-jenkins' use of it:
basic auth with a user's API token (401 otherwise), the `X-Jenkins` version header,
the CSRF crumb bound to the session cookie (a POST without it is refused with 403),
`computer/doCreateItem` with python-jenkins' form fields, `computer/api/json` and
`computer/NAME/api/json` (offline, temporarilyOffline, idle, executors with their
current build), an agent's `config.xml` read and written, `toggleOffline`, `doDelete`
(which aborts the agent's running build, as Jenkins does), `jenkins-agent.jnlp` with
the agent's secret first among its arguments, `queue/api/json` with Jenkins' own
wording of why a build waits, and a build's `api/json` and `stop`. Scheduling keeps
Jenkins' rules that matter here: a build goes only to an online agent that is not
temporarily offline, carries its label, and has a free executor.

Replaced: the remoting channel agent.jar speaks over WebSocket, which is not a public
API, by long-polled plain HTTP under /_fake/remoting/ (the stand-in agent in
agent/agent.py speaks it, with agent.jar's command line and the same Node-Name and
Secret-Key headers). An agent counts as online while it polls. Builds are shell
scripts queued by the test, not jobs configured in Jenkins.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.middleware.base import BaseHTTPMiddleware

from tests.integrations.jenkins import fake_routes
from tests.integrations.jenkins.fake_model import VERSION, FakeAgent, FakeBuild, QueueItem


class FakeJenkins:
    def __init__(self, user: str, token: str) -> None:
        self.user, self.token = user, token
        self.lock = threading.Condition()
        self.agents: dict[str, FakeAgent] = {}
        self.queue: list[QueueItem] = []
        self.builds: dict[str, FakeBuild] = {}
        self.deleted: list[str] = []
        self.sessions: set[str] = set()
        self.crumb_key = secrets.token_bytes(16)
        # Answer this many authenticated API calls with 503, as a restarting Jenkins does.
        self.failing = 0
        self.requests_failed = 0
        self._ids = iter(range(1, 1 << 30))
        self._numbers: dict[str, int] = {}
        self.url = ""
        self.app = self._build_app()

    # ------------------------------------------------------------ for tests

    def queue_build(self, label: str, script: str, job: str = "test") -> QueueItem:
        with self.lock:
            item = QueueItem(next(self._ids), job, label, script)
            self.queue.append(item)
            self.lock.notify_all()
            return item

    def build_of(self, item: QueueItem) -> FakeBuild | None:
        with self.lock:
            return next((b for b in self.builds.values() if b.queue_id == item.id), None)

    def add_agent(self, name: str, label: str) -> FakeAgent:
        """An agent registered by someone else (or by a freshpool that died)."""
        with self.lock:
            agent = FakeAgent(name, label, "EXCLUSIVE", "/tmp", "added by the test")
            self.agents[name] = agent
            return agent

    def serve(self, host: str, port: int) -> uvicorn.Server:
        self.url = f"http://{host}:{port}/"
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                lifespan="off")  # fmt: skip
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True, name="fake-jenkins").start()
        deadline = time.time() + 20
        while not server.started:
            if time.time() > deadline:
                raise RuntimeError("the fake Jenkins did not start")
            time.sleep(0.05)
        return server

    # ------------------------------------------------------------- Jenkins

    def why(self, item: QueueItem) -> str:
        """Jenkins' own words (with its curly quotes) for why a build waits."""
        agents = [a for a in self.agents.values() if item.label in a.label.split()]
        if not agents:
            return f"There are no nodes with the label \u2018{item.label}\u2019"
        if all(not a.connected or a.temporarily_offline for a in agents):
            return f"All nodes of label \u2018{item.label}\u2019 are offline"
        return f"Waiting for next available executor on \u2018{item.label}\u2019"

    def computer(self, agent: FakeAgent) -> dict[str, Any]:
        build = agent.build
        current = None
        if build is not None:
            current = {"url": self.url + build.path, "number": build.number,
                       "timestamp": build.timestamp, "queueId": build.queue_id}  # fmt: skip
        return {
            "_class": "hudson.slaves.SlaveComputer", "displayName": agent.name,
            "offline": agent.temporarily_offline or not agent.connected,
            "temporarilyOffline": agent.temporarily_offline,
            "offlineCauseReason": agent.offline_message, "idle": build is None,
            "numExecutors": 1, "assignedLabels": [{"name": agent.name}] + [
                {"name": label} for label in agent.label.split()],
            "executors": [{"currentExecutable": current}],
        }  # fmt: skip

    def config_xml(self, agent: FakeAgent) -> str:
        root = ET.Element("slave")
        for tag, text in (("name", agent.name), ("description", agent.description),
                          ("remoteFS", agent.remote_fs), ("numExecutors", "1"),
                          ("mode", agent.mode)):  # fmt: skip
            ET.SubElement(root, tag).text = text
        retention = {"class": "hudson.slaves.RetentionStrategy$Always"}
        ET.SubElement(root, "retentionStrategy", retention)
        launcher = ET.SubElement(root, "launcher", {"class": "hudson.slaves.JNLPLauncher"})
        ET.SubElement(launcher, "webSocket").text = "true"
        ET.SubElement(root, "label").text = agent.label
        ET.SubElement(root, "nodeProperties")
        return ET.tostring(root, encoding="unicode")

    def assign(self, agent: FakeAgent) -> FakeBuild | None:
        """The oldest queued build this agent may take, now running on it."""
        item = next((i for i in self.queue if agent.takes(i.label)), None)
        if item is None:
            return None
        self.queue.remove(item)
        number = self._numbers[item.job] = self._numbers.get(item.job, 0) + 1
        build = FakeBuild(item.job, number, item.script, item.id, agent.name)
        self.builds[build.path] = build
        agent.build = build
        agent.builds.append(build)
        return build

    def finish(self, build: FakeBuild, result: str) -> None:
        build.result = "ABORTED" if build.abort else result
        agent = self.agents.get(build.built_on)
        if agent is not None:
            build.agent_at_end = (agent.label, agent.temporarily_offline)
            if agent.build is build:
                agent.build = None
        self.lock.notify_all()

    # -------------------------------------------------------------- HTTP

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        app.add_middleware(BaseHTTPMiddleware, dispatch=self._guard)
        fake_routes.add(app, self)
        return app

    def _crumb(self, session: str) -> str:
        return hmac.new(self.crumb_key, session.encode(), hashlib.sha256).hexdigest()

    def authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Basic "):
            return False
        try:
            user, _, token = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return False
        return hmac.compare_digest(f"{user}:{token}", f"{self.user}:{self.token}")

    async def _guard(self, request: Request,
                     call_next: Callable[[Request], Awaitable[Response]]) -> Response:  # fmt: skip
        """Auth, crumbs and injected failures, for everything but the remoting stand-in."""
        path = request.url.path
        if path.startswith("/_fake/") or path.startswith("/jnlpJars/"):
            return await call_next(request)
        if not self.authorized(request):
            return self._plain(401, "Invalid password/token for user")
        if self.failing > 0:
            self.failing -= 1
            self.requests_failed += 1
            return self._plain(503, "Jenkins is restarting")
        if request.method == "POST" and path != "/crumbIssuer/api/json":
            session = request.cookies.get("JSESSIONID", "")
            crumb = request.headers.get("jenkins-crumb", "")
            if session not in self.sessions or not hmac.compare_digest(crumb, self._crumb(session)):
                return self._plain(403, "No valid crumb was included in the request")
        response = await call_next(request)
        response.headers["X-Jenkins"] = VERSION
        return response

    @staticmethod
    def _plain(status: int, text: str) -> Response:
        return PlainTextResponse(text, status_code=status, headers={"X-Jenkins": VERSION})

    def issue_crumb(self, request: Request) -> Response:
        session = request.cookies.get("JSESSIONID") or secrets.token_hex(16)
        self.sessions.add(session)
        body = {"_class": "hudson.security.csrf.DefaultCrumbIssuer",
                "crumb": self._crumb(session), "crumbRequestField": "Jenkins-Crumb"}  # fmt: skip
        response = JSONResponse(body)
        response.set_cookie("JSESSIONID", session, httponly=True)
        return response
