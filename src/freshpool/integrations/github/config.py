"""The settings of `freshpool github serve`, from a YAML file of their own.

    freshpool: {url: http://127.0.0.1:8005, token-env: FRESHPOOL_TOKEN}
    github:
      repository: octo-org/octo-repo        # or organization: octo-org
      api-url: https://api.github.com       # GitHub Enterprise: https://HOST/api/v3
      token-env: GITHUB_TOKEN               # or app: {app-id, private-key-file}
      runner-group: Default
    webhook: {listen: 127.0.0.1, port: 8790, secret-env: GITHUB_WEBHOOK_SECRET}
    runners:
      - labels: [self-hosted, linux, x64, freshpool-debian]
        node-label: debian

Errors name the file, line and key, as freshpool's own config does.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from freshpool.config.base import Model, Seconds
from freshpool.config.loader import load_model
from freshpool.integrations.settings import FreshpoolSettings, check_secrets, secret

# Labels GitHub gives every self-hosted runner: a job asking only for these is anyone's,
# so a runners entry must be picked by at least one label beyond them.
DEFAULT_LABELS = frozenset({"self-hosted", "linux", "windows", "macos", "x64", "arm", "arm64"})
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


class AppSettings(Model):
    app_id: str
    private_key_file: Path
    # Found from the repository or organization when not given.
    installation_id: int | None = None

    @field_validator("private_key_file")
    @classmethod
    def _readable(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value


class GithubSettings(Model):
    repository: str | None = None
    organization: str | None = None
    api_url: str = "https://api.github.com"
    token: str | None = None
    token_env: str | None = None
    token_file: Path | None = None
    app: AppSettings | None = None
    # A name (looked up at start) or an id; repositories have only "Default" (id 1).
    runner_group: str | int = "Default"
    # Organization scope: the repositories whose queued jobs the reconcile lists
    # (empty: every repository of the organization).
    repositories: list[str] = []

    @field_validator("repository")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is not None and not _REPO.match(value):
            raise ValueError(f"{value!r} is not OWNER/NAME")
        return value

    @field_validator("organization")
    @classmethod
    def _org(cls, value: str | None) -> str | None:
        if value is not None and not _OWNER.match(value):
            raise ValueError(f"{value!r} is not an organization's login")
        return value

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_scope_one_auth(self) -> GithubSettings:
        if (self.repository is None) == (self.organization is None):
            raise ValueError("give exactly one of `repository` (OWNER/NAME) or `organization`")
        given = [self.token, self.token_env, self.token_file, self.app]
        if sum(x is not None for x in given) != 1:
            raise ValueError("give exactly one of `token`, `token-env`, `token-file` or `app`")
        return self

    def resolved_token(self) -> str | None:
        return secret(self.token, self.token_env, self.token_file, "github.token")

    @property
    def scope_path(self) -> str:
        """Where the runners live: /repos/OWNER/NAME or /orgs/ORG."""
        return f"/repos/{self.repository}" if self.repository else f"/orgs/{self.organization}"


class WebhookSettings(Model):
    listen: str = "127.0.0.1"
    port: int = Field(default=8790, ge=0, le=65535)
    secret: str | None = None
    secret_env: str | None = None
    secret_file: Path | None = None

    @model_validator(mode="after")
    def _has_secret(self) -> WebhookSettings:
        if self.secret is None and self.secret_env is None and self.secret_file is None:
            raise ValueError("a secret is required: `secret`, `secret-env` or `secret-file`")
        return self

    def resolved_secret(self) -> str:
        found = secret(self.secret, self.secret_env, self.secret_file, "webhook.secret")
        if not found:
            raise ValueError("webhook.secret: empty")
        return found


class RunnerKind(Model):
    """Jobs whose labels are all among `labels` run on a node of `node-label`."""

    labels: list[str] = Field(min_length=1, max_length=100)
    node_label: str

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not set(v.lower() for v in value) - DEFAULT_LABELS:
            raise ValueError(
                "needs a label besides GitHub's defaults (self-hosted, linux, x64...): "
                "a job asking only for those could be any self-hosted runner's"
            )
        return value

    def serves(self, job_labels: frozenset[str]) -> bool:
        mine = {v.lower() for v in self.labels}
        return bool(job_labels) and job_labels <= mine and bool(job_labels - DEFAULT_LABELS)


class RunnerSettings(Model):
    # Runs on the node; the JIT config arrives on its standard input (never on a
    # command line, where `ps` and the SSH logs would show it).
    command: str = (
        'cd /opt/actions-runner && RUNNER_ALLOW_RUNASROOT=1 exec ./run.sh --jitconfig "$(cat)"'
    )
    # Runs on the node before the runner starts (fetch a runner build, install tools).
    setup: str | None = None
    name_prefix: str = Field(default="freshpool-", pattern=r"^[A-Za-z0-9._-]{1,40}$")
    work_folder: str = "_work"


class Settings(Model):
    freshpool: FreshpoolSettings = FreshpoolSettings()
    github: GithubSettings
    webhook: WebhookSettings
    runners: list[RunnerKind] = Field(min_length=1)
    runner: RunnerSettings = RunnerSettings()
    # The REST reconcile: jobs the webhooks missed, ghost runners, idle runners.
    reconcile_interval: Seconds = 60.0
    # A runner that does not show online in GitHub this long after its start: its
    # node is destroyed and replaced.
    agent_timeout: Seconds = 180.0
    # A runner that took no job this long (its job went to another runner or was
    # cancelled) is removed and its node destroyed.
    idle_timeout: Seconds = 600.0
    max_runners: int = Field(default=10, ge=1)

    def kind_for(self, labels: frozenset[str]) -> RunnerKind | None:
        return next((k for k in self.runners if k.serves(labels)), None)


def load(path: Path) -> Settings:
    """The settings in `path`; a ConfigError naming file, line and key otherwise."""
    settings, tree = load_model(path, Settings)
    check_secrets(str(path), tree, {
        "webhook": settings.webhook.resolved_secret,
        "github": settings.github.resolved_token,
        "freshpool": settings.freshpool.resolved_token,
    })  # fmt: skip
    return settings
