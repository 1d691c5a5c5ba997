"""The `freshpool` command: thin; each command calls the service layer and prints."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from freshpool import logs
from freshpool.config import Config, ConfigError, UnknownName, default_text, load, resolve_path
from freshpool.drivers.base import Driver, DriverError, SshAccess, load_driver
from freshpool.drivers.ssh import paste_command, ssh_argv
from freshpool.service import handoff, imaging
from freshpool.states import InvalidTransition
from freshpool.store import NodeRow, NotFound, StaleState, Store

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="A warm pool of single-use CI nodes."
)
image_app = typer.Typer(no_args_is_help=True, help="Build and list images.")
config_app = typer.Typer(no_args_is_help=True, help="Check and print configuration.")
app.add_typer(image_app, name="image")
app.add_typer(config_app, name="config")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file [default: ./freshpool.yaml, else the embedded default]",
        envvar="FRESHPOOL_CONFIG",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _root(config_path: ConfigOpt = None) -> None:
    """A warm pool of single-use CI nodes."""
    # `freshpool -c FILE CMD` and `freshpool CMD -c FILE` both work: the command's own
    # option reads this variable when it is not given.
    if config_path is not None:
        os.environ["FRESHPOOL_CONFIG"] = str(config_path)


class Exit(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def friendly(fn: F) -> F:
    """Turn expected failures into one clear message and a non-zero exit, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            for problem in exc.problems:
                err.print(f"[red]config error:[/] {problem}", highlight=False)
            raise typer.Exit(2) from None
        except (UnknownName, NotFound) as exc:
            _fail(str(exc).strip("'\""), 2)
        except (InvalidTransition, StaleState) as exc:
            _fail(str(exc), 1)
        except (DriverError, handoff.NothingToServe) as exc:
            _fail(str(exc), 3)
        except handoff.AcquireTimeout as exc:
            _fail(str(exc), 4)
        except Exit as exc:
            _fail(str(exc), exc.code)
        except PermissionError as exc:
            _fail(
                f"permission denied: {exc.filename or exc} (freshpool needs root for "
                "its state directory and local nodes)",
                1,
            )

    return wrapper  # type: ignore[return-value]


def _fail(message: str, code: int) -> None:
    err.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def opened(config_path: Path | None) -> Iterator[tuple[Config, Store]]:
    config = load(config_path)
    store = Store.open(config.state_dir)
    try:
        yield config, store
    finally:
        store.close()


def _access(node: NodeRow) -> SshAccess:
    if not node.access:
        raise Exit(f"node {node.id} is {node.state} and has no address yet")
    return SshAccess(**node.access)


def _node_json(node: NodeRow) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": node.id,
        "label": node.label,
        "provider": node.provider,
        "state": node.state,
        "hostname": node.hostname,
        "build": node.build_id,
        "request": node.request_id,
        "reason": node.reason,
        "created_at": node.created_at,
        "state_at": node.state_at,
        "external_id": node.external_id,
    }
    if node.access:
        data.update(node.access)
        data["ssh"] = paste_command(SshAccess(**node.access))
    return data


