"""What the tests of a long-running integration process (`freshpool github serve`,
`freshpool jenkins serve`) share: a pool whose nodes may reach one host port, where
the test's fake CI server listens, and the integration process itself."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import httpx

from tests.api.conftest import Served, wait_for
from tests.integrations.buildbot.harness import free_port
from tests.support import stop_group


@dataclass(kw_only=True)
class Running:
    served: Served
    config: Path
    status_url: str
    process: subprocess.Popen[bytes] | None = None

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(self.status_url, timeout=10).json())

    def nodes_in_use(self) -> list[int]:
        return [n.id for n in self.served.pool.store.nodes(["in-use", "reserved"])]

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


def pool_for(serve_pool: Callable[..., Served], client: str) -> tuple[Served, str, int]:
    """A pool of 2 ready nodes (at most 4) with an API client named `client`, and the
    address and port on the host its nodes may reach (the bridge's gateway)."""
    port = free_port()
    served = serve_pool(min_ready=2, max_nodes=4, network=f"host-ports: [{port}]")
    served.client(client)
    gateway = str(IPv4Network(str(served.pool.config.providers[0].network.subnet))[1])
    served.wait_ready(2)  # the bridge, and its address, exist now
    return served, gateway, port


def prepare(serve_pool: Callable[..., Served], tmp_path: Path, ci: str,
            serve_fake: Callable[[str, int], object],
            settings: Callable[[Served, str, int], dict[str, Any]]) -> Running:  # fmt: skip
    """The pool, the fake CI server started by `serve_fake(host, port)` where nodes
    reach it, and the integration's settings file from `settings(served, token,
    status_port)`, with the status port free."""
    served, gateway, port = pool_for(serve_pool, ci)
    serve_fake(gateway, port)
    status_port = free_port()
    config = tmp_path / f"{ci}.yaml"
    body = settings(served, served.secrets[ci], status_port)
    config.write_text(json.dumps(body, indent=2))  # JSON is YAML
    return Running(served=served, config=config,
                   status_url=f"http://127.0.0.1:{status_port}/status")  # fmt: skip


def launch(it: Running, ci: str, env: dict[str, str], tmp_path: Path) -> None:
    """`freshpool CI serve -c CONFIG`, up once its /status answers."""
    log_file = tmp_path / f"{ci}-serve.log"
    log = open(log_file, "ab")  # noqa: SIM115 - the process's life
    it.process = subprocess.Popen(
        [sys.executable, "-m", "freshpool", ci, "serve", "-c", str(it.config),
         "--log-dir", str(tmp_path / f"{ci}-agents")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()

    def up() -> bool:
        assert it.process is not None and it.process.poll() is None, log_file.read_text()
        try:
            return httpx.get(it.status_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, f"freshpool {ci} serve")


def run_cli(ci: str, env: dict[str, str], *args: str,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([sys.executable, "-m", "freshpool", ci, *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
