"""Commands that take, use and give back nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from freshpool.cli.app import (
    ConfigOpt,
    JsonOpt,
    access_of,
    app,
    err,
    friendly,
    node_json,
    out,
    short_age,
)
from freshpool.cli.backend import UrlOpt, backend
from freshpool.cli.vm import vm_accel
from freshpool.core.errors import NotFound

if TYPE_CHECKING:
    from freshpool.store import NodeRow

# -------------------------------------------------------------- using nodes


@app.command()
@friendly
def acquire(
    label: Annotated[str, typer.Argument(help="The label of node to take.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a ready node.")] = 300.0,
    ssh_key: Annotated[
        list[str] | None,
        typer.Option(
            "--ssh-key",
            help="A public key (or a .pub file) that may log in to the node; repeatable.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    config_path: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Take a ready node for one job. It is yours alone; release it when done."""
    keys = [_key_text(k) for k in ssh_key or []]
    with backend(config_path, url) as pool:
        (node,) = pool.acquire([label], timeout, keys)
    if as_json:
        out.print_json(json.dumps(node_json(node)))
        return
    access = access_of(node)
    out.print(f"node {node.id} ({node.label}) at {access.host}", highlight=False)
    from freshpool.drivers.ssh import paste_command

    out.print(paste_command(access), highlight=False, soft_wrap=True)
    out.print(f"release it with: freshpool release {node.id}", highlight=False)


@app.command()
@friendly
def release(
    node_id: Annotated[int, typer.Argument(metavar="NODE")],
    config_path: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Give back a node after its job (with the rest of its set): deleted, never reused."""
    with backend(config_path, url) as pool:
        nodes = pool.release(node_id, "released")
    for node in nodes:
        out.print(f"node {node.id}: {node.state}; it will be deleted", highlight=False)


@app.command()
@friendly
def hold(
    node_id: Annotated[int, typer.Argument(metavar="NODE")],
    config_path: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Keep a node for a person to debug; it is never handed out again."""
    with backend(config_path, url) as pool:
        node = pool.hold(node_id)
    out.print(f"node {node.id}: held", highlight=False)


@app.command()
@friendly
def delete(
    node_id: Annotated[int, typer.Argument(metavar="NODE")],
    config_path: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Delete a node now, whatever it is doing."""
    with backend(config_path, url) as pool:
        node = pool.delete(node_id)
    out.print(f"node {node.id}: deleting", highlight=False)


@app.command(context_settings={"allow_interspersed_args": False})
@friendly
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run on the node.")],
    label: Annotated[str, typer.Option("--label", "-l", help="The label of node to use.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a ready node.")] = 300.0,
    config_path: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Take a node, run COMMAND on it streaming its output, give it back, exit with its status."""
    with backend(config_path, url) as pool:
        (node,) = pool.acquire([label], timeout)
        err.print(f"[dim]node {node.id} ({node.label})[/]", highlight=False)
        try:
            from freshpool.drivers.ssh import ssh_argv

            status = subprocess.call(ssh_argv(access_of(node), command), stdin=subprocess.DEVNULL)
        finally:
            pool.release(node.id, "job finished")
    raise typer.Exit(status)


@app.command()
@friendly
def ssh(
    node_id: Annotated[int, typer.Argument(metavar="NODE")],
    command: Annotated[list[str] | None, typer.Argument()] = None,
    config_path: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Open a shell on a node (or run COMMAND there)."""
    with backend(config_path, url) as pool:
        node = pool.node(node_id)
    from freshpool.drivers.ssh import ssh_argv

    argv = ssh_argv(access_of(node), command or None, tty=not command and sys.stdin.isatty())
    os.execvp(argv[0], argv)


@app.command("list")
@friendly
def list_nodes(as_json: JsonOpt = False, config_path: ConfigOpt = None, url: UrlOpt = None) -> None:
    """Every node with its state, age in that state and address."""
    with backend(config_path, url) as pool:
        nodes = pool.nodes()
        accel = vm_accel(pool, nodes)
    if as_json:
        extra = {n.id: {"accel": accel[n.id]} if n.id in accel else {} for n in nodes}
        out.print_json(json.dumps([{**node_json(n), **extra[n.id]} for n in nodes]))
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
            f"{n.provider} ({accel[n.id]})" if n.id in accel else n.provider,
            f"[{styles.get(n.state, 'white')}]{n.state}[/]",
            short_age(now - n.state_at),
            _address(n.access or {}),
            str(n.request_id or ""),
            n.reason,
        )
    out.print(table)
    out.print(f"{len(nodes)} nodes", style="dim")


def _address(access: dict[str, Any]) -> str:
    # VM nodes share 127.0.0.1 and differ by their forwarded port.
    port = access.get("port", 22)
    return str(access.get("host", "")) + (f":{port}" if port != 22 else "")


@app.command()
@friendly
def show(
    node_id: Annotated[int, typer.Argument(metavar="NODE")],
    config_path: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """One node's details and its history (what happened, when, why)."""
    with backend(config_path, url) as pool:
        events = pool.events(node_id)
        try:
            node: NodeRow | None = pool.node(node_id)
        except NotFound:
            node = None
    if node is None and not events:
        raise NotFound(f"no node {node_id}")
    if node is not None:
        for key, value in node_json(node).items():
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


def _key_text(given: str) -> str:
    """--ssh-key's value: a key itself, or a file holding one (~/.ssh/id_ed25519.pub)."""
    path = Path(given).expanduser()
    if " " not in given and path.is_file():
        return path.read_text().strip()
    return given
