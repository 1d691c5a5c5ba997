"""`freshpool image ...`: build, list, inspect, pause, roll back and delete image builds."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from freshpool.cli.app import (
    ConfigOpt,
    Exit,
    JsonOpt,
    err,
    friendly,
    image_app,
    opened,
    out,
    short_age,
)
from freshpool.config import Config
from freshpool.core.states import BuildState
from freshpool.drivers.base import Driver, load_driver
from freshpool.service import imaging
from freshpool.service.imagekeeper import ImageKeeper
from freshpool.store import BuildRow, Store

B = BuildState
FINISHED = (B.READY, B.FAILED, B.RETIRED, B.DELETED)
# The launcher's lock file: whoever holds it owns the state dir's drivers and builds.
LOCK_FILE = "launcher.lock"

# ---------------------------------------------------------------- build


@image_app.command("build")
@friendly
def image_build(
    name: Annotated[str, typer.Argument(help="Image name from the config.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the build until it is ready or failed.")
    ] = False,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Use no cached layer: run every step again.")
    ] = False,
    config_path: ConfigOpt = None,
) -> None:
    """Build an image: base, steps, pre-fetch, snapshot, then validate it on a fresh node.

    With `freshpool serve` running, the request goes to it (--wait follows the build);
    otherwise the build runs here, in the foreground.
    """
    if os.geteuid() != 0:
        raise Exit("building an image needs root (overlay mounts and bubblewrap)", 3)
    with opened(config_path) as (config, store):
        image = config.image(name)
        flags = store.image_row(name)
        if flags.paused:
            raise Exit(
                f"image {name} is paused ({flags.reason or 'no reason given'}):"
                f" run `freshpool image unpause {name}` first",
                1,
            )
        if image.parent and store.serving_build(image.parent) is None:
            raise Exit(
                f"image {name} builds on {image.parent}, which has no ready build:"
                f" run `freshpool image build {image.parent}` first",
                1,
            )
        with _builder_lock(config.state_dir, f"freshpool image build {name}") as (held, holder):
            if not held:
                if "image build" in holder:
                    raise Exit(f"another image build runs on {config.state_dir} ({holder})", 1)
                since = time.time()
                store.request_build(name, fresh)
                if not wait:
                    out.print(
                        f"image {name}: build requested; `freshpool serve` ({holder}) starts it"
                        f" next. Follow it with `freshpool image list {name}` and"
                        " `freshpool image log BUILD --follow`.",
                        highlight=False,
                    )
                    return
                row = _follow(store, name, since, None)
            else:
                row = _build_here(config, store, name, fresh)
    _report(row)


def _build_here(config: Config, store: Store, name: str, fresh: bool) -> BuildRow:
    """No launcher runs: build, validate and upload in this process, showing progress."""
    drivers = _drivers(config, store)
    keeper = ImageKeeper(config, store, drivers, automatic=False)
    since = time.time()
    store.request_build(name, fresh)
    stop = threading.Event()
    worker = threading.Thread(
        target=_drive, args=(keeper, store, name, stop), name="image-keeper", daemon=True
    )
    worker.start()
    try:
        return _follow(store, name, since, worker)
    except KeyboardInterrupt:
        err.print("interrupted: stopping the build")
        raise
    finally:
        stop.set()
        keeper.stop()
        worker.join(60)
        # A request that never started must not surprise the next `serve`.
        store.take_build_request(name)


def _drive(keeper: ImageKeeper, store: Store, name: str, stop: threading.Event) -> None:
    """Run keeper passes until the requested build and everything it started are done."""
    while not stop.is_set():
        keeper.tick()
        taken = store.image_row(name).build_requested_at is None
        unfinished = store.builds(name, states_in=[B.BUILDING, B.VALIDATING])
        if taken and not unfinished and not keeper.busy:
            # One more pass retires and deletes what the new build replaced.
            keeper.tick()
            return
        time.sleep(0.05)


def _follow(store: Store, name: str, since: float, worker: threading.Thread | None) -> BuildRow:
    """Stream the build's log and show its stage until it is ready or failed."""
    started = time.monotonic()
    row: BuildRow | None = None
    position = 0
    stage = "waiting for the build to start"
    with err.status(f"[bold]{name}[/]: {stage}") as status:
        while True:
            if row is None:
                row = next((b for b in store.builds(name) if b.created_at >= since), None)
            else:
                row = store.build(row.id)
            if row is not None:
                lines, position = _read_from(Path(row.log_path), position)
                for line in lines:
                    if line.startswith("==> "):
                        stage = line[4:]
                    err.print(Text(line, style="dim"))
                done = row.state in FINISHED and (worker is None or not worker.is_alive())
                if done:
                    lines, position = _read_from(Path(row.log_path), position)
                    for line in lines:
                        err.print(Text(line, style="dim"))
                    return row
            elif worker is not None and not worker.is_alive():
                raise Exit(f"image {name}: the build did not start (see the log above)", 1)
            elapsed = time.monotonic() - started
            label = f"{row.id} {row.state}" if row is not None else "requested"
            status.update(f"[bold]{name}[/] {elapsed:4.0f}s {label}: {stage[-70:]}")
            time.sleep(0.2)


