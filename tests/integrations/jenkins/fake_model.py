"""What the fake Jenkins keeps: agents, queued builds and builds (fake_jenkins.py
says what is emulated)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

VERSION = "2.479.2"
# Without a poll for this long an agent is counted disconnected.
CHANNEL_TIMEOUT = 5.0
LONG_POLL = 2.0


@dataclass
class FakeBuild:
    job: str
    number: int
    script: str
    queue_id: int
    built_on: str
    timestamp: int = field(default_factory=lambda: int(time.time() * 1000))
    result: str | None = None
    abort: bool = False
    output: str = ""
    # The agent as Jenkins had it when the build ended: (its labels, temporarily offline).
    agent_at_end: tuple[str, bool] | None = None

    @property
    def path(self) -> str:
        return f"job/{self.job}/{self.number}/"


@dataclass
class QueueItem:
    id: int
    job: str
    label: str
    script: str
    since: int = field(default_factory=lambda: int(time.time() * 1000))


@dataclass
class FakeAgent:
    name: str
    label: str
    mode: str
    remote_fs: str
    description: str
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    temporarily_offline: bool = False
    offline_message: str = ""
    last_poll: float = 0.0
    build: FakeBuild | None = None
    builds: list[FakeBuild] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return time.time() - self.last_poll < CHANNEL_TIMEOUT

    def takes(self, label: str) -> bool:
        return (self.connected and not self.temporarily_offline and self.build is None
                and label in self.label.split())  # fmt: skip
