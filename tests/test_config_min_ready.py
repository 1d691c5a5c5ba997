"""`min-ready` in the config: a count, or {auto: {...}} whose max is required."""

from __future__ import annotations

import pytest

from freshpool.config import ConfigError, Label, parse

BASE = """providers: [{name: p}]
images: [{name: i}]
labels:
  - name: l
    image: i
"""


def label_with(line: str) -> Label:
    return parse(BASE + f"    min-ready: {line}\n", "pool.yaml").labels[0]


def test_plain_counts_keep_working() -> None:
    label = label_with("3")
    assert label.min_ready == 3 and label.ready_floor == 3 and label.auto is None


def test_auto_settings_and_their_defaults() -> None:
    label = label_with("{auto: {min: 2, max: 30}}")
    assert label.auto is not None
    assert (label.auto.min, label.auto.max) == (2, 30)
    assert (label.auto.target_wait, label.auto.service_level) == (1.0, 0.95)
    assert label.ready_floor == 2


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("auto", "pool.yaml:6: labels[0].min-ready: min-ready: auto needs at least a max"),
        (
            "{auto: {min: 1}}",
            "pool.yaml:6: labels[0].min-ready: min-ready: {auto: ...} needs a max",
        ),
        ("{auto: {min: 5, max: 2}}", "labels[0].min-ready.auto: min 5 is more than max 2"),
        ("{auto: {max: 5, service-level: 1.5}}", "min-ready.auto.service-level: Input should be"),
        ("{auto: {max: 5, target-wiat: 1}}", "min-ready.auto.target-wiat: unknown key"),
        ("-1", "labels[0].min-ready: Input should be greater than or equal to 0"),
    ],
)
def test_bad_min_ready_is_refused_with_where_and_why(line: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        label_with(line)
    assert said in str(caught.value)
    # One kind's complaint only, not the count's and the mapping's both.
    assert len(str(caught.value).splitlines()) == 1
