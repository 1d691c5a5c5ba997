"""`freshpool jenkins serve`: the queue loop, the agents, and /status and /metrics.

Start-up fails, with what to fix, when Jenkins refuses the token or cannot be
reached; after that Jenkins being down is retried with the one backoff and shown at
/status, and nothing is torn down for it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from freshpool.core.errors import Unavailable
from freshpool.integrations.ciserver import CiServerError
from freshpool.integrations.jenkins.agents import AgentLife
from freshpool.integrations.jenkins.api import INTEGRATION, JenkinsApi
from freshpool.integrations.jenkins.config import Settings
from freshpool.integrations.jenkins.fleet import Fleet
from freshpool.integrations.service import integration_app, run

log = logging.getLogger("freshpool.integrations.jenkins")


def connect(settings: Settings) -> tuple[JenkinsApi, str, str]:
    """A client whose token Jenkins has accepted, with Jenkins' version and the user."""
    api = JenkinsApi(settings.jenkins)
    try:
        version, user = api.check()
    except CiServerError as exc:
        if exc.status in (401, 403):
            raise Unavailable(
                f"jenkins: {settings.jenkins.url} refused `jenkins.user` "
                f"{settings.jenkins.user!r} with `jenkins.token` ({exc})"
            ) from None
        raise Unavailable(f"jenkins: cannot reach {settings.jenkins.url}: {exc}") from None
    return api, version, user


@dataclass
class Service:
    settings: Settings
    api: JenkinsApi
    fleet: Fleet
    app: FastAPI
    version: str
    stop: threading.Event

    def status(self) -> dict[str, Any]:
        health = self.api.server.health.as_dict()
        jenkins = {"url": self.settings.jenkins.url, "version": self.version, **health}
        return {"jenkins": jenkins, **self.fleet.status()}


def build(settings: Settings, log_dir: Path) -> Service:
    api, version, _user = connect(settings)
    holder: list[Fleet] = []
    life = AgentLife(settings, api, settings.freshpool.client(), log_dir,
                     lambda queue_id: holder[0].queued_since(queue_id))  # fmt: skip
    fleet = Fleet(settings, api, life)
    holder.append(fleet)
    services: list[Service] = []
    app = integration_app(INTEGRATION, lambda: services[0].status())
    services.append(Service(settings, api, fleet, app, version, threading.Event()))
    return services[0]


def serve(settings: Settings, log_dir: Path) -> None:
    """Run until SIGINT/SIGTERM; then idle agents are removed and every node released."""
    service = build(settings, log_dir)
    status = settings.status
    log.info("jenkins: status at http://%s:%d/status", status.listen, status.port)

    run(
        service.app,
        status.listen,
        status.port,
        service.fleet.run,
        service.stop,
        service.fleet.stop_all,
    )
