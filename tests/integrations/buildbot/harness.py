"""A real Buildbot master (SQLite, `buildbot create-master`) whose workers are freshpool
latent workers, and a real `freshpool serve` beside it: for the end-to-end tests and
for bench/buildbot.py.

Nothing of Buildbot is emulated. The node image gets buildbot-worker through the image
pipeline: its wheels are downloaded on the host (a node has no route to PyPI, and a
build node does not trust this host's TLS proxy, see docs), copied in with a `files`
entry and installed offline by a step.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import httpx

from freshpool.api import tokens
from freshpool.config import Config
from freshpool.config import load as load_config
from freshpool.store import Store
from tests.support import destroy_cluster, pool_yaml, register_test_image, stop_group

WORKER_VERSION = "4.3.0"
LABEL = "buildbot"


def worker_wheels(cache: Path) -> Path:
    """buildbot-worker and its dependencies, as wheels for Debian 12's Python 3.11."""
    target = cache / f"buildbot-worker-{WORKER_VERSION}-wheels"
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", "--python-version", "3.11", "--platform",
             "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "-d", str(target),
             f"buildbot-worker=={WORKER_VERSION}", "pip"],
            check=True, timeout=300,
        )  # fmt: skip
        (target / ".complete").touch()
    return target


def worker_image(wheels: Path) -> str:
    """The images section: the test base, and a child with buildbot-worker installed."""
    return f"""  - name: debian-bookworm
  - name: buildbot-worker
    parent: debian-bookworm
    files:
      - {{dest: /opt/freshpool-wheels, source: {wheels}}}
    steps:
      - >-
        python3 "$(echo /opt/freshpool-wheels/pip-*.whl)/pip" install --quiet --no-index
        --break-system-packages --find-links /opt/freshpool-wheels buildbot-worker
    validate: ["python3 -c 'import buildbot_worker'"]
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class ServedPool:
    """`freshpool serve` in a process of its own, with a buildbot label on the worker image."""

    config: Config
    store: Store
    process: subprocess.Popen[bytes]
    url: str
    token: str
    pb_host: str
    pb_port: int

    @classmethod
    def start(cls, root: Path, image_dir: Path, wheels: Path, min_ready: int,
              max_nodes: int) -> ServedPool:  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        pb_port = free_port()
        path = root / "freshpool.yaml"
        path.write_text(pool_yaml(
            root / "state", min_ready=0, max_nodes=max_nodes, images=worker_image(wheels),
            extra_label=f"  - {{name: {LABEL}, image: buildbot-worker, min-ready: {min_ready}}}\n",
            network=f"host-ports: [{pb_port}]",
        ))  # fmt: skip
        config = load_config(path)
        store = Store.open(config.state_dir)
        register_test_image(store, image_dir)
        token = tokens.create(store, "ci")[1]
        log = open(root / "serve.log", "ab")  # noqa: SIM115 - the server's life
        process = subprocess.Popen(
            [sys.executable, "-m", "freshpool", "--config", str(path), "serve"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        url_file = config.state_dir / "api.url"
        wait_for(url_file.exists, 60, "freshpool serve's API")
        subnet = IPv4Network(str(config.providers[0].network.subnet))
        return cls(config, store, process, url_file.read_text().strip(), token,
                   str(subnet[1]), pb_port)  # fmt: skip

    def ready(self) -> int:
        failed = [b for b in self.store.builds("buildbot-worker") if b.state == "failed"]
        if failed:
            raise AssertionError(f"the worker image failed to build: {failed[0].reason}")
        return sum(1 for n in self.store.nodes(["ready"]) if n.label == LABEL)

    def stop(self) -> None:
        stop_group(self.process)
        destroy_cluster(self.config, self.store)
        self.store.close()


MASTER_CFG = """
from buildbot.plugins import schedulers, steps, util
from freshpool.integrations.buildbot import FreshpoolLatentWorker

