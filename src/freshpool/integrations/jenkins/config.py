"""The settings of `freshpool jenkins serve`, from a YAML file of their own.

    freshpool: {url: http://127.0.0.1:8005, token-env: FRESHPOOL_TOKEN}
    jenkins:
      url: https://jenkins.example.com/
      user: freshpool                 # a user allowed Agent/Create, Configure, Delete, Connect
      token-env: JENKINS_TOKEN        # that user's API token
      node-url: http://10.0.0.1:8080/ # Jenkins as the nodes reach it (default: url)
    labels:
      - label: linux                  # the Jenkins label jobs ask for
        node-label: debian            # the freshpool label its nodes come from
        min-idle: 1                   # agents kept online with no build, ready to take one
        max: 10

Errors name the file, line and key, as freshpool's own config does.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from freshpool.config.base import Model, Seconds
from freshpool.config.loader import load_model
from freshpool.integrations.settings import FreshpoolSettings, check_secrets, secret

# A Jenkins label atom: no whitespace, none of the label-expression operators.
_LABEL = re.compile(r"^[^\s&|!()<>=\"']+$")
# Runs on the node with the agent's secret on its standard input (never on a command
# line, where `ps` and the SSH logs would show it). {url}: Jenkins as nodes reach it;
# {name}: the agent's name; {remote_fs}: the agent's root directory.
DEFAULT_COMMAND = (
    "mkdir -p {remote_fs} && cd {remote_fs} && (umask 077 && cat > .agent-secret) && "
    "{{ [ -f agent.jar ] || curl -fsSLo agent.jar {url}jnlpJars/agent.jar; }} && "
    "exec java -jar agent.jar -url {url} -name {name} -secret @.agent-secret "
    "-webSocket -workDir {remote_fs}"
)


class JenkinsSettings(Model):
    url: str
    user: str
    token: str | None = None
    token_env: str | None = None
    token_file: Path | None = None
    node_url: str | None = None
    # Every call to Jenkins gives up after this long (and is retried with the backoff).
    timeout: Seconds = 30.0
    verify: bool | Path = True

    @field_validator("url", "node_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/") + "/"

    @model_validator(mode="after")
    def _one_token(self) -> JenkinsSettings:
        if sum(x is not None for x in (self.token, self.token_env, self.token_file)) != 1:
            raise ValueError("give exactly one of `token`, `token-env` or `token-file`")
        return self

    def resolved_token(self) -> str | None:
        return secret(self.token, self.token_env, self.token_file, "jenkins.token")

    @property
    def url_for_nodes(self) -> str:
        return self.node_url or self.url


class LabelKind(Model):
    """Builds asking for the Jenkins label `label` run on nodes of `node-label`."""

    label: str
    node_label: str
    # Agents kept online and idle so a build starts at once; more start for each build
    # that waits for this label, up to `max` agents in all.
    min_idle: int = Field(default=0, ge=0)
    max: int = Field(default=10, ge=1)
    # A build running longer is aborted in Jenkins and its node destroyed; keep it at
    # or below the freshpool label's own job-timeout, which destroys the node anyway.
    job_timeout: Seconds = 3 * 3600.0

    @field_validator("label")
    @classmethod
    def _atom(cls, value: str) -> str:
        if not _LABEL.match(value) or value.endswith("-used"):
            raise ValueError(
                f"{value!r} is not a plain Jenkins label (no spaces or operators, and not "
                "ending in -used, which marks agents that ran their build)"
            )
        return value

    @model_validator(mode="after")
    def _idle_fits(self) -> LabelKind:
        if self.min_idle > self.max:
            raise ValueError(f"min-idle ({self.min_idle}) is more than max ({self.max})")
        return self


class AgentSettings(Model):
    command: str = DEFAULT_COMMAND
    # Runs on the node before the agent starts (install a JDK, fetch tools).
    setup: str | None = None
    name_prefix: str = Field(default="freshpool-", pattern=r"^[A-Za-z0-9._-]{1,40}$")
    remote_fs: str = "/var/lib/jenkins-agent"

    @field_validator("command")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            value.format(url="u", name="n", remote_fs="r")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"bad placeholder {exc}: only {{url}}, {{name}} and {{remote_fs}} are known "
                "(write {{ and }} for literal braces)"
            ) from None
        return value


class StatusSettings(Model):
    listen: str = "127.0.0.1"
    port: int = Field(default=8791, ge=0, le=65535)


class Settings(Model):
    freshpool: FreshpoolSettings = FreshpoolSettings()
    jenkins: JenkinsSettings
    labels: list[LabelKind] = Field(min_length=1)
    agent: AgentSettings = AgentSettings()
    status: StatusSettings = StatusSettings()
    # How often an agent that has not yet taken its build is looked at: its build is
    # taken out of the label (so gets no second build) within this long of starting.
    poll_interval: Seconds = 0.1
    # How often the build queue and the agents Jenkins lists are read.
    queue_interval: Seconds = 2.0
    # An agent not online in Jenkins this long after its start: node replaced.
    agent_timeout: Seconds = 180.0
    # An idle agent beyond `min-idle` with no build waiting this long is removed.
    idle_timeout: Seconds = 600.0

    @model_validator(mode="after")
    def _distinct(self) -> Settings:
        names = [k.label for k in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"a Jenkins label is listed twice in `labels`: {names}")
        return self

    def kind(self, label: str) -> LabelKind | None:
        return next((k for k in self.labels if k.label == label), None)


def load(path: Path) -> Settings:
    """The settings in `path`; a ConfigError naming file, line and key otherwise."""
    settings, tree = load_model(path, Settings)
    check_secrets(str(path), tree, {
        "jenkins": settings.jenkins.resolved_token,
        "freshpool": settings.freshpool.resolved_token,
    })  # fmt: skip
    return settings
