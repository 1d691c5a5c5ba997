"""What this process knows of GitHub's jobs and of its own runners, in one locked table.

Webhooks and the REST reconcile both feed it; the demand is read from it. Runners are
fungible: GitHub, not we, decides which runner takes which job, so a runner is tied
to a job only when `in_progress` names it (`runner_name`), never when it is started.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from freshpool.integrations import metrics
from freshpool.integrations.agent import Lease
from freshpool.integrations.github.config import Settings
from freshpool.integrations.github.webhook import JobEvent

INTEGRATION = "github"
# Names of our runners remembered for counting their jobs: a runner is dropped when its
# process exits, which can be before GitHub's `completed` webhook arrives.
REMEMBERED_NAMES = 10_000
Labels = frozenset[str]


def _epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class Job:
    id: int
    repo: str
    labels: Labels
    status: str
    queued_at: float
    seen_at: float = field(default_factory=time.time)
    runner_name: str | None = None


@dataclass
class Runner:
    """One runner of ours: `starting` (node being got, runner registering), `idle`
    (online, no job yet), `busy` (GitHub gave it a job), `stopping` (going away)."""

    name: str
    labels: Labels
    state: str = "starting"
    started_at: float = field(default_factory=time.time)
    online_at: float | None = None
    runner_id: int | None = None
    job_id: int | None = None
    lease: Lease | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "labels": sorted(self.labels), "state": self.state,
            "runner_id": self.runner_id, "job": self.job_id,
            "nodes": self.lease.node_ids if self.lease else [],
            "started_at": self.started_at, "online_at": self.online_at,
        }  # fmt: skip


def result_of(conclusion: str | None) -> str:
    return {"success": "passed", "failure": "failed"}.get(conclusion or "", "error")


class Fleet:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: dict[int, Job] = {}
        self.runners: dict[int, Runner] = {}  # by a local serial: a name changes per try
        self.served = 0
        self.orphans_removed = 0
        self._serial = 0
        self._ours: OrderedDict[str, int | None] = OrderedDict()  # name: the job it ran
        self.lock = threading.RLock()
        self.changed = threading.Event()

    # ------------------------------------------------------------- runners

    def add_runner(self, name: str, labels: Labels) -> int:
        with self.lock:
            self._serial += 1
            self.runners[self._serial] = Runner(name, labels)
            self.mark_ours(name)
            return self._serial

    def mark_ours(self, name: str) -> None:
        with self.lock:
            self._ours[name] = None
            if len(self._ours) > REMEMBERED_NAMES:
                self._ours.popitem(last=False)

    def by_name(self, name: str | None) -> Runner | None:
        with self.lock:
            return next((r for r in self.runners.values() if r.name == name), None)

    def drop_runner(self, key: int) -> None:
        with self.lock:
            self.runners.pop(key, None)
        self.changed.set()

    def names(self) -> set[str]:
        with self.lock:
            return {r.name for r in self.runners.values()}

    # ---------------------------------------------------------------- jobs

    def on_job(self, event: JobEvent) -> None:
        """A webhook's news of a job; safe to hear twice and out of order."""
        with self.lock:
            job = self.jobs.get(event.job_id)
            if event.action in ("queued", "waiting"):
                if job is None and self.settings.kind_for(event.labels) is not None:
                    queued_at = _epoch(event.created_at) or time.time()
                    status = "queued" if event.action == "queued" else "waiting"
                    self.jobs[event.job_id] = Job(event.job_id, event.repo, event.labels,
                                                  status, queued_at)  # fmt: skip
                elif job is not None and job.status == "waiting" and event.action == "queued":
                    job.status = "queued"
            elif event.action == "in_progress":
                self._running(event, job)
            elif event.action == "completed":
                self._completed(event)
        self.changed.set()

    def _running(self, event: JobEvent, job: Job | None) -> None:
        if job is not None:
            if job.status == "in_progress":
                return
            job.status, job.runner_name = "in_progress", event.runner_name
        runner = self.by_name(event.runner_name)
        if runner is None or runner.job_id is not None:
            return
        runner.state, runner.job_id = "busy", event.job_id
        queued = (job.queued_at if job else None) or _epoch(event.created_at)
        started = _epoch(event.started_at) or time.time()
        if queued is not None:
            metrics.QUEUED_TO_RUNNING.labels(INTEGRATION).observe(max(0.0, started - queued))

    def _completed(self, event: JobEvent) -> None:
        job = self.jobs.pop(event.job_id, None)
        name = event.runner_name or (job.runner_name if job else None)
        runner = self.by_name(name)
        if runner is not None and runner.job_id == event.job_id:
            runner.state = "done"
        if name is not None and name in self._ours and self._ours[name] is None:  # once per job
            self._ours[name] = event.job_id
            self.served += 1
            metrics.JOBS.labels(INTEGRATION, result_of(event.conclusion)).inc()

    def queued(self) -> dict[Labels, list[Job]]:
        """The queued jobs we serve, by their exact label set, oldest first."""
        with self.lock:
            found: dict[Labels, list[Job]] = {}
            for job in sorted(self.jobs.values(), key=lambda j: j.queued_at):
                if job.status == "queued":
                    found.setdefault(job.labels, []).append(job)
            return found

    def from_rest(self, listed: list[dict[str, Any]], since: float) -> int:
        """The reconcile's view of the queued jobs: those the webhooks missed are added;
        those no longer queued are forgotten unless a webhook told of them after `since`
        (the listing started then and could not have seen them). Returns jobs added."""
        added = 0
        with self.lock:
            ids = set()
            for data in listed:
                labels = frozenset(str(v).lower() for v in data.get("labels") or [])
                if self.settings.kind_for(labels) is None:
                    continue
                ids.add(int(data["id"]))
                if int(data["id"]) not in self.jobs:
                    queued_at = _epoch(data.get("created_at")) or time.time()
                    self.jobs[int(data["id"])] = Job(int(data["id"]), data["_repo"], labels,
                                                     "queued", queued_at)  # fmt: skip
                    added += 1
            for job in list(self.jobs.values()):
                gone = job.status in ("queued", "waiting") and job.id not in ids
                if gone and job.seen_at < since:
                    del self.jobs[job.id]
        if added:
            self.changed.set()
        return added

    def forget(self, job_id: int) -> None:
        with self.lock:
            self.jobs.pop(job_id, None)

    # -------------------------------------------------------------- demand

    def waiting(self, labels: Labels, but: int) -> int:
        """Runners of `labels` other than `but` that could still take a job."""
        with self.lock:
            return sum(1 for key, r in self.runners.items() if key != but
                       and r.labels == labels and r.state in ("starting", "idle"))  # fmt: skip

    def demand(self) -> dict[Labels, int]:
        """Runners to start, per exact label set: queued jobs minus the runners of that
        set that could still take one (starting or idle), within max-runners."""
        with self.lock:
            waiting = Counter(r.labels for r in self.runners.values()
                              if r.state in ("starting", "idle"))  # fmt: skip
            room = self.settings.max_runners - len(self.runners)
            wanted: dict[Labels, int] = {}
            for labels, jobs in self.queued().items():
                count = min(max(0, len(jobs) - waiting[labels]), room)
                if count > 0:
                    wanted[labels] = count
                    room -= count
            return wanted

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "runners": [r.as_dict() for r in self.runners.values()],
                "queued_jobs": {",".join(sorted(k)): len(v) for k, v in self.queued().items()},
                "jobs_served": self.served,
                "orphans_removed": self.orphans_removed,
            }
