"""What a node costs per hour on a provider: the one rule for which configured price wins.

Most specific first: the provider's price for the label (`label-cost-per-hour`), the
label's size on that provider in the provider's `price-file`, the provider's
`cost-per-hour`, the label's `cost-per-hour`. None of them: unknown (None), which
usage shows as unknown, never as zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, RootModel

from freshpool.config.loader import ConfigError, ConfigProblem, parse_model
from freshpool.config.models import Config, Provider


class PriceFile(RootModel[dict[str, Annotated[float, Field(ge=0)]]]):
    """`size: cost per hour` for each instance type or flavor."""


def read_price_file(path: Path) -> dict[str, float]:
    """A price file's prices; a ConfigError naming the file, line and size otherwise."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(str(path), None, "", f"cannot read: {exc.strerror}")]
        ) from None
    if not text.strip():
        raise ConfigError([ConfigProblem(str(path), 1, "", "empty: expected `size: cost`")])
    prices, _tree = parse_model(text, str(path), PriceFile)
    return dict(prices.root)


def size_of(provider: Provider, label: str) -> str | None:
    """The name the provider's price list knows a label's node by (instance type,
    flavor), if the provider's settings name one."""
    if provider.aws is not None:
        return provider.aws.instance_types.get(label) or provider.aws.instance_type
    if provider.openstack is not None:
        return (provider.openstack.flavors.get(label) or provider.openstack.flavor).name
    return None


class Prices:
    """`prices(provider, label)`: cost per hour, or None if no price applies. Reads
    every provider's price file once, when made."""

    def __init__(self, config: Config) -> None:
        self._providers = {p.name: p for p in config.providers}
        self._labels = {x.name: x for x in config.labels}
        self._files = {
            p.name: read_price_file(p.price_file) for p in config.providers if p.price_file
        }

    def __call__(self, provider: str, label: str) -> float | None:
        found = self._providers.get(provider)
        fallback = self._labels[label].cost_per_hour if label in self._labels else None
        if found is None:
            return None
        if label in found.label_cost_per_hour:
            return found.label_cost_per_hour[label]
        size = size_of(found, label)
        listed = self._files.get(provider, {})
        if size is not None and size in listed:
            return listed[size]
        if found.cost_per_hour is not None:
            return found.cost_per_hour
        return fallback
