"""The fake Jenkins' HTTP routes (fake_jenkins.py says what is emulated)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from xml.etree import ElementTree as ET

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse

from tests.integrations.jenkins.fake_model import LONG_POLL, FakeAgent

if TYPE_CHECKING:
    from tests.integrations.jenkins.fake_jenkins import FakeJenkins

NODE_TYPE = "hudson.slaves.DumbSlave$DescriptorImpl"


def _missing() -> Response:
    return PlainTextResponse("Not Found", status_code=404)


def add(app: FastAPI, fake: FakeJenkins) -> None:
    _add_server(app, fake)
    _add_computers(app, fake)
    _add_builds(app, fake)
    _add_remoting(app, fake)


def _add_server(app: FastAPI, fake: FakeJenkins) -> None:
    @app.get("/")
    def root() -> dict[str, Any]:
        return {"_class": "hudson.model.Hudson", "nodeDescription": "the fake Jenkins"}

    @app.get("/me/api/json")
    def me() -> dict[str, Any]:
        return {"_class": "hudson.model.User", "id": fake.user, "fullName": fake.user}

    @app.get("/crumbIssuer/api/json")
    def crumb(request: Request) -> Response:
        return fake.issue_crumb(request)

    @app.get("/queue/api/json")
    def queue() -> dict[str, Any]:
        with fake.lock:
            items = [{
                "_class": "hudson.model.Queue$BuildableItem", "id": i.id, "blocked": False,
                "buildable": True, "stuck": False, "inQueueSince": i.since, "why": fake.why(i),
                "task": {"name": i.job, "url": f"{fake.url}job/{i.job}/"},
            } for i in fake.queue]  # fmt: skip
        return {"_class": "hudson.model.Queue", "items": items}


def _add_computers(app: FastAPI, fake: FakeJenkins) -> None:
    @app.post("/computer/doCreateItem")
    async def create(request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        name, kind = form.get("name", ""), form.get("type", "")
        if not name or kind != NODE_TYPE:
            return PlainTextResponse(f"bad name {name!r} or type {kind!r}", status_code=400)
        try:
            spec = json.loads(form.get("json", ""))
        except ValueError:
            return PlainTextResponse("json is not JSON", status_code=400)
        with fake.lock:
            if name in fake.agents:
                return PlainTextResponse(f"Agent called \u2018{name}\u2019 already exists",
                                         status_code=400)  # fmt: skip
            fake.agents[name] = FakeAgent(
                name, str(spec.get("labelString") or ""), str(spec.get("mode") or "NORMAL"),
                str(spec.get("remoteFS") or ""), str(spec.get("nodeDescription") or ""),
            )  # fmt: skip
        return RedirectResponse("/computer/", status_code=302)

    @app.get("/computer/")
    def computers_page() -> Response:
        return HTMLResponse("<html><body>Nodes</body></html>")

    @app.get("/computer/api/json")
    def computers() -> dict[str, Any]:
        builtin = {"_class": "hudson.model.Hudson$MasterComputer", "displayName": "Built-In Node",
                   "offline": False, "temporarilyOffline": False, "idle": True,
                   "numExecutors": 0, "assignedLabels": [{"name": "built-in"}],
                   "executors": []}  # fmt: skip
        with fake.lock:
            return {"computer": [builtin, *(fake.computer(a) for a in fake.agents.values())]}

    @app.get("/computer/{name}/api/json")
    def computer(name: str) -> Response:
        with fake.lock:
            agent = fake.agents.get(name)
            return _missing() if agent is None else JSONResponse(fake.computer(agent))

    @app.get("/computer/{name}/config.xml")
    def read_config(name: str) -> Response:
        with fake.lock:
            agent = fake.agents.get(name)
            if agent is None:
                return _missing()
            return Response(fake.config_xml(agent), media_type="application/xml")

    @app.post("/computer/{name}/config.xml")
    async def write_config(name: str, request: Request) -> Response:
        try:
            root = ET.fromstring(await request.body())
        except ET.ParseError as exc:
            return PlainTextResponse(f"not XML: {exc}", status_code=400)
        with fake.lock:
            agent = fake.agents.get(name)
            if agent is None:
                return _missing()
            agent.label = (root.findtext("label") or "").strip()
            agent.mode = (root.findtext("mode") or agent.mode).strip()
            fake.lock.notify_all()
        return Response(status_code=200)

    @app.post("/computer/{name}/toggleOffline")
    def toggle(name: str, offlineMessage: str = "") -> Response:
        with fake.lock:
            agent = fake.agents.get(name)
            if agent is None:
                return _missing()
            agent.temporarily_offline = not agent.temporarily_offline
            agent.offline_message = offlineMessage
        return RedirectResponse(f"/computer/{name}/", status_code=302)

    @app.get("/computer/{name}/")
    def computer_page(name: str) -> Response:
        return HTMLResponse(f"<html><body>{name}</body></html>")

    @app.post("/computer/{name}/doDelete")
    def delete(name: str) -> Response:
        with fake.lock:
            agent = fake.agents.pop(name, None)
            if agent is None:
                return _missing()
            fake.deleted.append(name)
            if agent.build is not None:
                agent.build.abort = True
                fake.finish(agent.build, "ABORTED")
        return RedirectResponse("/computer/", status_code=302)

    @app.get("/computer/{name}/jenkins-agent.jnlp")
    def jnlp(name: str) -> Response:
        with fake.lock:
            agent = fake.agents.get(name)
            if agent is None:
                return _missing()
            arguments = [agent.secret, agent.name, "-workDir", agent.remote_fs,
                         "-internalDir", "remoting", "-url", fake.url]  # fmt: skip
        root = ET.Element("jnlp", {"codebase": f"{fake.url}computer/{name}/", "spec": "1.0+"})
        desc = ET.SubElement(root, "application-desc", {"main-class": "hudson.remoting.jnlp.Main"})
        for argument in arguments:
            ET.SubElement(desc, "argument").text = argument
        return Response(ET.tostring(root, encoding="unicode"),
                        media_type="application/x-java-jnlp-file")  # fmt: skip


def _add_builds(app: FastAPI, fake: FakeJenkins) -> None:
    @app.get("/job/{job}/{number}/api/json")
    def build(job: str, number: int) -> Response:
        with fake.lock:
            found = fake.builds.get(f"job/{job}/{number}/")
            if found is None:
                return _missing()
            return JSONResponse({
                "_class": "hudson.model.FreeStyleBuild", "number": found.number,
                "url": fake.url + found.path, "result": found.result,
                "building": found.result is None, "builtOn": found.built_on,
                "timestamp": found.timestamp, "queueId": found.queue_id,
            })  # fmt: skip

    @app.post("/job/{job}/{number}/stop")
    def stop(job: str, number: int) -> Response:
        with fake.lock:
            found = fake.builds.get(f"job/{job}/{number}/")
            if found is None:
                return _missing()
            found.abort = True
            fake.lock.notify_all()
        return RedirectResponse(f"/job/{job}/{number}/", status_code=302)

    @app.get("/job/{job}/{number}/")
    def build_page(job: str, number: int) -> Response:
        return HTMLResponse(f"<html><body>{job} #{number}</body></html>")


def _agent(fake: FakeJenkins, request: Request) -> FakeAgent | Response:
    """The agent a remoting call comes from, by its Node-Name and Secret-Key."""
    agent = fake.agents.get(request.headers.get("node-name", ""))
    if agent is None:
        return _missing()
    if request.headers.get("secret-key") != agent.secret:
        return PlainTextResponse("wrong secret", status_code=403)
    agent.last_poll = time.time()
    return agent


def _add_remoting(app: FastAPI, fake: FakeJenkins) -> None:
    @app.post("/_fake/remoting/connect")
    def connect(request: Request) -> Response:
        with fake.lock:
            found = _agent(fake, request)
            return found if isinstance(found, Response) else JSONResponse({"connected": True})

    @app.get("/_fake/remoting/work")
    def work(request: Request) -> Response:
        """Long-polled: the build Jenkins gives this agent, or 204 after a while."""
        deadline = time.time() + LONG_POLL
        with fake.lock:
            while True:
                found = _agent(fake, request)
                if isinstance(found, Response):
                    return found
                build = fake.assign(found)
                if build is not None:
                    return JSONResponse(
                        {
                            "build": build.path,
                            "job": build.job,
                            "script": build.script,
                            "url": fake.url + build.path,
                        }
                    )
                if time.time() >= deadline:
                    return Response(status_code=204)
                fake.lock.wait(max(0.0, min(0.2, deadline - time.time())))

    @app.post("/_fake/remoting/heartbeat")
    def heartbeat(request: Request, build: str) -> Response:
        with fake.lock:
            found = _agent(fake, request)
            if isinstance(found, Response):
                return found
            running = fake.builds.get(build)
            return JSONResponse({"abort": running is None or running.abort})

    @app.post("/_fake/remoting/done")
    async def done(request: Request) -> Response:
        body = await request.json()
        with fake.lock:
            found = _agent(fake, request)
            if isinstance(found, Response):
                return found
            running = fake.builds.get(str(body.get("build")))
            if running is None or running.built_on != found.name:
                return _missing()
            running.output = str(body.get("output") or "")
            fake.finish(running, str(body.get("result") or "FAILURE"))
        return Response(status_code=200)
