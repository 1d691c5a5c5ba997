"""The configuration file: pydantic models, and a YAML loader whose errors name file, line and key.

Units are the same everywhere: durations in seconds, rates per second.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

DEFAULT_CONFIG_PATH = Path("freshpool.yaml")
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,30}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Seconds = Annotated[float, Field(gt=0)]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Model(BaseModel):
    # Unknown keys are errors: a typo like "min_ready" must not be silently ignored.
    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True
    )


class LocalNetwork(_Model):
    subnet: str = "10.213.0.0/16"
    # Nodes are host-only by default: no route leaves the host-only bridge.
    outbound: bool = False
    bridge: str | None = None

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or net.prefixlen > 28:
            raise ValueError("expected an IPv4 network of /28 or larger, like 10.213.0.0/16")
        return str(net)


Rate = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class SimSettings(_Model):
    """The sim driver's behaviour (ignored by other drivers)."""

    seed: int = 0
    latency: Annotated[float, Field(ge=0)] = 0.0
    failure_rate: Fraction = 0.0
    timeout_rate: Fraction = 0.0
    lie_rate: Fraction = 0.0
    leak_on_failure: Fraction = 0.5
    command_failure_rate: Fraction = 0.0
    quota: int | None = Field(default=None, ge=0)
    # Keep instances in <state-dir>/providers/NAME/sim.db so they outlive the launcher.
    persist: bool = True


class Provider(_Model):
    name: Name
    driver: str = "local"
    max_nodes: int = Field(default=20, ge=1)
    # Launches in flight at once; bounds the burst the launcher puts on the driver.
    max_parallel_launches: int = Field(default=16, ge=1)
    labels: list[Name] | None = None
    network: LocalNetwork = LocalNetwork()
    boot_timeout: Seconds = 60.0
    delete_timeout: Seconds = 60.0
    # Driver calls (creates and deletes) started per second, at most.
    rate: Rate = 50.0
    # Consecutive failed driver calls that pause the provider, and the first pause.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: Seconds = 30.0
    sim: SimSettings = SimSettings()

    def serves(self, label: str) -> bool:
        return self.labels is None or label in self.labels


class Label(_Model):
    name: Name
    image: Name
    min_ready: int = Field(default=1, ge=0)
    max_ready_age: Seconds | None = None
    ready_command: str = "true"
    test_timeout: Seconds = 30.0
    user: str = "root"
    # Ready nodes are re-tested this often; a failing one is replaced (0: never).
    health_interval: Annotated[float, Field(ge=0)] = 300.0
    # An in-use node whose job runs longer is reclaimed.
    job_timeout: Seconds = 3 * 3600.0
    # A held node is deleted after this long.
    max_hold_age: Seconds = 24 * 3600.0


class Image(_Model):
    name: Name
    suite: str = "bookworm"
    # "auto" takes the mirror that the host's apt uses.
    mirror: str = "auto"
    variant: Literal["minbase", "buildd", "default"] = "minbase"
    # Installed into the image.
    packages: list[str] = []
    # Downloaded only: jobs install these offline with `apt-get install --no-download`.
    prefetch: list[str] = []

    @field_validator("packages", "prefetch")
    @classmethod
    def _package_names(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", value):
                raise ValueError(f"{value!r} is not a Debian package name")
        return values


class Config(_Model):
    state_dir: Path = Path("/var/lib/freshpool")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Seconds between reconcile passes when nothing wakes the launcher sooner.
    interval: Seconds = 1.0
    # Seconds between leak sweeps (listing every provider's instances by our tags).
    cleanup_interval: Seconds = 60.0
    # A request with no deadline of its own fails after waiting this long.
    request_timeout: Seconds = 3600.0
    providers: list[Provider] = Field(min_length=1)
    labels: list[Label] = Field(min_length=1)
    images: list[Image] = Field(min_length=1)

    def cross_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems between sections (names used twice, references to nothing), with key paths."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for section in ("providers", "labels", "images"):
            seen: set[str] = set()
            for i, item in enumerate(getattr(self, section)):
                if item.name in seen:
                    problems.append(((section, i, "name"), f"the name {item.name!r} is used twice"))
                seen.add(item.name)
        images = sorted(i.name for i in self.images)
        labels = {x.name for x in self.labels}
        for i, label in enumerate(self.labels):
            if label.image not in images:
                problems.append(
                    (
                        ("labels", i, "image"),
                        f"no image named {label.image!r} (known: {', '.join(images)})",
                    )
                )
        for i, provider in enumerate(self.providers):
            for j, name in enumerate(provider.labels or []):
                if name not in labels:
                    problems.append((("providers", i, "labels", j), f"no label named {name!r}"))
        return problems

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise UnknownName("label", name, [x.name for x in self.labels])

    def image(self, name: str) -> Image:
        for image in self.images:
            if image.name == name:
                return image
        raise UnknownName("image", name, [i.name for i in self.images])

    def providers_for(self, label: str) -> list[Provider]:
        return [p for p in self.providers if p.serves(label)]


class UnknownName(LookupError):
    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r} (known: {', '.join(known) or 'none'})")


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """Every problem found in a configuration file, each with file, line and key path."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def default_text() -> str:
    return resources.files("freshpool").joinpath("default.yaml").read_text()


def resolve_path(path: Path | None) -> tuple[str, str]:
    """Return (source name, text): the given file, ./freshpool.yaml, or the embedded default."""
    if path is None:
        env = os.environ.get("FRESHPOOL_CONFIG")
        path = Path(env) if env else None
    if path is None:
        if DEFAULT_CONFIG_PATH.exists():
            path = DEFAULT_CONFIG_PATH
        else:
            return "<embedded default>", default_text()
    try:
        return str(path), path.read_text()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(str(path), None, "", f"cannot read: {exc.strerror}")]
        ) from None


def load(path: Path | None = None) -> Config:
    source, text = resolve_path(path)
    return parse(text, source)


def parse(text: str, source: str = "<string>") -> Config:
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigProblem(source, line, "", f"not valid YAML: {exc.problem}")]
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError([ConfigProblem(source, 1, "", "expected a mapping of settings")])
    try:
        config = Config.model_validate(_plain(tree))
    except ValidationError as exc:
        raise ConfigError([_problem(source, tree, err) for err in exc.errors()]) from None
    problems = config.cross_check()
    if problems:
        raise ConfigError(
            [
                ConfigProblem(source, _line_of(tree, list(loc)), _dotted(list(loc)), message)
                for loc, message in problems
            ]
        )
    return config


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _problem(source: str, tree: CommentedMap, err: Any) -> ConfigProblem:
    loc = [part for part in err["loc"] if not (isinstance(part, str) and "[" in part)]
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif "input" in err and err["type"] not in ("value_error",):
        message = f"{message} (got {err['input']!r})"
    return ConfigProblem(source, _line_of(tree, loc), _dotted(loc), message)


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(tree: Any, loc: list[Any]) -> int | None:
    """The 1-based line of the deepest key in `loc` that exists in the YAML tree."""
    line = None
    node = tree
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        else:
            break
    if line is None and isinstance(tree, CommentedMap):
        line = tree.lc.line + 1
    return line
