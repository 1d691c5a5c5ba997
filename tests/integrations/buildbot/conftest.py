"""One real pool with a buildbot label for this directory's tests (its worker image is
built once by the pool's own image pipeline), and real Buildbot masters on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IMAGE_CACHE
from tests.integrations.buildbot.harness import Master, ServedPool, wait_for, worker_wheels

READY = 3


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, image_build_dir: Path) -> Iterator[ServedPool]:
    served = ServedPool.start(
        tmp_path_factory.mktemp("buildbot-pool"), image_build_dir, worker_wheels(IMAGE_CACHE),
        min_ready=READY, max_nodes=READY + 3,
    )  # fmt: skip
    try:
        # The first ready node waits for the worker image: build, validate, serve.
        wait_for(lambda: served.ready() >= READY, 600, f"{READY} ready buildbot nodes")
        yield served
    finally:
        served.stop()


@pytest.fixture
def master(pool: ServedPool, tmp_path: Path) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []

    def start(workers: int = READY, **options: Any) -> Master:
        started.append(Master(tmp_path / f"master{len(started)}", pool, workers, **options))
        return started[-1]

    yield start
    for m in started:
        m.stop()
