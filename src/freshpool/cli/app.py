"""The root typer app, shared consoles, and the one place that turns errors into exits."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from freshpool.config import Config, ConfigError, UnknownName, load
from freshpool.core.states import InvalidTransition
from freshpool.drivers.base import DriverError, SshAccess
from freshpool.drivers.ssh import paste_command
from freshpool.service import handoff
from freshpool.store import NodeRow, NotFound, StaleState, Store

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="A warm pool of single-use CI nodes."
)
image_app = typer.Typer(
    no_args_is_help=True, help="Build, list, validate, roll back and delete image builds."
)
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
    store = Store.open(config.state_dir, config.database_url)
    try:
        yield config, store
    finally:
        store.close()


def access_of(node: NodeRow) -> SshAccess:
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
