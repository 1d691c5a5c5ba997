"""`freshpool github serve`: the webhook receiver and the reconcile loop in one process.

Start-up fails, with what to fix, when the token (or the App) is refused, the runner
group does not exist, or GitHub cannot be reached; after that GitHub being down is
retried with the one backoff and shown at /status, and nothing is torn down for it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from freshpool.core.errors import Unavailable
from freshpool.integrations.ciserver import CiServer, CiServerError
from freshpool.integrations.github import webhook
from freshpool.integrations.github.api import INTEGRATION, GithubApi
from freshpool.integrations.github.auth import AppAuth, Auth, TokenAuth
from freshpool.integrations.github.config import Settings
from freshpool.integrations.github.fleet import Fleet
from freshpool.integrations.github.reconcile import Reconciler
from freshpool.integrations.github.runners import Launcher
from freshpool.integrations.service import integration_app, run

log = logging.getLogger("freshpool.integrations.github")


def connect(settings: Settings) -> GithubApi:
    """An API client whose credentials GitHub has accepted for the configured scope."""
    gh = settings.github
    server = CiServer(INTEGRATION, gh.api_url)
    auth: Auth
    if gh.app is not None:
        key = gh.app.private_key_file.read_text()
        auth = AppAuth(server, gh.app.app_id, key, gh.scope_path, gh.app.installation_id)
    else:
        auth = TokenAuth(gh.resolved_token() or "")
    api = GithubApi(server, auth, gh.scope_path)
    try:
        api.check()
    except CiServerError as exc:
        raise Unavailable(f"github: cannot reach {gh.api_url}: {exc}") from None
    return api


@dataclass
class Service:
    settings: Settings
    api: GithubApi
    fleet: Fleet
    launcher: Launcher
    reconciler: Reconciler
    app: FastAPI
    received: dict[str, int]
    stop: threading.Event

    def status(self) -> dict[str, Any]:
        return {
            "github": {"url": self.settings.github.api_url, **self.api.server.health.as_dict()},
            "scope": self.settings.github.scope_path,
            "webhooks": dict(self.received),
            **self.fleet.status(),
            **self.reconciler.status(),
        }


def build(settings: Settings, log_dir: Path) -> Service:
    api = connect(settings)
    try:
        group_id = api.runner_group_id(settings.github.runner_group)
    except CiServerError as exc:
        raise Unavailable(f"github: cannot read runner groups: {exc}") from None
    client = settings.freshpool.client()
    fleet = Fleet(settings)
    launcher = Launcher(settings, api, client, fleet, group_id, log_dir)
    reconciler = Reconciler(settings, api, fleet, launcher)
    received: dict[str, int] = {}
    holder: list[Service] = []
    app = integration_app(INTEGRATION, lambda: holder[0].status())
    webhook.add_route(app, settings.webhook.resolved_secret(), fleet.on_job, received)
    service = Service(settings, api, fleet, launcher, reconciler, app, received,
                      threading.Event())  # fmt: skip
    holder.append(service)
    return service


def serve(settings: Settings, log_dir: Path) -> None:
    """Run until SIGINT/SIGTERM; then idle runners are removed and every node released."""
    service = build(settings, log_dir)
    hook = settings.webhook
    log.info("github: webhook at http://%s:%d%s", hook.listen, hook.port, webhook.PATH)
    run(service.app, hook.listen, hook.port, service.reconciler.run, service.stop,
        service.launcher.stop_all)  # fmt: skip
