"""The CLI and launcher on a real PostgreSQL store (`database-url`), sim nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from freshpool import launcher as launching
from freshpool.config import load
from freshpool.core.states import BuildState
from freshpool.drivers.base import load_driver
from freshpool.store import Store
from tests.store.pg import TempPostgres
from tests.support import run_until


def test_acquire_release_list_on_postgres(tmp_path: Path, postgres: TempPostgres) -> None:
    url = postgres.new_database()
    path = tmp_path / "pg.yaml"
    path.write_text(f"""
state-dir: {tmp_path / "state"}
database-url: "{url}"
interval: 0.05
providers: [{{name: cloud, driver: sim}}]
labels: [{{name: debian, image: img, min-ready: 2, health-interval: 0}}]
images: [{{name: img}}]
""")
    config = load(path)
    store = Store.open(config.state_dir, config.database_url)
    build = store.new_build("img-1", "img", str(tmp_path))
    store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "sim")
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    launcher = launching.build(config, store, drivers, images=False, publish=False)
    run_until(launcher, lambda: len(store.nodes(["ready"])) == 2)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "freshpool", "-c", str(path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    got = cli("acquire", "debian", "--json", "--timeout", "5")
    assert got.returncode == 0, got.stderr
    node = json.loads(got.stdout)
    assert node["state"] == "in-use"
    assert cli("release", str(node["id"])).returncode == 0
    run_until(
        launcher,
        lambda: (
            node["id"] not in {n.id for n in store.nodes()} and len(store.nodes(["ready"])) == 2
        ),
    )
    listed = json.loads(cli("list", "--json").stdout)
    assert {n["state"] for n in listed} == {"ready"} and len(listed) == 2
    store.close()


def test_the_api_process_waits_for_a_database_cut_off_at_its_start(
    tmp_path: Path, postgres: TempPostgres
) -> None:
    """A launcher started while its database is unreachable (failing over, a network
    cut) keeps trying to start its API process rather than exiting: the database
    is behind a proxy refusing connections for the first seconds."""
    import threading

    from sqlalchemy import make_url

    from freshpool.api.client import ApiClient
    from freshpool.api.server import bind, url_of
    from freshpool.config import parse
    from freshpool.serve.supervisor import ApiProcess
    from tests.chaos.proxy import CutProxy

    url = postgres.new_database()
    Store(url).close()  # the schema, made while the database is reachable
    proxy = CutProxy(str(postgres.socket / ".s.PGSQL.5432"))
    proxied = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{make_url(url).database}"
    config = parse(f"""
state-dir: {tmp_path / "state"}
database-url: "{proxied}"
api: {{port: 0}}
providers: [{{name: cloud, driver: sim}}]
labels: [{{name: debian, image: img}}]
images: [{{name: img}}]
""")
    proxy.cut(block=3.0)
    listener = bind("127.0.0.1", 0)
    process = ApiProcess(config, listener, wake=lambda: None)
    started = threading.Thread(target=process.start, kwargs={"timeout": 60})
    try:
        started.start()
        started.join(90)
        assert not started.is_alive() and proxy.refused > 0
        assert process.process is not None and process.process.is_alive()
        assert ApiClient(url_of(listener), "").call("GET", "/healthz") is not None
    finally:
        process.stop()
        listener.close()
        proxy.close()
