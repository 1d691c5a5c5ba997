"""`python -m bench.http_handoff`: warm-pool hand-out over HTTP, POST /requests to fulfilled.

The server is `freshpool serve`'s own stack (launcher loop, scheduler, API under
uvicorn) in a separate process; the clients are in this one (bench/keepalive.py, one
keep-alive connection each), 1, 10 and 50 at a time, each sending
`POST /requests?wait=…` and timing until the fulfilled answer.

Two pools:
  store   thousands of ready nodes made through the store API with no instance
          behind them (launching that many real nodes here is impractical); every
          hand-out is still the real transaction on the real SQLite store
  local   20 real local nodes (namespaces, sshd), kept warm by the launcher; one
          client starting a job every 0.2 s and releasing its node, as CI would
          (faster, and the figure would be how fast nodes boot, not hand-out)

Targets (issue 4): p99 < 50 ms and >= 500 requests/s on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.__main__ import report
from bench.common import BENCH_IMAGE, IMAGE_CACHE, WARM_ROUNDS, ClosedLoop, host_now
from bench.keepalive import Connection, request_bytes

CONCURRENCY = (1, 10, 50)


# ------------------------------------------------------------------ server


def serve(state_dir: Path, nodes: int, driver: str) -> None:
    """The server process: fill the pool, serve until SIGTERM."""
    from freshpool import launcher as launching
    from freshpool import logs
    from freshpool import serve as serving
    from freshpool.api import tokens
    from freshpool.config import parse
    from freshpool.core.states import BuildState, NodeState
    from freshpool.drivers.base import load_driver
    from freshpool.store import Store

    min_ready = nodes if driver == "local" else 0
    subnet = "network: {subnet: 10.216.40.0/24}" if driver == "local" else ""
    config = parse(f"""
state-dir: {state_dir}
log-level: warning
providers:
  - name: local
    max-nodes: {max(nodes, 1) * 2}
    max-parallel-launches: {max(nodes, 1)}
    {subnet}
labels:
  - {{name: debian, image: debian-bookworm, min-ready: {min_ready}}}
