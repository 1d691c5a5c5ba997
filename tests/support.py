"""Helpers for tests that run a real local pool (imported by conftest and tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freshpool import launcher as launching
from freshpool.config import Config
from freshpool.core.errors import StaleState
from freshpool.core.placement import first_fit
from freshpool.core.states import BuildState, RequestState, UploadState
from freshpool.drivers.base import load_driver
from freshpool.launcher import Launcher
from freshpool.store import NodeRow, Queue, Store

# ------------------------------------------------------------------ pools

_subnets = iter(range(1, 250))
# Test runs in parallel processes must not share a bridge: each process gets its own /16.
_SECOND_OCTET = 150 + os.getpid() % 60


def pool_yaml(
    state_dir: Path,
    *,
    min_ready: int = 2,
    max_nodes: int = 10,
    ready_command: str = "true",
    extra_label: str = "",
    extra: str = "",
    images: str = "  - name: debian-bookworm",
    network: str = "",
) -> str:
    """A config for a real local pool in its own state dir and its own /24.

    `extra` is more top-level YAML. The API listens on a free port unless `extra`
    has an api: section (`freshpool serve` writes the URL to <state-dir>/api.url).
    `images` replaces the entries of the images section (YAML indented by two);
    `network` adds keys to the provider's network section ("host-ports: [9989]").
    """
    n = next(_subnets)
    network_lines = "".join(f"      {line}\n" for line in network.splitlines())
    if not extra.lstrip().startswith("api:") and "\napi:" not in extra:
        extra = "api:\n  port: 0\n" + extra
    return f"""
state-dir: {state_dir}
interval: 0.2
providers:
  - name: local
    driver: local
    max-nodes: {max_nodes}
    network:
      subnet: 10.{_SECOND_OCTET}.{n}.0/24
{network_lines}labels:
  - name: debian
    image: debian-bookworm
    min-ready: {min_ready}
    ready-command: {json.dumps(ready_command)}
{extra_label}
images:
{images}
{extra}
"""


def register_test_image(store: Store, build_dir: Path) -> None:
    """Record the session's prebuilt image as the serving build of debian-bookworm."""
    manifest = json.loads((build_dir / "manifest.json").read_text())
    build = store.new_build("debian-bookworm-test", "debian-bookworm", str(build_dir))
    store.build_transition(
        build.id, BuildState.BUILDING, BuildState.READY, "prebuilt", manifest=manifest
    )
    # Its layers are used in place, as the local driver's default upload would say.
    upload = store.new_upload(build.id, "local")
    store.upload_transition(
        upload.id, UploadState.UPLOADING, UploadState.READY, "prebuilt", external_id=build.id
    )


def destroy_cluster(config: Config, store: Store) -> None:
    """Delete every instance of the cluster and its bridge, whatever the test left."""
    for provider in config.providers:
        driver = load_driver(provider, store.cluster_id, config.state_dir)
        for instance in driver.list_instances():
            driver.delete(instance.external_id).wait(timeout=30)
        teardown = getattr(driver, "teardown", None)
        if teardown is not None:
            teardown()


@dataclass
class Pool:
    config_path: Path
    config: Config
    store: Store

    def cli(
        self, *args: str, timeout: float = 120, check: bool = False, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "freshpool", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kwargs,
        )

    def launcher(self, config: Config | None = None, **options: Any) -> Launcher:
        """The launcher `serve` runs, without the image controller and metrics (the
        tests' image is registered ready; pass images=True to have them). `config`:
        the pool's config as edited before a restart (same state dir and store)."""
        config = config or self.config
        drivers = {
            p.name: load_driver(p, self.store.cluster_id, config.state_dir)
            for p in config.providers
        }
        options = {"images": False, "publish": False, **options}
        return launching.build(config, self.store, drivers, **options)

    def fill(self, launcher: Launcher, ready: int, timeout: float = 60) -> None:
        run_until(launcher, lambda: len(self.store.nodes(["ready"])) >= ready, timeout)


def run_until(launcher: Launcher, done: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            states = [(n.id, n.state, n.reason) for n in launcher.store.nodes()]
            raise AssertionError(f"not reached within {timeout} s; nodes: {states}")
        launcher.pass_once()
        time.sleep(0.01)


def start(launcher: Launcher, timeout: float = 60) -> None:
    """Run passes until the launcher has started (every controller's recovery done)
    and drives every provider it was given. On PostgreSQL it drives a provider only
    once its lease controller has taken the lease, in a pass: a test that acts on the
    providers before any pass would find it driving none."""

    def started() -> bool:
        driven = set(launcher.drivers) == set(launcher.shared.configured)
        return driven and launcher.started >= {c.name for c in launcher.controllers}

    run_until(launcher, started, timeout)


def fulfil(store: Store, request_id: int, providers: list[str]) -> list[NodeRow] | None:
    """Hand one pending request its set from the first provider that has it all ready;
    None when none has. Raises StaleState if the request is no longer pending."""

    def plan(queue: Queue) -> list[tuple[int, str]]:
        for request in queue.pending:
            if request.id == request_id:
                provider = first_fit(request.labels, providers, queue.ready)
                return [(request.id, provider)] if provider else []
        return []

    done = store.hand_out([], plan, providers)
    if request_id in done.fulfilled:
        return done.nodes_of(request_id)
    state = store.request(request_id).state
    if state != RequestState.PENDING:
        raise StaleState(f"request {request_id} is {state}, not pending")
    return None


def stop_group(process: subprocess.Popen[Any], grace: float = 60) -> None:
    """End a process started with `start_new_session` and everything it started: TERM,
    then KILL after `grace` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
