"""The `freshpool` command: thin; each command calls the service layer and prints."""

from freshpool.cli import config, github, gitlab, images, jenkins, nodes, serve, tokens, vm  # noqa: F401 - commands
from freshpool.cli.app import app


def main() -> None:
    app()
