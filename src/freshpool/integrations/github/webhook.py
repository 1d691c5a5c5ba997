"""`POST /integrations/github/webhook`: GitHub's `workflow_job` deliveries, checked.

The body's HMAC-SHA256 under the shared secret must match `X-Hub-Signature-256`
(compared in constant time) or the answer is 401 and nothing happens. A delivery id
seen before (GitHub's redelivery, or someone replaying a captured request) is
answered 200 and not acted on again. The delivery id is not signed, so a replay under
a new id still passes here: what makes that harmless is that every event is
idempotent per job id (a job queued twice is one job; a job that left `queued` is not
queued again by an older event).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response

log = logging.getLogger("freshpool.integrations.github")

PATH = "/integrations/github/webhook"
# Deliveries remembered for replay checks: GitHub redelivers within days, not millions.
REMEMBERED = 100_000
ACTIONS = ("queued", "in_progress", "completed", "waiting")


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def valid(secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(signature(secret, body), header or "")


@dataclass(frozen=True)
class JobEvent:
    action: str
    job_id: int
    run_id: int
    repo: str
    labels: frozenset[str]
    status: str
    created_at: str | None
    started_at: str | None
    runner_name: str | None
    conclusion: str | None


def job_event(payload: dict[str, Any]) -> JobEvent:
    job = payload["workflow_job"]
    return JobEvent(
        action=payload["action"],
        job_id=int(job["id"]),
        run_id=int(job["run_id"]),
        repo=payload["repository"]["full_name"],
        labels=frozenset(str(label).lower() for label in job.get("labels") or []),
        status=job.get("status", ""),
        created_at=job.get("created_at"),
        started_at=job.get("started_at"),
        runner_name=job.get("runner_name"),
        conclusion=job.get("conclusion"),
    )


class Deliveries:
    """Delivery ids already acted on, oldest forgotten first."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def first_time(self, delivery: str) -> bool:
        with self._lock:
            if delivery in self._seen:
                return False
            self._seen[delivery] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


def add_route(app: FastAPI, secret: str, on_job: Callable[[JobEvent], None],
              counts: dict[str, int]) -> None:  # fmt: skip
    """The webhook route on `app`; `counts` tallies what was received, for /status."""
    seen = Deliveries()

    @app.post(PATH)
    async def receive(request: Request) -> Response:
        body = await request.body()
        if not valid(secret, body, request.headers.get("x-hub-signature-256")):
            counts["bad_signature"] = counts.get("bad_signature", 0) + 1
            log.warning("github webhook: bad or missing signature from %s",
                        request.client.host if request.client else "?")  # fmt: skip
            return Response('{"message": "bad signature"}', 401, media_type="application/json")
        delivery = request.headers.get("x-github-delivery", "")
        event = request.headers.get("x-github-event", "")
        if not delivery or not seen.first_time(delivery):
            counts["duplicate"] = counts.get("duplicate", 0) + 1
            return Response('{"message": "already received"}', 200, media_type="application/json")
        counts[event or "?"] = counts.get(event or "?", 0) + 1
        if event != "workflow_job":
            return Response(status_code=204)  # ping, and events we do not act on
        try:
            parsed = job_event(json.loads(body))
        except (ValueError, KeyError, TypeError) as exc:
            return Response(json.dumps({"message": f"not a workflow_job payload: {exc}"}), 400,
                            media_type="application/json")  # fmt: skip
        if parsed.action in ACTIONS:
            on_job(parsed)
        return Response(status_code=204)
