"""`freshpool image ...`: build, list, inspect, pause, roll back and delete image builds."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from freshpool import launcherlock
from freshpool.cli.app import (
    ConfigOpt,
    Exit,
    JsonOpt,
    checked_drivers,
    err,
    friendly,
    image_app,
    opened,
    out,
    short_age,
)
from freshpool.core.states import BuildState

if TYPE_CHECKING:
    from freshpool.config import Config
    from freshpool.launcher.images import ImageController
    from freshpool.store import BuildRow, Store

B = BuildState
FINISHED = (B.READY, B.FAILED, B.RETIRED, B.DELETED)

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
        with launcherlock.trying(config.state_dir, f"freshpool image build {name}") as holder:
            if holder is not None:
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
    keeper = _keeper(config, store)
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
        keeper.stop(time.monotonic() + 30)
        worker.join(60)
        # A request that never started must not surprise the next `serve`.
        store.take_build_request(name)


def _drive(keeper: ImageController, store: Store, name: str, stop: threading.Event) -> None:
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


def _keeper(config: Config, store: Store) -> ImageController:
    """The image controller alone, as `serve` would run it, for this command's work."""
    from freshpool.launcher.context import Shared
    from freshpool.launcher.images import ImageController

    keeper = ImageController(Shared(config, store, checked_drivers(config, store)), automatic=False)
    keeper.start()
    return keeper


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
    from freshpool.launcher import buildverbs

    with opened(config_path) as (config, store):
        row = buildverbs.delete(store, config, build_id)
        if row.state == B.DELETED:
            out.print(f"build {build_id} deleted", highlight=False)
            return
        users = store.nodes_per_build().get(build_id, 0)
        with launcherlock.trying(config.state_dir, "freshpool image delete") as holder:
            held = holder is None
            if held:
                keeper = _keeper(config, store)
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
    from freshpool.launcher import buildverbs

    with opened(config_path) as (config, store):
        buildverbs.pause(store, config, name, reason)
    out.print(f"image {name} paused: no new builds until `freshpool image unpause {name}`")


@image_app.command("unpause")
@friendly
def image_unpause(
    name: Annotated[str, typer.Argument(help="Image name from the config.")],
    config_path: ConfigOpt = None,
) -> None:
    """Allow builds of an image again."""
    from freshpool.launcher import buildverbs

    with opened(config_path) as (config, store):
        buildverbs.unpause(store, config, name)
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
    from freshpool.launcher import buildverbs

    with opened(config_path) as (config, store):
        retired, serving = buildverbs.rollback(store, config, name)
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
