"""The isolation keys of the config: bad values are errors naming file, line and key."""

from __future__ import annotations

import pytest

from freshpool.config import ConfigError, parse

BASE = """\
providers:
  - name: local
    network:
{network}
    limits: {{cpus: 1, memory: 1GiB, pids: 512}}
{provider}
labels:
  - name: x
    image: img
{label}
images:
  - name: img
"""


def _problems(network: str = "", provider: str = "", label: str = "") -> list[str]:
    text = BASE.format(network=network or "      outbound: false", provider=provider, label=label)
    with pytest.raises(ConfigError) as caught:
        parse(text, "f.yaml")
    return [str(p) for p in caught.value.problems]


def test_good_isolation_keys_load() -> None:
    text = BASE.format(
        network="      host-ports: [9989]\n      egress: [10.1.0.0/16, 'pypi.org:443']",
        provider="    limits-total: {cpus: 4, memory: 4GiB}",
        label="    limits: {memory: 512MiB, disk: 2GiB}",
    )
    config = parse(text)
    provider, label = config.providers[0], config.labels[0]
    assert provider.network.host_ports == [9989]
    each = label.limits.over(provider.limits)
    assert (each.cpus, each.memory, each.pids, each.disk) == (1, 2**29, 512, 2 * 2**30)
    # Four CPUs over one each, 4 GiB over 512 MiB each: CPUs are the cap.
    assert config.total_cap(provider) == 4


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.1.0.0/33", "expected a CIDR like 10.1.0.0/16"),
        ("pypi.org:https", "port 'https' is not a number"),
        ("pypi.org:70000", "port '70000' is not a number from 1 to 65535"),
        ("[::1]:443", "is not a host name or IPv4 address"),
    ],
)
def test_a_bad_egress_entry_names_itself(entry: str, message: str) -> None:
    (problem,) = _problems(network=f"      egress: ['{entry}']")
    assert problem.startswith("f.yaml:4: providers[0].network.egress: ")
    assert entry in problem and message in problem


def test_a_bad_host_port_is_refused() -> None:
    (problem,) = _problems(network="      host-ports: [0]")
    assert "providers[0].network.host-ports[0]" in problem


def test_a_size_needs_a_unit() -> None:
    (problem,) = _problems(label="    limits: {memory: 512}")
    assert "labels[0].limits.memory: 512 has no unit" in problem


def test_a_label_bigger_than_the_providers_total_is_refused() -> None:
    (problem,) = _problems(
        provider="    limits-total: {memory: 2GiB}", label="    limits: {memory: 4GiB}"
    )
    assert "f.yaml:10: labels[0].limits.memory: 4.0GiB is more than provider 'local'" in problem
    assert "limits-total.memory: 2.0GiB" in problem


def test_a_total_cap_needs_each_node_limited() -> None:
    (problem,) = _problems(provider="    limits-total: {disk: 20GiB}")
    assert "labels[0].limits.disk" in problem and "each node needs a disk limit" in problem
