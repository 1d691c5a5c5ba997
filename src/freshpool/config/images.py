"""The image definitions: a debootstrap base or a parent, files, steps, pre-fetches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from freshpool.config.base import Model, Name, Seconds

ENV_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"
# The fields that define a debootstrap base; an image with a parent takes its base from it.
BASE_FIELDS = ("suite", "mirror", "variant", "packages")


def _env_names(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if not re.fullmatch(ENV_NAME_PATTERN, name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return env


class ImageFile(Model):
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


class Step(Model):
    """One setup step: a shell script run as root (`sh -e`) in a build node with network."""

    run: str = Field(min_length=1)
    name: str | None = None
    env: dict[str, str] = {}
    timeout: Seconds = 3600.0

    _env = field_validator("env")(_env_names)


class Image(Model):
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


def image_parent_problems(images: list[Image]) -> list[tuple[tuple[str | int, ...], str]]:
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