def _age(seconds: float) -> str:
    """A short age like 42s, 5m07s, 3h12m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# ---------------------------------------------------------------- serving


@app.command()
@friendly
def serve(
    config_path: ConfigOpt = None,
    build: Annotated[bool, typer.Option(help="Build images that have no ready build.")] = True,
) -> None:
    """Run the launcher: keep min-ready nodes per label ready, delete used ones."""
    from freshpool.service.launcher import Launcher

    config = load(config_path)
    logs.setup(config.log_level)
    if os.geteuid() != 0:
        raise Exit(
            "`freshpool serve` must run as root: local nodes need mounts and network namespaces", 3
        )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    lock = _launcher_lock(config.state_dir)
    store = Store.open(config.state_dir)
    drivers: dict[str, Driver] = {}
    for provider in config.providers:
        driver = load_driver(provider, store.cluster_id, config.state_dir)
        driver.check()
        drivers[provider.name] = driver
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        err.print(f"received {signal.Signals(signum).name}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    source, _ = resolve_path(config_path)
    err.print(
        f"freshpool serving from {source}; state in {config.state_dir}; cluster {store.cluster_id}"
    )
    if build:
        imaging.build_missing_in_background(config, store)
    try:
        Launcher(config, store, drivers).run(stop)
    finally:
        store.close()
        lock.close()


def _launcher_lock(state_dir: Path) -> Any:
    """One launcher per state directory; a second one says who holds it."""
    handle = open(state_dir / "launcher.lock", "a+")  # noqa: SIM115 - held for the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise Exit(f"another `freshpool serve` ({holder}) already runs on {state_dir}", 1) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


# -------------------------------------------------------------- using nodes


@app.command()
@friendly
def acquire(
    label: Annotated[str, typer.Argument(help="The label of node to take.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a ready node.")] = 300.0,
    as_json: JsonOpt = False,
    config_path: ConfigOpt = None,
) -> None:
    """Take a ready node for one job. It is yours alone; release it when done."""
    with opened(config_path) as (config, store):
        (node,) = handoff.acquire(config, store, [label], timeout)
    if as_json:
        out.print_json(json.dumps(_node_json(node)))
        return
    access = _access(node)
    out.print(f"node {node.id} ({node.label}) at {access.host}", highlight=False)
    out.print(paste_command(access), highlight=False, soft_wrap=True)
    out.print(f"release it with: freshpool release {node.id}", highlight=False)


@app.command()
@friendly
def release(
    node_id: Annotated[int, typer.Argument(metavar="NODE")], config_path: ConfigOpt = None
) -> None:
    """Give back a node after its job: it is deleted, never reused."""
    with opened(config_path) as (_config, store):
        node = handoff.release(store, node_id)
    out.print(f"node {node.id}: {node.state}; it will be deleted", highlight=False)


@app.command()
@friendly
def hold(
    node_id: Annotated[int, typer.Argument(metavar="NODE")], config_path: ConfigOpt = None
) -> None:
    """Keep a node for a person to debug; it is never handed out again."""
    with opened(config_path) as (_config, store):
        node = handoff.hold(store, node_id)
    out.print(f"node {node.id}: held", highlight=False)


@app.command()
@friendly
def delete(
    node_id: Annotated[int, typer.Argument(metavar="NODE")], config_path: ConfigOpt = None
) -> None:
    """Delete a node now, whatever it is doing."""
    with opened(config_path) as (_config, store):
        node = handoff.delete(store, node_id)
    out.print(f"node {node.id}: deleting", highlight=False)


@app.command(context_settings={"allow_interspersed_args": False})
@friendly
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run on the node.")],
    label: Annotated[str, typer.Option("--label", "-l", help="The label of node to use.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a ready node.")] = 300.0,
    config_path: ConfigOpt = None,
) -> None:
    """Take a node, run COMMAND on it streaming its output, give it back, exit with its status."""
    with opened(config_path) as (config, store):
        (node,) = handoff.acquire(config, store, [label], timeout)
        err.print(f"[dim]node {node.id} ({node.label})[/]", highlight=False)
        try:
            status = subprocess.call(ssh_argv(_access(node), command), stdin=subprocess.DEVNULL)
        finally:
            handoff.release(store, node.id, "job finished")
    raise typer.Exit(status)


@app.command()
@friendly
def ssh(
    node_id: Annotated[int, typer.Argument(metavar="NODE")],
    command: Annotated[list[str] | None, typer.Argument()] = None,
    config_path: ConfigOpt = None,
) -> None:
    """Open a shell on a node (or run COMMAND there)."""
    with opened(config_path) as (_config, store):
        node = store.node(node_id)
    argv = ssh_argv(_access(node), command or None, tty=not command and sys.stdin.isatty())
    os.execvp(argv[0], argv)


@app.command("list")
@friendly
def list_nodes(as_json: JsonOpt = False, config_path: ConfigOpt = None) -> None:
    """Every node with its state, age in that state and address."""
    with opened(config_path) as (_config, store):
        nodes = store.nodes()
    if as_json:
        out.print_json(json.dumps([_node_json(n) for n in nodes]))
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "LABEL", "PROVIDER", "STATE", "AGE", "ADDRESS", "REQUEST", "REASON"):
        table.add_column(column)
    now = time.time()
    styles = {"ready": "green", "in-use": "cyan", "failed": "red", "hold": "yellow"}
    for n in nodes:
        table.add_row(
            str(n.id),
            n.label,
            n.provider,
            f"[{styles.get(n.state, 'white')}]{n.state}[/]",
            _age(now - n.state_at),
            (n.access or {}).get("host", ""),
            str(n.request_id or ""),
            n.reason,
        )
    out.print(table)
    out.print(f"{len(nodes)} nodes", style="dim")


@app.command()
@friendly
def show(
    node_id: Annotated[int, typer.Argument(metavar="NODE")], config_path: ConfigOpt = None
) -> None:
    """One node's details and its history (what happened, when, why)."""
    with opened(config_path) as (_config, store):
        events = store.events(node_id)
        try:
            node: NodeRow | None = store.node(node_id)
        except NotFound:
            node = None
    if node is None and not events:
        raise NotFound(f"no node {node_id}")
    if node is not None:
        for key, value in _node_json(node).items():
            out.print(f"{key:>12}: {value}", highlight=False)
    table = Table("WHEN", "FROM", "TO", "WHY", box=None, header_style="bold")
    for e in events:
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(e.at)) + f".{int(e.at % 1 * 1000):03d}",
            e.from_state or "",
            e.to_state or "(removed)",
            e.reason,
        )
    out.print(table)


