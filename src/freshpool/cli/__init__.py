"""The `freshpool` command: thin; each command calls the service layer and prints."""

from freshpool.cli import (  # noqa: F401 - commands
    config,
    github,
    gitlab,
    host,
    images,
    importing,
    jenkins,
    labels,
    nodes,
    serve,
    tokens,
    usage,
    vm,
)
from freshpool.cli.app import app


def main() -> None:
    app()
