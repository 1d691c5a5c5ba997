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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
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


class VmSize(_Model):
    """A VM's size on a qemu provider."""

    vcpus: int = Field(default=1, ge=1, le=256)
    # MiB of guest RAM.
    memory: int = Field(default=1024, ge=128)


class QemuSettings(_Model):
    """The qemu driver's settings (ignored by other drivers)."""

    # auto: KVM when a probe boot shows it works for the guest kernel, else TCG.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # All VMs together (guest RAM plus QEMU's own) get at most this share of host RAM.
    memory_share: float = Field(default=0.75, gt=0, le=1)
    # GiB: the size of each VM's root file system (thin: only what is written counts).
    disk_size: int = Field(default=8, ge=1)
    # Seconds a VM gets to shut down after an ACPI power button press before it is killed.
    powerdown_timeout: Seconds = 10.0
    # The size of every label's VMs, unless `sizes` names the label.
    vcpus: int = Field(default=1, ge=1, le=256)
    memory: int = Field(default=1024, ge=128)
    sizes: dict[str, VmSize] = {}

    def size_of(self, label: str) -> VmSize:
        return self.sizes.get(label) or VmSize(vcpus=self.vcpus, memory=self.memory)


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
    qemu: QemuSettings = QemuSettings()

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


ENV_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"
# The fields that define a debootstrap base; an image with a parent takes its base from it.
BASE_FIELDS = ("suite", "mirror", "variant", "packages")


def _env_names(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if not re.fullmatch(ENV_NAME_PATTERN, name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return env


class ImageFile(_Model):
    """A file (or directory tree) copied into an image before its steps run."""

    dest: str
    # An absolute path on the build host, or the file's text inline.
    source: Path | None = None
    content: str | None = None
    # Octal, as a string ("0644"); default: the source's mode, or 0644 for content.
    mode: str | None = Field(default=None, pattern=r"^[0-7]{3,4}$")

    @field_validator("dest")
    @classmethod
    def _dest(cls, value: str) -> str:
        if not value.startswith("/") or value == "/" or ".." in value.split("/"):
            raise ValueError(f"{value!r} is not an absolute path below / without '..'")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"{str(value)!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ImageFile:
        if (self.source is None) == (self.content is None):
            raise ValueError("give exactly one of `source` (a host path) or `content` (text)")
        return self


class Step(_Model):
    """One setup step: a shell script run as root (`sh -e`) in a build node with network."""

    run: str = Field(min_length=1)
    name: str | None = None
    env: dict[str, str] = {}
    timeout: Seconds = 3600.0

    _env = field_validator("env")(_env_names)


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
    # Build on the newest ready build of this image instead of a debootstrap base.
    parent: Name | None = None
    # Environment for every step (a step's own `env` adds to it).
    env: dict[str, str] = {}
    files: list[ImageFile] = []
    # Run in order; each becomes one cached layer. A plain string is a step's `run`.
    steps: list[Step] = []
    # `pip download` requirement specifiers, saved to /var/cache/freshpool/wheels.
    prefetch_wheels: list[str] = []
    # `serve` rebuilds an image whose newest good build is older than this (none: never).
    rebuild_age: Seconds | None = 86400.0
    # Good builds kept for rollback; older ones are deleted once no node uses them.
    keep: int = Field(default=2, ge=1)
    # Commands run over SSH on a fresh node of a new build; all must exit 0 before it serves.
    validate_commands: list[str] = Field(default=[], alias="validate")
    validate_timeout: Seconds = 300.0

    @field_validator("packages", "prefetch")
    @classmethod
    def _package_names(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", value):
                raise ValueError(f"{value!r} is not a Debian package name")
        return values

    @field_validator("steps", mode="before")
    @classmethod
    def _plain_steps(cls, values: Any) -> Any:
        if isinstance(values, list):
            return [{"run": v} if isinstance(v, str) else v for v in values]
        return values

    @field_validator("prefetch_wheels")
    @classmethod
    def _requirements(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.strip() or "\n" in value or value.startswith("-"):
                raise ValueError(f"{value!r} is not a requirement like 'requests==2.32.3'")
        return values

    _env = field_validator("env")(_env_names)

    @model_validator(mode="after")
    def _one_base(self) -> Image:
        if self.parent is not None:
            given = [f for f in BASE_FIELDS if f in self.model_fields_set]
            if given:
                raise ValueError(
                    f"image {self.name!r} has a parent, which is its base: remove "
                    + ", ".join(given)
                )
        return self


class Api(_Model):
    """The HTTP API and dashboard, which `freshpool serve` runs in a process beside its own."""

    enabled: bool = True
    # Loopback only unless the operator says otherwise; port 0 picks a free one.
    listen: str = "127.0.0.1"
    port: int = Field(default=8005, ge=0, le=65535)
    # Read-only status (GET endpoints, the dashboard) without a token.
    open_status: bool = True
    # Tokens of these tenants may see and act on every tenant's requests and nodes.
    admin_tenants: list[Name] = []


class Tenant(_Model):
    name: Name
    # Share of the pool relative to other tenants when requests wait at one priority.
    weight: Annotated[float, Field(gt=0)] = 1.0


class Statsd(_Model):
    """Where to send the metrics as statsd too (besides Prometheus /metrics)."""

    host: str
    port: int = Field(default=8125, ge=1, le=65535)
    prefix: str = "freshpool"


class Config(_Model):
    state_dir: Path = Path("/var/lib/freshpool")
    # SQLAlchemy URL of the store; default: SQLite in state-dir. For PostgreSQL:
    # postgresql+psycopg://user@host/db (pip install 'freshpool[postgres]').
    database_url: str | None = None
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
    api: Api = Api()
    # Fair-share weights; a tenant not listed has weight 1.
    tenants: list[Tenant] = []
    statsd: Statsd | None = None

    def cross_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems between sections (names used twice, references to nothing), with key paths."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for section in ("providers", "labels", "images", "tenants"):
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
            for name in provider.qemu.sizes:
                if name not in labels:
                    problems.append((("providers", i, "qemu", "sizes"), f"no label named {name!r}"))
        problems += _image_parent_problems(self.images)
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


def _image_parent_problems(images: list[Image]) -> list[tuple[tuple[str | int, ...], str]]:
    """Parents that do not exist, and chains of parents that loop."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    parents = {i.name: i.parent for i in images}
    for i, image in enumerate(images):
        if image.parent is None:
            continue
        if image.parent not in parents:
            known = ", ".join(sorted(parents))
            problems.append(
                (("images", i, "parent"), f"no image named {image.parent!r} (known: {known})")
            )
            continue
        chain = [image.name]
        parent: str | None = image.parent
        while parent is not None and parent not in chain:
            chain.append(parent)
            parent = parents.get(parent)
        if parent is not None:
            problems.append(
                (("images", i, "parent"), f"parents loop: {' -> '.join([*chain, parent])}")
            )
    return problems


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
