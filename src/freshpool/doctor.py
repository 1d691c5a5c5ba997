"""`freshpool doctor`: what this host and config need to run, checked, each problem
with what to do about it. Nothing is changed: the database is read, not upgraded,
and no node is made."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from freshpool.config import Config

# Less free space than this under the state dir: image builds and node overlays fail.
LOW_DISK_GIB = 5.0
# More clock skew than this against the database: leases and timeouts misjudge.
MAX_SKEW_S = 2.0


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    detail: str
    # A warning does not fail the run (it may be fine here); a problem does.
    warning: bool = False


def check(config: Config) -> Iterator[Finding]:
    """Every check, in the order a person would fix them."""
    yield from _host(config)
    yield from _providers(config)
    yield from _database(config)


def _host(config: Config) -> Iterator[Finding]:
    if any(p.driver in ("local", "qemu") for p in config.providers):
        root = os.geteuid() == 0
        yield Finding(root, "root", "running as root" if root else "local and qemu nodes "
                      "need root (namespaces, mounts): run as root")  # fmt: skip
    state = _existing_parent(config.state_dir)
    writable = os.access(state, os.W_OK)
    fix = f"{state} is not writable: create {config.state_dir} or set state-dir"
    yield Finding(writable, "state dir", f"{config.state_dir} is writable" if writable else fix)
    free = shutil.disk_usage(state).free / 2**30
    low = "" if free >= LOW_DISK_GIB else f"; image builds need >= {LOW_DISK_GIB:.0f} GiB"
    yield Finding(free >= LOW_DISK_GIB, "disk", f"{free:.1f} GiB free under {state}{low}",
                  warning=True)  # fmt: skip
    yield from node_limits(config)


def node_limits(config: Config) -> Iterator[Finding]:
    """How this host would enforce each local provider's node limits, or why it cannot."""
    from freshpool.drivers.base import DriverUnavailable
    from freshpool.drivers.host import cgroups
    from freshpool.drivers.local.limits import NodeLimiter

    for provider in (p for p in config.providers if p.driver == "local"):
        limiter = NodeLimiter(cgroups.detect(provider.name))
        what = f"node limits ({provider.name})"
        yield Finding(limiter.hierarchy is not None, what, f"by {limiter.describe()}",
                      warning=True)  # fmt: skip
        for label in config.labels:
            if provider.serves(label.name):
                try:
                    limiter.check(label.limits.over(provider.limits), f"label {label.name}")
                except DriverUnavailable as exc:
                    yield Finding(False, what, str(exc), warning=True)


def _providers(config: Config) -> Iterator[Finding]:
    from freshpool.drivers.base import DriverError, driver_class, load_driver

    for provider in config.providers:
        what = f"provider {provider.name} ({provider.driver})"
        try:
            remote = driver_class(provider).remote
            load_driver(provider, "doctor", config.state_dir).check()
        except DriverError as exc:
            yield Finding(False, what, str(exc))
            continue
        yield Finding(True, what, "the cloud answers; its images, sizes and networks exist"
                      if remote else "can run nodes here")  # fmt: skip


def _database(config: Config) -> Iterator[Finding]:
    from sqlalchemy import create_engine, text

    from freshpool.store import db
    from freshpool.store.migrations import HEAD

    url = db.url_for(config.state_dir, config.database_url)
    sqlite = url == db.sqlite_url(config.state_dir)
    where = "SQLite in state-dir" if sqlite else url.split("@")[-1]
    if sqlite and not (config.state_dir / "freshpool.db").exists():
        yield Finding(True, "database", f"{where}: made at the first start")
        return
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            revision = db.current_revision(conn)
            now = text("SELECT extract(epoch FROM clock_timestamp())")
            skew = _skew(engine.dialect.name, lambda: conn.execute(now).scalar())
    except Exception as exc:
        yield Finding(False, "database", f"{where}: cannot connect: {type(exc).__name__}: {exc}")
        return
    finally:
        engine.dispose()
    try:
        db.check_revision(revision)
    except db.SchemaTooNew as exc:
        yield Finding(False, "database schema", str(exc))
    else:
        state = "current" if revision == HEAD else f"at {revision}; `serve` upgrades it to {HEAD}"
        yield Finding(True, "database schema", f"{where}: {state}")
    if skew is not None:
        ok = abs(skew) <= MAX_SKEW_S
        yield Finding(ok, "clock", f"{skew:+.2f} s against the database's clock" + (
            "" if ok else "; leases between launchers misjudge: run chrony or ntpd"))  # fmt: skip


def _skew(dialect: str, now: Callable[[], object]) -> float | None:
    """This host's clock less the database server's (None: the database is a file)."""
    if dialect != "postgresql":
        return None
    before = time.time()
    theirs = float(str(now()))
    after = time.time()
    return (before + after) / 2 - theirs


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
