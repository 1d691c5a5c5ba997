"""A client process of the fleet chaos run (tests/chaos/fleet.py): `--concurrency`
asyncio tasks, each keeping one node request in flight against the `serve
--api-only` servers: POST /requests, then long-poll GET /requests/{id} until it is
fulfilled or failed at its deadline (the calls freshpool.api.client.ApiClient
makes, on httpx.AsyncClient so hundreds wait at once in one process). A node got
is released, held, deleted or walked away from; then the next request.

A server that dies under a task (kill -9) costs it nothing it was told: the
request lives in the shared database, so the task asks the other server about the
same request id and waits on there. A POST whose answer never came is noted as
unanswered (it may or may not be stored; the run checks it ended either way).

What each task saw goes to `--out`, one JSON line per fact, each written whole by
one write(2): a client killed -9 loses only what it had not yet been told.

    python -m tests.chaos.fleetclient --root DIR --token T --concurrency 250 --out F
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx

from freshpool.api.client import POLL_SLICE

# How long past its deadline a task waits for a launcher to fail its request before
# cancelling it itself: a fleet that stops expiring requests shows as cancellations.
GRACE = 30.0
# A server whose connection failed is not picked for this long (its api.url file
# stays behind after a kill -9 until the harness restarts it on a new port).
SHUN = 5.0


class Servers:
    """The API servers' URLs (each writes api.url into its state directory once it
    listens) and one connection pool for each."""

    def __init__(self, root: Path, names: list[str], token: str) -> None:
        self.files = [root / name / "api.url" for name in names]
        self.headers = {"Authorization": f"Bearer {token}"}
        self.pools: dict[str, httpx.AsyncClient] = {}
        self.shunned: dict[str, float] = {}

    def live(self) -> list[str]:
        urls = []
        for path in self.files:
            try:
                urls.append(path.read_text().strip())
            except FileNotFoundError:
                continue
        now = time.monotonic()
        return [u for u in urls if u and self.shunned.get(u, 0.0) < now]

    async def pick(self, rng: random.Random, avoid: str | None = None) -> str:
        """A server to call, another than `avoid` if there is one up."""
        while True:
            urls = self.live()
            others = [u for u in urls if u != avoid]
            if others or urls:
                return rng.choice(others or urls)
            # Both down or restarting (the harness kills one at a time): wait for one.
            await asyncio.sleep(0.1)

    def shun(self, url: str) -> None:
        self.shunned[url] = time.monotonic() + SHUN

    async def call(self, url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = httpx.AsyncClient(
                base_url=url,
                headers=self.headers,
                timeout=httpx.Timeout(POLL_SLICE + 30.0, connect=5.0),
                # Every task may be in a long-poll on this server at once.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            )
        return await pool.request(method, path, **kwargs)

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.name
        self.stop = Path(args.stop)
        self.servers = Servers(Path(args.root), args.servers.split(","), args.token)
        self.timeouts = (args.min_timeout, args.max_timeout)
        self.fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.counts = {"moved": 0, "not_sent": 0, "errors": 0, "in_flight_peak": 0}
        self.in_flight = 0
        self.errors: list[str] = []

    def note(self, **fact: Any) -> None:
        os.write(self.fd, (json.dumps({**fact, "at": round(time.time(), 3)}) + "\n").encode())

    def error(self, what: str) -> None:
        self.counts["errors"] += 1
        self.errors = [*self.errors[-49:], what[:300]]

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.task(i)) for i in range(self.args.concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            await self.servers.close()
            self.note(summary=self.counts, errors=self.errors)
            os.close(self.fd)

    async def task(self, i: int) -> None:
        rng = random.Random(self.args.seed * 100_000 + i)
        # Spread the first asks over a moment, as CI jobs arrive, not in one burst.
        await asyncio.sleep(rng.uniform(0.0, self.args.ramp))
        n = 0
        while not self.stop.exists():
            n += 1
            nodes, url = await self.one(rng, f"{self.name}.{i}.{n}")
            if nodes:
                await self.act(rng, nodes[0], url)

    async def one(self, rng: random.Random, tag: str) -> tuple[list[int], str]:
        """One request from POST to its end; the nodes it got and the server last asked."""
        timeout = rng.uniform(*self.timeouts)
        body = {"labels": ["debian"], "requestor": tag, "timeout": timeout}
        url = await self.servers.pick(rng)
        self.in_flight += 1
        self.counts["in_flight_peak"] = max(self.counts["in_flight_peak"], self.in_flight)
        try:
            try:
                # No wait on the POST (ApiClient long-polls on it): the id comes back
                # at once, so a server dying during the long-poll costs nothing.
                answer = await self.servers.call(url, "POST", "/requests", json=body)
            except httpx.ConnectError:
                # Never sent (the server is down, its api.url not yet replaced).
                self.servers.shun(url)
                self.counts["not_sent"] += 1
                return [], url
            except httpx.TransportError as exc:
                self.servers.shun(url)
                self.note(unanswered=tag, error=repr(exc)[:200])
                return [], url
            if answer.status_code != 201:
                self.note(refused=tag, status=answer.status_code, detail=answer.text[:300])
                # A 503 asks to wait a second (Retry-After) before the next try.
                await asyncio.sleep(1.0)
                return [], url
            request = answer.json()
            self.note(accepted=request["id"], tag=tag, via=url)
            request, url = await self.follow(rng, request, url, timeout)
        finally:
            self.in_flight -= 1
        state = request["state"]
        nodes = [n["id"] for n in request.get("nodes", [])] if state == "fulfilled" else []
        self.note(ended=request["id"], state=state, nodes=nodes, via=url)
        return nodes, url

    async def follow(
        self, rng: random.Random, request: dict[str, Any], url: str, timeout: float
    ) -> tuple[dict[str, Any], str]:
        """Long-poll `request` until it is no longer pending, on another server when
        this one dies; the request as last seen and the server that said so."""
        give_up = time.monotonic() + timeout + GRACE
        path = f"/requests/{request['id']}"
        cancelled = False
        while request["state"] == "pending":
            left = give_up - time.monotonic()
            # Once only: a refusal (409) means the request ended meanwhile, which the
            # next look shows.
            method = "DELETE" if left <= 0 and not cancelled else "GET"
            params = {} if method == "DELETE" else {"wait": min(max(left, 1.0), POLL_SLICE)}
            try:
                answer = await self.servers.call(url, method, path, params=params)
            except httpx.TransportError as exc:
                self.servers.shun(url)
                self.counts["moved"] += 1
                self.error(f"{method} {path} on {url}: {exc!r}")
                url = await self.servers.pick(rng, avoid=url)
                continue
            cancelled = cancelled or method == "DELETE"
            if answer.status_code != 200:
                self.error(
                    f"{method} {path} on {url}: HTTP {answer.status_code} {answer.text[:200]}"
                )
                await asyncio.sleep(0.5)
                continue
            request = answer.json()
        return request, url

    async def act(self, rng: random.Random, node: int, url: str) -> None:
        """Release, hold or delete the node (on the other server if this one died), or
        walk away from it: its job timeout reclaims it."""
        roll = rng.random()
        if roll >= 0.9:
            return
        if roll < 0.7:
            method, path, body = "POST", f"/nodes/{node}/release", None
        elif roll < 0.8:
            method, path, body = "POST", f"/nodes/{node}/hold", {}
        else:
            method, path, body = "DELETE", f"/nodes/{node}", None
        for _ in range(2):
            try:
                answer = await self.servers.call(url, method, path, json=body)
            except httpx.TransportError:
                self.servers.shun(url)
                url = await self.servers.pick(rng, avoid=url)
                continue
            if answer.is_error:
                # A job slower than its job timeout finds its node reclaimed: a 409.
                self.error(f"{method} {path}: HTTP {answer.status_code} {answer.text[:200]}")
            return


def read(paths: list[Path]) -> dict[str, Any]:
    """What every client run noted, merged: accepted request -> (tag, server),
    ended request -> (state, nodes, server), unanswered and refused tags, summaries."""
    seen: dict[str, Any] = {"accepted": {}, "ended": {}, "unanswered": [], "refused": []}
    seen["summaries"] = []
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                fact = json.loads(line)
            except ValueError:
                continue  # cut short by a kill -9 mid-write
            if "accepted" in fact:
                seen["accepted"][fact["accepted"]] = (fact["tag"], fact["via"])
            elif "ended" in fact:
                seen["ended"][fact["ended"]] = (fact["state"], fact["nodes"], fact["via"])
            elif "unanswered" in fact:
                seen["unanswered"].append(fact["unanswered"])
            elif "refused" in fact:
                seen["refused"].append((fact["refused"], fact["status"], fact["detail"]))
            elif "summary" in fact:
                seen["summaries"].append(fact)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.fleetclient")
    for flag in ("--root", "--servers", "--token", "--stop", "--out", "--name"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--concurrency", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--min-timeout", type=float, default=5.0)
    parser.add_argument("--max-timeout", type=float, default=15.0)
    asyncio.run(Client(parser.parse_args()).run())


if __name__ == "__main__":
    main()