def _read_from(path: Path, position: int) -> tuple[list[str], int]:
    """Whole lines written to `path` after `position`, and the new position."""
    try:
        with open(path, "rb") as handle:
            handle.seek(position)
            data = handle.read()
    except OSError:
        return [], position
    end = data.rfind(b"\n")
    if end < 0:
        return [], position
    text = data[: end + 1].decode(errors="replace")
    return text.splitlines(), position + end + 1


def _report(row: BuildRow) -> None:
    manifest = row.manifest or {}
    if row.state == B.FAILED:
        raise Exit(f"image {row.image}: build {row.id} failed: {row.reason}", 1)
    layers = manifest.get("layers", [])
    built = [layer for layer in layers if not layer.get("cached")]
    total = manifest.get("timings", {}).get("total", 0.0)
    out.print(
        f"image {row.image}: build {row.id} {row.state}: {len(row.layer_paths())} layers,"
        f" {_mb(manifest.get('size_bytes'))}; {_count(len(built), 'layer')} built"
        f" ({_mb(manifest.get('new_bytes')) or '0 MB'} new), {len(layers) - len(built)} cached;"
        f" built in {total:.1f} s; {row.reason}",
        highlight=False,
    )


def _drivers(config: Config, store: Store) -> dict[str, Driver]:
    drivers = {}
    for provider in config.providers:
        driver = load_driver(provider, store.cluster_id, config.state_dir)
        driver.check()
        drivers[provider.name] = driver
    return drivers


