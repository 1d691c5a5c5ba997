"""`freshpool image commit`: turn a held VM node's disk into a new image build."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from freshpool.cli.app import ConfigOpt, err, friendly, image_app, opened, out

if TYPE_CHECKING:
    from freshpool.store import NodeRow


@image_app.command("commit")
@friendly
def image_commit(
    node_id: Annotated[int, typer.Argument(metavar="NODE", help="A held node of a qemu provider.")],
    image: Annotated[
        str | None, typer.Option(help="Image to add the build to (default: the node's image).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to allow for the commit.")] = 600.0,
    config_path: ConfigOpt = None,
) -> None:
    """Shut down a held VM node and fold its disk into a new ready build of an image.

    The node is then used up (deleted by the launcher); new nodes of the image boot
    from the committed disk.
    """
    from freshpool.launcher.vmcommit import commit_node

    with opened(config_path) as (config, store), err.status(f"committing node {node_id}"):
        row = commit_node(config, store, node_id, image, timeout)
    out.print(
        f"node {node_id}: committed as build {row.id} of image {row.image} ({row.path})",
        highlight=False,
    )


def vm_accel(pool: object, nodes: list[NodeRow]) -> dict[int, str]:
    """Node id -> the accelerator (kvm/tcg) its VM runs on, for `freshpool list`.

    Read from the qemu driver's runtime files, so only with the local store: the
    store keeps no per-node driver facts yet (README, "VM nodes").
    """
    from freshpool.config import Config

    config = getattr(pool, "config", None)
    if not isinstance(config, Config):
        return {}
    vm_providers = {p.name for p in config.providers if p.driver == "qemu"}
    if not vm_providers:
        return {}
    # Here, not at the top: other commands do not pay for loading the VM driver.
    from freshpool.drivers.qemu import node_accel

    found = {}
    for node in nodes:
        if node.provider in vm_providers and node.external_id:
            state_dir = config.state_dir / "providers" / node.provider
            accel = node_accel(state_dir, node.external_id)
            if accel:
                found[node.id] = accel
    return found