c = BuildmasterConfig = {{}}
c["workers"] = [
    FreshpoolLatentWorker(
        f"fp-{{i}}", url={url!r}, token={token!r}, label={label!r}, missing_timeout={timeout},
        **{worker_options!r},
    )
    for i in range({workers})
]
c["protocols"] = {{"pb": {{"port": "tcp:{pb_port}:interface={pb_host}"}}}}
factory = util.BuildFactory()
factory.addStep(steps.ShellCommand(name="started", command=["date", "+%s.%N"]))
factory.addStep(steps.ShellCommand(name="hostname", command=["hostname"]))
# The node must be fresh: no earlier build left its mark here.
factory.addStep(steps.ShellCommand(name="fresh", command=["sh", "-c", util.Interpolate(
    "test ! -e /var/tmp/freshpool-built && echo %(prop:buildnumber)s > /var/tmp/freshpool-built"
)]))
factory.addStep(steps.ShellCommand(
    name="result", command=["sh", "-c", util.Interpolate("exit %(prop:fail:-0)s")]
))
c["builders"] = [util.BuilderConfig(
    name="ci", workernames=[w.name for w in c["workers"]], factory=factory,
    collapseRequests=False,
)]
c["schedulers"] = [schedulers.ForceScheduler(
    name="force", builderNames=["ci"],
    properties=[util.StringParameter(name="fail", default="0")],
)]
c["www"] = {{"port": "tcp:{www_port}:interface=127.0.0.1", "plugins": {{}}}}
c["buildbotURL"] = "http://127.0.0.1:{www_port}/"
c["db"] = {{"db_url": "sqlite:///state.sqlite"}}
c["buildbotNetUsageData"] = None
"""

BUILDBOT = [sys.executable, "-c", "from buildbot.scripts.runner import run; run()"]


class Master:
    """A real Buildbot master in a process of its own, driven over its REST API."""

    def __init__(self, basedir: Path, pool: ServedPool, workers: int,
                 agent_timeout: float = 120, **worker_options: Any) -> None:  # fmt: skip
        self.basedir = basedir
        self.www_port = free_port()
        subprocess.run([*BUILDBOT, "create-master", "--quiet", str(basedir)], check=True,
                       timeout=120, capture_output=True)  # fmt: skip
        (basedir / "master.cfg").write_text(MASTER_CFG.format(
            url=pool.url, token=pool.token, label=LABEL, timeout=agent_timeout,
            workers=workers, pb_port=pool.pb_port, pb_host=pool.pb_host,
            www_port=self.www_port, worker_options=worker_options,
        ))  # fmt: skip
        log = open(basedir / "master.out", "ab")  # noqa: SIM115 - the master's life
        self.process = subprocess.Popen(
            [*BUILDBOT, "start", "--nodaemon", str(basedir)], stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.www_port}/api/v2", timeout=30)
        wait_for(self._up, 90, f"the Buildbot master (see {basedir}/twistd.log)")
        self.builder = self.get("builders", name="ci")[0]["builderid"]

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the master exited: {(self.basedir / 'twistd.log').read_text()}")
        try:
            return self.http.get("/builders").status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str, **filters: Any) -> list[dict[str, Any]]:
        data = self.http.get(f"/{path}", params=filters).json()
        return list(data[path.rsplit("/", 1)[-1]])

    def force(self, **properties: str) -> int:
        """Queue a build of "ci"; the build request's id."""
        body = {"jsonrpc": "2.0", "method": "force", "id": 1,
                "params": {"builderid": str(self.builder), **properties}}  # fmt: skip
        answer = self.http.post("/forceschedulers/force", json=body).json()
        assert "result" in answer, answer
        return int(next(iter(answer["result"][1].values())))

    def finished(self, requests: list[int]) -> list[dict[str, Any]]:
        """The finished build of each request, once all have finished (else [])."""
        builds = {b["buildrequestid"]: b for b in self.get("builds") if b["complete"]}
        return [builds[r] for r in requests] if all(r in builds for r in requests) else []

    def log_of(self, build: dict[str, Any], step: str) -> str:
        steps = self.get(f"builds/{build['buildid']}/steps")
        number = next(s["number"] for s in steps if s["name"] == step)
        path = f"/builds/{build['buildid']}/steps/{number}/logs/stdio/contents"
        chunks = self.http.get(path).json()["logchunks"]
        return "".join(c["content"] for c in chunks)

    def output_of(self, build: dict[str, Any], step: str) -> str:
        """What the step's command printed (stdout lines of Buildbot's log start with 'o')."""
        lines = self.log_of(build, step).splitlines()
        return "\n".join(line[1:] for line in lines if line.startswith("o"))

    def stop(self) -> None:
        self.http.close()
        stop_group(self.process)


def node_history(pool: ServedPool) -> dict[str, Any]:
    """Every node the store knows of (any state), by hostname."""
    return {n.hostname: n for n in pool.store.nodes()}


def as_json(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)
