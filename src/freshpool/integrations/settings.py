"""Settings every integration's file shares: how to reach freshpool, and secrets given
inline, by an environment variable's name, or in a file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from freshpool.api.client import ApiClient
from freshpool.config.base import Model, Seconds
from freshpool.config.loader import ConfigError, ConfigProblem, line_of


def secret(value: str | None, env: str | None, file: Path | None, what: str) -> str | None:
    """A secret given inline, by an environment variable's name, or in a file."""
    if env:
        found = os.environ.get(env)
        if not found:
            raise ValueError(f"{what}: environment variable {env} is not set")
        return found.strip()
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read {file}: {exc.strerror}") from None
    return value


class FreshpoolSettings(Model):
    """The pool's API, and the tenant token the integration's requests are made with."""

    url: str = "http://127.0.0.1:8005"
    token: str | None = None
    token_env: str | None = None
    token_file: Path | None = None
    # How long one CI job waits for its node set before giving up.
    request_timeout: Seconds = 600.0

    def resolved_token(self) -> str | None:
        return secret(self.token, self.token_env, self.token_file, "freshpool.token")

    def client(self) -> ApiClient:
        return ApiClient(self.url, self.resolved_token())


def check_secrets(source: str, tree: Any, resolvers: dict[str, Callable[[], object]]) -> None:
    """Secrets named by environment variable or file must be there at start, not at the
    first job: each section's resolver is called, and every failure is reported."""
    problems = []
    for section, resolve in resolvers.items():
        try:
            resolve()
        except ValueError as exc:
            problems.append(ConfigProblem(source, line_of(tree, [section]), section, str(exc)))
    if problems:
        raise ConfigError(problems)
