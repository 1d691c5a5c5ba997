"""The root typer app, shared consoles, and the one place that turns errors into exits."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from freshpool.core.errors import FreshpoolError

if TYPE_CHECKING:
    from freshpool.config import Config
    from freshpool.drivers.base import Driver, SshAccess
    from freshpool.store import NodeRow, Store


def group(help: str, add_completion: bool = True) -> typer.Typer:
    """A command group. Plain help: typer's rich help imports markdown and pygments,
    which would cost every `--help` more than the rest of the start-up."""
    return typer.Typer(
        no_args_is_help=True, rich_markup_mode=None, help=help, add_completion=add_completion
    )


app = group("A warm pool of single-use CI nodes.", add_completion=False)
image_app = group("Build, list, validate, roll back and delete image builds.")
config_app = group("Check and print configuration.")
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


class Exit(FreshpoolError):
    """A command's own refusal, with the exit code to leave with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def friendly(fn: F) -> F:
    """Turn expected failures into one clear message and the exit code of their kind
    (core/errors.py's table), no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from freshpool.core.errors import EXIT_CODES, code_for

        try:
            return fn(*args, **kwargs)
        except Exit as exc:
            _fail(str(exc), exc.code)
        except FreshpoolError as exc:
            problems = getattr(exc, "problems", None)
            if problems is not None:  # a config file's: one line each
                for problem in problems:
                    err.print(f"[red]config error:[/] {problem}", highlight=False)
                raise typer.Exit(2) from None
            _fail(str(exc).strip("'\""), code_for(exc, EXIT_CODES, 1))
        except PermissionError as exc:
            _fail(
                f"permission denied: {exc.filename or exc} (freshpool needs root for "
                "its state directory and local nodes)",
                1,
            )

    return wrapper  # type: ignore[return-value]  # same signature: functools.wraps


def _fail(message: str, code: int) -> None:
    err.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def opened(config_path: Path | None) -> Iterator[tuple[Config, Store]]:
    # Here, not at the top: every command imports this module, most need no store.
    from freshpool.config import load
    from freshpool.store import Store

    config = load(config_path)
    store = Store.open(config.state_dir, config.database_url)
    try:
        yield config, store
    finally:
        store.close()


def checked_drivers(config: Config, store: Store) -> dict[str, Driver]:
    """Every provider's driver, each checked that it can work on this host."""
    from freshpool.drivers.base import load_driver

    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    for driver in drivers.values():
        driver.check()
    return drivers


def access_of(node: NodeRow) -> SshAccess:
    from freshpool.drivers.base import SshAccess

    if not node.access:
        raise Exit(f"node {node.id} is {node.state} and has no address yet")
    return SshAccess(**node.access)


def node_json(node: NodeRow) -> dict[str, Any]:
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
        from freshpool.drivers.base import SshAccess
        from freshpool.drivers.ssh import paste_command

        data.update(node.access)
        data["ssh"] = paste_command(SshAccess(**node.access))
    return data


def short_age(seconds: float) -> str:
    """A short age like 42s, 5m07s, 3h12m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
