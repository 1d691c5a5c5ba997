"""The provider assignment every launcher works out on its own (core/fleet.py)."""

from __future__ import annotations

from collections import Counter

from freshpool.core.fleet import assign

PROVIDERS = [f"cloud-{i}" for i in range(12)]


def test_every_launcher_gets_about_the_same_number() -> None:
    owners = assign(PROVIDERS, {"a": None, "b": None, "c": None, "d": None, "e": None})
    assert set(owners) == set(PROVIDERS)
    assert sorted(Counter(owners.values()).values()) == [2, 2, 2, 3, 3]


def test_the_answer_does_not_depend_on_who_asks_or_in_what_order() -> None:
    one = assign(PROVIDERS, {"a": None, "b": None, "c": None})
    other = assign(list(reversed(PROVIDERS)), {"c": None, "a": None, "b": None})
    assert one == other


def test_a_provider_goes_only_to_a_launcher_that_may_drive_it() -> None:
    owners = assign(PROVIDERS, {"a": ["cloud-0"], "b": None})
    assert owners["cloud-0"] in {"a", "b"}
    assert all(owner == "b" for p, owner in owners.items() if p != "cloud-0")
    assert assign(["lonely"], {"a": ["cloud-0"]}) == {}


def test_a_launcher_leaving_hands_its_providers_to_the_rest() -> None:
    before = assign(PROVIDERS, {"a": None, "b": None, "c": None})
    after = assign(PROVIDERS, {"a": None, "b": None})
    assert "c" in before.values() and "c" not in after.values()
    assert sorted(Counter(after.values()).values()) == [6, 6]
    joined = assign(PROVIDERS, {"a": None, "b": None, "c": None, "d": None})
    assert sorted(Counter(joined.values()).values()) == [3, 3, 3, 3]