@contextlib.contextmanager
def _builder_lock(state_dir: Path, what: str) -> Iterator[tuple[bool, str]]:
    """(True, "") while this process holds the launcher lock; else (False, its holder)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - closed below
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            yield False, handle.read().strip() or "another process"
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({what})")
        handle.flush()
        try:
            yield True, ""
        finally:
            handle.seek(0)
            handle.truncate()


# ---------------------------------------------------------------- list and log


@image_app.command("list")
@friendly
def image_list(
    name: Annotated[str | None, typer.Argument(help="Only this image's builds.")] = None,
    as_json: JsonOpt = False,
    config_path: ConfigOpt = None,
) -> None:
    """Every image build: state, age, layers, size, nodes using it, uploads, last reason."""
    with opened(config_path) as (config, store):
        if name is not None:
            config.image(name)
        builds = [b for b in store.builds(name) if as_json or b.state != B.DELETED]
        using = store.nodes_per_build()
        uploads: dict[str, list[str]] = {}
        for upload in store.uploads():
            uploads.setdefault(upload.build_id, []).append(f"{upload.provider}:{upload.state}")
        serving = {
            image: row.id
            for image in {b.image for b in builds}
            if (row := store.serving_build(image)) is not None
        }
        paused = {b.image for b in builds if store.image_row(b.image).paused}
    if as_json:
        out.print_json(json.dumps([_build_json(b, using, uploads, serving) for b in builds]))
        return
    table = Table(box=None, header_style="bold")
    for column in ("BUILD", "STATE", "AGE", "LAYERS", "SIZE", "NEW", "NODES", "UPLOADS"):
        table.add_column(column, no_wrap=True)
    table.add_column("REASON", overflow="fold")
    now = time.time()
    for b in builds:
        manifest = b.manifest or {}
        mark = "*" if serving.get(b.image) == b.id else ""
        table.add_row(
            b.id,
            f"{b.state}{mark}",
            short_age(now - b.created_at),
            str(len(b.layers)) if b.layers else ("1" if manifest else ""),
            _mb(manifest.get("size_bytes")),
            _mb(manifest.get("new_bytes")),
            str(using.get(b.id, 0)),
            " ".join(uploads.get(b.id, [])),
            (b.reason.splitlines() or [""])[0][:70],
        )
    # Ids stay whole when the output is not a wide terminal (a pipe, a log).
    out.print(table, width=max(out.width, 160))
    out.print("* serving: new nodes launch from it", style="dim", highlight=False)
    for image in sorted(paused):
        out.print(f"image {image} is paused: no new builds", highlight=False)


def _build_json(
    b: BuildRow, using: dict[str, int], uploads: dict[str, list[str]], serving: dict[str, str]
) -> dict[str, Any]:
    manifest = b.manifest or {}
    return {
        "id": b.id,
        "image": b.image,
        "state": b.state,
        "serving": serving.get(b.image) == b.id,
        "path": b.path,
        "reason": b.reason,
        "created_at": b.created_at,
        "state_at": b.state_at,
        "digest": b.digest,
        "parent_build": b.parent_build,
        "layers": [str(p) for p in b.layer_paths()],
        "definition_key": b.definition_key,
        "log": b.log_path,
        "nodes": using.get(b.id, 0),
        "uploads": uploads.get(b.id, []),
        "size_bytes": manifest.get("size_bytes"),
        "new_bytes": manifest.get("new_bytes"),
        "manifest": manifest,
    }


@image_app.command("log")
@friendly
def image_log(
    build_id: Annotated[str, typer.Argument(metavar="BUILD", help="A build id (image list).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the build finishes.")
    ] = False,
    config_path: ConfigOpt = None,
) -> None:
    """A build's log: every step's output, the layers made, the validation."""
    with opened(config_path) as (_config, store):
        row = store.build(build_id)
        path = Path(row.log_path or Path(row.path) / "build.log")
        if not path.exists():
            raise Exit(f"build {build_id} has no log at {path} (deleted with the build?)", 1)
        position = 0
        while True:
            lines, position = _read_from(path, position)
            for line in lines:
                out.print(Text(line))
            if not follow or store.build(build_id).state in FINISHED:
                break
            time.sleep(0.2)
        lines, position = _read_from(path, position)
        for line in lines:
            out.print(Text(line))


# ---------------------------------------------------------------- operator verbs


@image_app.command("delete")
@friendly
def image_delete(
    build_id: Annotated[str, typer.Argument(metavar="BUILD")], config_path: ConfigOpt = None
) -> None:
    """Delete a build: out of service now, removed from disk once no node uses it."""
    with opened(config_path) as (config, store):
        try:
            row = imaging.delete(store, config, build_id)
        except imaging.ImagingError as exc:
            raise Exit(str(exc), 1) from None
        if row.state == B.DELETED:
            out.print(f"build {build_id} deleted", highlight=False)
            return
        users = store.nodes_per_build().get(build_id, 0)
        with _builder_lock(config.state_dir, "freshpool image delete") as (held, holder):
            if held:
                keeper = ImageKeeper(config, store, _drivers(config, store), automatic=False)
                deadline = time.monotonic() + 60
                while True:
                    keeper.tick()
                    row = store.build(build_id)
                    if row.state == B.DELETED or users or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
        if row.state == B.DELETED:
            out.print(f"build {build_id} deleted", highlight=False)
        elif held:
            out.print(
                f"build {build_id} retired; {users} node(s) still use it: it is deleted"
                " once they are gone",
                highlight=False,
            )
        else:
            out.print(
                f"build {build_id} retired; `freshpool serve` ({holder}) deletes it"
                f" once no node uses it ({users} now)",
                highlight=False,
            )


@image_app.command("pause")
@friendly
def image_pause(
    name: Annotated[str, typer.Argument(help="Image name from the config.")],
    reason: Annotated[str, typer.Option(help="Why, shown in `image list`.")] = "",
    config_path: ConfigOpt = None,
) -> None:
    """Stop new builds of an image (its ready builds keep serving)."""
    with opened(config_path) as (config, store):
        imaging.pause(store, config, name, reason)
    out.print(f"image {name} paused: no new builds until `freshpool image unpause {name}`")


@image_app.command("unpause")
@friendly
def image_unpause(
    name: Annotated[str, typer.Argument(help="Image name from the config.")],
    config_path: ConfigOpt = None,
) -> None:
    """Allow builds of an image again."""
    with opened(config_path) as (config, store):
        imaging.unpause(store, config, name)
    out.print(f"image {name} unpaused")


@image_app.command("rollback")
@friendly
def image_rollback(
    name: Annotated[str, typer.Argument(help="Image name from the config.")],
    config_path: ConfigOpt = None,
) -> None:
    """Retire the newest ready build and serve the one before it.

    Nodes already running keep their build; new nodes launch from the earlier one.
    """
    with opened(config_path) as (config, store):
        try:
            retired, serving = imaging.rollback(store, config, name)
        except imaging.ImagingError as exc:
            raise Exit(str(exc), 1) from None
    out.print(
        f"image {name}: {retired.id} retired; new nodes launch from {serving.id}",
        highlight=False,
    )


def _mb(value: Any) -> str:
    if not value:
        return ""
    return f"{value / 1e6:.1f} MB" if value < 1e8 else f"{value / 1e6:.0f} MB"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