# ---------------------------------------------------------------- images


@image_app.command("build")
@friendly
def image_build(
    name: Annotated[str, typer.Argument(help="Image name from the config.")],
    config_path: ConfigOpt = None,
) -> None:
    """Build an image now (debootstrap, packages, pre-fetch) and make it the one served."""
    if os.geteuid() != 0:
        raise Exit("building an image needs root (debootstrap and bubblewrap)", 3)
    with opened(config_path) as (config, store):
        config.image(name)
        started = time.monotonic()
        with err.status(f"building {name}") as status:

            def progress(stage: str, line: str) -> None:
                elapsed = time.monotonic() - started
                status.update(f"[bold]{name}[/] {elapsed:5.0f}s  {stage}: [dim]{line[-70:]}[/]")

            try:
                row = imaging.build(config, store, name, progress)
            except Exception as exc:
                raise Exit(f"image {name}: build failed: {exc}", 1) from None
    size = (row.manifest or {}).get("size_bytes", 0)
    out.print(
        f"image {name}: build {row.id} ready ({size / 1e6:.0f} MB, "
        f"{time.monotonic() - started:.0f} s)",
        highlight=False,
    )


@image_app.command("list")
@friendly
def image_list(as_json: JsonOpt = False, config_path: ConfigOpt = None) -> None:
    """Every image build with its state and age."""
    with opened(config_path) as (_config, store):
        builds = store.builds()
        nodes = store.nodes()
    using: dict[str, int] = {}
    for n in nodes:
        using[n.build_id] = using.get(n.build_id, 0) + 1
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "id": b.id,
                        "image": b.image,
                        "state": b.state,
                        "path": b.path,
                        "reason": b.reason,
                        "created_at": b.created_at,
                        "nodes": using.get(b.id, 0),
                        "size_bytes": (b.manifest or {}).get("size_bytes"),
                    }
                    for b in builds
                ]
            )
        )
        return
    table = Table(
        "BUILD", "IMAGE", "STATE", "AGE", "SIZE", "NODES", "REASON", box=None, header_style="bold"
    )
    now = time.time()
    for b in builds:
        size = (b.manifest or {}).get("size_bytes")
        table.add_row(
            b.id,
            b.image,
            b.state,
            _age(now - b.created_at),
            f"{size / 1e6:.0f} MB" if size else "",
            str(using.get(b.id, 0)),
            b.reason[:80],
        )
    out.print(table)


# ---------------------------------------------------------------- config


@config_app.command("validate")
@friendly
def config_validate(config_path: ConfigOpt = None) -> None:
    """Check the config file; print every problem with its line and key path."""
    source, _ = resolve_path(config_path)
    config = load(config_path)
    out.print(
        f"{source}: ok ({len(config.providers)} providers, {len(config.labels)} labels, "
        f"{len(config.images)} images)",
        highlight=False,
    )


@config_app.command("default")
def config_default() -> None:
    """Print the embedded default config (a starting point for freshpool.yaml)."""
    sys.stdout.write(default_text())


def main() -> None:
    app()
