"""What every config model shares: kebab-case keys, unknown keys refused, frozen values."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,30}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Seconds = Annotated[float, Field(gt=0)]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Model(BaseModel):
    # Unknown keys are errors: a typo like "min_ready" must not be silently ignored.
    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True
    )
