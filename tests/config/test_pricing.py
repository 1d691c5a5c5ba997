"""Which price wins, and bad price files and keys named by file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from freshpool.config import ConfigError, parse
from freshpool.config.pricing import Prices

BASE = """
providers:
  - name: cloud
    driver: aws
    aws:
      region: eu-west-1
      ami: ami-0123456789abcdef0
      instance-type: m5.large
      instance-types: {{big: m5.xlarge}}
{extra}
labels:
  - {{name: small, image: i, cost-per-hour: 0.01}}
  - {{name: big, image: i}}
  - {{name: other, image: i}}
images:
  - name: i
"""


def test_most_specific_price_wins_and_none_is_unknown(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("# on demand\nm5.large: 0.096\nm5.xlarge: 0.192\n")
    config = parse(BASE.format(extra=f"    price-file: {prices}\n"))
    price = Prices(config)
    assert price("cloud", "small") == 0.096  # the price file beats the label's own
    assert price("cloud", "big") == 0.192
    bare = Prices(parse(BASE.format(extra="")))
    assert bare("cloud", "small") == 0.01
    assert bare("cloud", "big") is None  # unknown, not zero
    assert bare("gone", "small") is None
    flat = Prices(
        parse(BASE.format(extra="    cost-per-hour: 1.5\n    label-cost-per-hour: {big: 3}\n"))
    )
    assert (flat("cloud", "small"), flat("cloud", "big")) == (1.5, 3)


def test_a_bad_price_file_names_its_line_and_size(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("m5.large: 0.096\nm5.xlarge: cheap\n")
    config = parse(BASE.format(extra=f"    price-file: {prices}\n"))
    with pytest.raises(ConfigError) as caught:
        Prices(config)
    assert f"{prices}:2: m5.xlarge:" in str(caught.value)
    prices.write_text("m5.large: -1\n")
    with pytest.raises(ConfigError, match=r":1: m5.large: .*greater than or equal to 0"):
        Prices(config)
    with pytest.raises(ConfigError, match="cannot read"):
        Prices(parse(BASE.format(extra=f"    price-file: {tmp_path / 'none.yaml'}\n")))


def test_bad_price_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r":10: providers\[0\].cost-per-hour: .*greater"):
        parse(BASE.format(extra="    cost-per-hour: -2\n"))
    with pytest.raises(ConfigError, match=r"label-cost-per-hour.nope: no label named 'nope'"):
        parse(BASE.format(extra="    label-cost-per-hour: {nope: 1}\n"))