images: [{{name: debian-bookworm}}]
api: {{port: 0}}
""")
    logs.setup("warning")
    store = Store.open(state_dir)
    drivers = {}
    if driver == "local":
        from freshpool.images.debootstrap import build_cached

        build_dir = build_cached(BENCH_IMAGE, IMAGE_CACHE)
        row = store.new_build("bench", "debian-bookworm", str(build_dir))
        store.build_transition(
            row.id,
            BuildState.BUILDING,
            BuildState.READY,
            "bench",
            manifest=json.loads((build_dir / "manifest.json").read_text()),
        )
        drivers = {p.name: load_driver(p, store.cluster_id, state_dir) for p in config.providers}
    else:
        for _ in range(nodes):
            node = store.new_node("debian", "local", "bench", "debian")
            store.transition(node.id, NodeState.BUILDING, NodeState.TESTING, "bench")
            store.transition(node.id, NodeState.TESTING, NodeState.READY, "bench")
    launcher = launching.build(config, store, drivers, images=False)
    running = serving.start(config, launcher)
    secret = tokens.create(store, "bench")[1]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    thread = threading.Thread(target=launcher.run, args=(stop,), daemon=True)
    thread.start()
    if driver == "local":
        while len(store.nodes(["ready"])) < nodes and not stop.is_set():
            time.sleep(0.05)
    # Written whole, then renamed: the client polls for this file and must not read
    # half of it.
    part = state_dir / "bench.json.part"
    part.write_text(json.dumps({"url": running.url, "token": secret}))
    part.rename(state_dir / "bench.json")
    stop.wait()
    thread.join(timeout=120)
    running.stop()
    if driver == "local":
        for d in drivers.values():
            for instance in d.list_instances():
                d.delete(instance.external_id).wait(timeout=60)
            teardown = getattr(d, "teardown", None)
            if teardown:
                teardown()
    store.close()


class Server:
    def __init__(self, root: Path, nodes: int, driver: str) -> None:
        self.state_dir = root / f"http-{driver}"
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.http_handoff", "--serve", str(self.state_dir)),
                *("--nodes", str(nodes), "--driver", driver),
            ],
            cwd=Path(__file__).parent.parent,
        )
        info = self.state_dir / "bench.json"
        deadline = time.monotonic() + 600
        while not info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bench server did not start")
            time.sleep(0.05)
        data = json.loads(info.read_text())
        self.url, self.token = data["url"], data["token"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=300)


# ------------------------------------------------------------------ clients


async def hand_outs(
    url: str | Sequence[str],
    token: str,
    clients: int,
    total: int,
    release: bool = False,
    every: float = 0.0,
    warm: int = 0,
    ask_for: dict[str, object] | None = None,
) -> dict[str, float]:
    """`total` hand-outs by `clients` concurrent clients, after `warm` untimed ones;
    latency of each POST -> fulfilled. With several URLs (API servers), the clients
    are spread over them.

    `every` paces each client: a request starts at most that often (seconds).
    """
    loop = ClosedLoop(total, warm)
    auth = {"Authorization": f"Bearer {token}"}
    ask = request_bytes("POST", "/requests?wait=30", auth, ask_for or {"labels": ["debian"]})

    urls = [url] if isinstance(url, str) else list(url)

    async def one_client(i: int) -> None:
        http = await Connection.open(urls[i % len(urls)])
        try:
            while (timed := loop.turn()) is not None:
                started = time.perf_counter()
                status, body = await http.call(ask)
                if timed:
                    loop.timed(started, time.perf_counter())
                if status != 201 or body["state"] != "fulfilled":
                    raise RuntimeError(f"not fulfilled: {status} {body}")
                if release:
                    node = body["nodes"][0]["id"]
                    await http.call(request_bytes("POST", f"/nodes/{node}/release", auth))
                if every:
                    await asyncio.sleep(max(0.0, every - (time.perf_counter() - started)))
        finally:
            http.close()

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    got = loop.figures()
    got["rps"] = got.pop("per_s")
    return got


# Any valid public key: the job's key the "keys" scenario installs on each node.
BENCH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIXvqDvadsx2yMWY0yG/vacNDvvRsvtv6EO4IlBi/syN bench"


def run(quick: bool, with_local: bool) -> dict[str, float]:
    per = {1: 200, 10: 1000, 50: 2000} if not quick else {1: 100, 10: 300, 50: 500}
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="freshpool-http-bench-") as tmp:
        root = Path(tmp)
        server = Server(root, sum(per.values()) + WARM_ROUNDS * sum(CONCURRENCY), "store")
        try:
            for clients in CONCURRENCY:
                got = asyncio.run(
                    hand_outs(
                        server.url, server.token, clients, per[clients], warm=WARM_ROUNDS * clients
                    )
                )
                cpu, wakeup = host_now()
                print(
                    f"store pool, {clients:>2} clients: {got};"
                    f" host reference {cpu} ms, wake-up {wakeup} us",
                    flush=True,
                )
                for name, value in got.items():
                    figures[f"http_store_c{clients}_{name}"] = value
        finally:
            server.stop()
        if with_local:
            # 20 warm nodes and one job every 0.2 s: the launcher refills faster than the
            # jobs take, so this times hand-outs from a warm pool, not boots.
            server = Server(root, 20, "local")
            try:
                got = asyncio.run(
                    hand_outs(
                        server.url, server.token, 1, 20 if quick else 60, release=True, every=0.2
                    )
                )
                print(f"local nodes,  1 client, one job per 0.2 s: {got}", flush=True)
                for name, value in got.items():
                    figures[f"http_local_c1_{name}"] = value
                # Hand-outs that change the network policy (a two-node set's peers are
                # let through) and that install the job's SSH key on the node.
                for name, ask_for, every in (
                    ("set2", {"labels": ["debian", "debian"]}, 0.4),
                    ("keys", {"labels": ["debian"], "ssh_keys": [BENCH_KEY]}, 0.2),
                ):
                    got = asyncio.run(
                        hand_outs(server.url, server.token, 1, 20 if quick else 60,
                                  release=True, every=every, ask_for=ask_for)
                    )  # fmt: skip
                    print(f"local nodes,  1 client, {name}: {got}", flush=True)
                    for figure, value in got.items():
                        figures[f"http_local_{name}_c1_{figure}"] = value
            finally:
                server.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_handoff",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests per scenario")
    parser.add_argument("--no-local", action="store_true", help="skip the real-node scenario")
    parser.add_argument("--no-save", action="store_true", help="do not write results")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--driver", default="store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.nodes, args.driver)
        return
    with_local = not args.no_local
    if with_local and os.geteuid() != 0:
        sys.exit("the real-node scenario needs root (or pass --no-local)")
    print(
        "store pool: ready nodes are store rows without instances (hundreds of real nodes"
        " are impractical here); each hand-out is the real HTTP call, scheduler pass and"
        " store transaction.",
        flush=True,
    )
    figures = run(args.quick, with_local)
    report(figures, save=not args.no_save)


if __name__ == "__main__":
    main()
