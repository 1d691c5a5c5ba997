"""The aws driver with the real boto3 client against moto's server over real HTTP on
loopback; what the driver did is read back through the EC2 API.

Emulated: EC2 itself (moto: its instances never boot, so nothing answers SSH and the
console holds no host key; these tests turn host-key checking off, except where they
prove that a node without one is refused). moto enforces no vCPU quota and has no EC2
service quotas, and never refuses spot capacity: the tests inject those answers at
boto3's own `before-call` hook, as Nodepool's AWS tests inject quotas, and say so
where they do.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from freshpool.config import Provider
from freshpool.drivers.aws import AwsDriver
from freshpool.drivers.base import (
    DriverError,
    DriverUnavailable,
    Instance,
    NodeSpec,
    QuotaExceeded,
)
from freshpool.drivers.cloud.keys import console_host_keys
from tests.drivers.cloud_support import node_spec, run_all
from tests.integrations.buildbot.harness import free_port
from tests.launcher.test_reliability import sim_launcher
from tests.support import run_until

REGION = "us-east-1"
CLUSTER = "c0ffee"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def ec2(moto_url: str) -> Any:
    """A client of the test's own (not the driver's), for set-up and for reading back."""
    import httpx

    httpx.post(f"{moto_url}/moto-api/reset", timeout=10)
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)


@pytest.fixture
def make_driver(moto_url: str, ec2: Any, tmp_path: Path) -> Callable[..., AwsDriver]:
    ami = ec2.describe_images()["Images"][0]["ImageId"]

    def make(name: str = "ec2", boot_timeout: float = 30, **aws: Any) -> AwsDriver:
        settings = {"region": REGION, "endpoint-url": moto_url, "ami": ami,
                    "host-key-checking": False, "tags": {"team": "ci"}, **aws}  # fmt: skip
        provider = Provider.model_validate({
            "name": name, "driver": "aws", "delete-timeout": 30, "boot-timeout": boot_timeout,
            "aws": settings})  # fmt: skip
        return AwsDriver(provider, CLUSTER, tmp_path / "providers" / name)

    return make


def spec(node_id: int, label: str = "debian") -> NodeSpec:
    return node_spec(CLUSTER, node_id, label)


def run_tagged(ec2: Any, ami: str | None, tags: dict[str, str]) -> str:
    """An instance someone launched with these tags, not through the driver."""
    tagged = [{"ResourceType": "instance",
               "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]  # fmt: skip
    reply = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, TagSpecifications=tagged)
    return str(reply["Instances"][0]["InstanceId"])


def described(ec2: Any, instance_id: str) -> dict[str, Any]:
    reply = ec2.describe_instances(InstanceIds=[instance_id])
    return dict(reply["Reservations"][0]["Instances"][0])


def calls_to(driver: AwsDriver, operation: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    for client in (driver.ec2, driver.quotas):
        client.meta.events.register(f"before-call.*.{operation}",
                                    lambda **_kw: seen.update([operation]))  # fmt: skip
    return seen


def answer(client: Any, operation: str, status: int, body: dict[str, Any],
           when: Callable[[dict[str, Any]], bool] = lambda _p: True) -> None:  # fmt: skip
    """Make boto3 receive `body` with `status` for `operation` (when `when(params)`),
    instead of asking moto: the injection these tests say they make."""

    def handler(params: dict[str, Any], **_kw: Any) -> Any:
        if when(params):
            return SimpleNamespace(status_code=status, headers={}), body
        return None

    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"before-call.{service}.{operation}", handler)


def test_a_node_is_an_instance_with_our_tags_imdsv2_and_its_own_key(
    make_driver: Callable[..., AwsDriver], ec2: Any
) -> None:
    driver = make_driver()
    driver.check()
    instance: Instance = driver.create(spec(7)).wait(60)
    seen = described(ec2, instance.external_id)
    assert seen["State"]["Name"] == "running"
    tags = {t["Key"]: t["Value"] for t in seen["Tags"]}
    assert tags["freshpool-cluster"] == CLUSTER and tags["freshpool-node"] == "7"
    assert tags["freshpool-provider"] == "ec2" and tags["team"] == "ci"
    assert tags["Name"] == "fp-7"
    assert seen["MetadataOptions"]["HttpTokens"] == "required"
    for mapping in seen.get("BlockDeviceMappings", []):
        volume = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"][0]
        assert {"Key": "freshpool-node", "Value": "7"} in volume["Tags"]

    # The node's key: private half on this host only (0600), public half in user data.
    access = instance.access
    assert access is not None and access.host == seen["PrivateIpAddress"]
    key = Path(access.key_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    data = ec2.describe_instance_attribute(InstanceId=instance.external_id,
                                           Attribute="userData")["UserData"]["Value"]  # fmt: skip
    text = base64.b64decode(data).decode()
    assert key.with_suffix(".pub").read_text().split()[1] in text
    assert "PRIVATE KEY" not in text

    listed = {i.external_id: i for i in driver.list_instances()}
    assert listed[instance.external_id].tags == spec(7).tags

    driver.delete(instance.external_id).wait(60)
    assert described(ec2, instance.external_id)["State"]["Name"] == "terminated"
    assert not key.exists()
    assert instance.external_id not in {i.external_id for i in driver.list_instances()}
    driver.delete(instance.external_id).wait(60)  # gone already: still a success


def test_launches_and_deletes_share_one_call_per_pass(
    make_driver: Callable[..., AwsDriver], ec2: Any
) -> None:
    driver = make_driver()
    describes = calls_to(driver, "DescribeInstances")
    terminates = calls_to(driver, "TerminateInstances")
    creates = [driver.create(spec(n)) for n in range(1, 11)]
    run_all(creates)
    ids = [op.wait() for op in creates]
    assert len({i.external_id for i in ids}) == 10
    assert describes["DescribeInstances"] <= 3, describes  # one per pass, not per node

    deletes = [driver.delete(i.external_id) for i in ids]
    run_all(deletes)
    for op in deletes:
        op.wait()
    assert terminates["TerminateInstances"] == 1
    states = {described(ec2, i.external_id)["State"]["Name"] for i in ids}
    assert states == {"terminated"}


def test_only_this_clusters_and_providers_instances_are_listed(
    make_driver: Callable[..., AwsDriver], ec2: Any
) -> None:
    driver = make_driver()
    ami = driver.settings.ami

    def run(tags: dict[str, str]) -> str:
        return run_tagged(ec2, ami, tags)

    # A stray of ours: tagged, with no node row (a launcher died mid-launch). Found by
    # its tags, so the leak sweep deletes it.
    stray = run({"freshpool-cluster": CLUSTER, "freshpool-node": "999",
                 "freshpool-provider": "ec2"})  # fmt: skip
    other_cluster = run({"freshpool-cluster": "other", "freshpool-node": "1",
                         "freshpool-provider": "ec2"})  # fmt: skip
    other_provider = run({"freshpool-cluster": CLUSTER, "freshpool-node": "2",
                          "freshpool-provider": "ec2-west"})  # fmt: skip
    untagged = run({"Name": "someone's build box"})
    listed = {i.external_id: i for i in driver.list_instances()}
    assert set(listed) == {stray}
    stray_tags = listed[stray].tags
    assert stray_tags is not None and stray_tags.node_id == 999
    for theirs in (other_cluster, other_provider, untagged):
        assert described(ec2, theirs)["State"]["Name"] == "running"


def test_spot_falls_back_to_on_demand_when_refused(
    make_driver: Callable[..., AwsDriver], ec2: Any
) -> None:
    driver = make_driver(spot=True)
    spot = driver.create(spec(1)).wait(60)
    assert described(ec2, spot.external_id).get("InstanceLifecycle") == "spot"

    # Injected: EC2 has no spot capacity (moto always has).
    refused = {"Error": {"Code": "InsufficientInstanceCapacity",
                         "Message": "There is no Spot capacity available"}}  # fmt: skip
    strict = make_driver(name="ec2-spot", spot=True, **{"spot-fallback": False})
    for d in (driver, strict):
        answer(d.ec2, "RunInstances", 500, refused,
               when=lambda p: "InstanceMarketOptions.MarketType" in p.get("body", {}))  # fmt: skip
    fallback = driver.create(spec(2)).wait(60)
    assert described(ec2, fallback.external_id).get("InstanceLifecycle") is None
    with pytest.raises(DriverError, match="ec2-spot: RunInstances: InsufficientInstanceCapacity"):
        strict.create(spec(3)).wait(60)


def test_the_vcpu_quota_less_what_is_not_ours_bounds_the_nodes(
    make_driver: Callable[..., AwsDriver], ec2: Any
) -> None:
    driver = make_driver(**{"instance-type": "t3.medium"})  # 2 vCPUs
    # Injected: moto has no EC2 service quotas. 10 vCPUs for the account.
    answer(driver.quotas, "GetServiceQuota", 200,
           {"Quota": {"QuotaCode": "L-1216C47A", "Value": 10.0}})  # fmt: skip
    # Someone else's t3.xlarge (4 vCPUs) runs in the region; a spot one is not counted.
    ec2.run_instances(ImageId=driver.settings.ami, InstanceType="t3.xlarge", MinCount=1,
                      MaxCount=1)  # fmt: skip
    assert driver.limits().max_nodes == 20  # nothing read yet: max-nodes alone

    def read() -> int:
        driver.quota.refused()
        return driver.limits().max_nodes

    deadline = time.monotonic() + 20
    while driver.quota.last.get("nodes_fit") is None:
        assert time.monotonic() < deadline, driver.quota.last
        read()
        time.sleep(0.05)
    assert read() == 3  # (10 - 4) // 2
    assert driver.quota.last["vcpus_not_ours"] == 4

    # The provider's own cap, on top: 4 vCPUs are 2 t3.medium nodes.
    capped = make_driver(name="ec2-capped", **{"instance-type": "t3.medium", "max-cores": 4})
    answer(capped.quotas, "GetServiceQuota", 200,
           {"Quota": {"QuotaCode": "L-1216C47A", "Value": 10.0}})  # fmt: skip
    deadline = time.monotonic() + 20
    while capped.limits().max_nodes != 2:
        assert time.monotonic() < deadline, capped.quota.last
        time.sleep(0.05)

    # EC2 refuses anyway (another account user raced us): a QuotaExceeded naming it.
    over = "You have requested more vCPU capacity than your current vCPU limit"
    answer(driver.ec2, "RunInstances", 400,
           {"Error": {"Code": "VcpuLimitExceeded", "Message": over}})  # fmt: skip
    with pytest.raises(QuotaExceeded, match="ec2: RunInstances: VcpuLimitExceeded"):
        driver.create(spec(5)).wait(60)


def test_a_node_whose_host_key_cannot_be_read_is_undone(
    make_driver: Callable[..., AwsDriver], ec2: Any
) -> None:
    driver = make_driver(boot_timeout=2, **{"host-key-checking": True})
    with pytest.raises(DriverError, match="no SSH host key on its console"):
        driver.create(spec(4)).wait(60)
    # Nothing half-created: the instance is terminated and its key files gone.
    states = [i["State"]["Name"] for r in ec2.describe_instances()["Reservations"]
              for i in r["Instances"]]  # fmt: skip
    assert states == ["terminated"]
    assert not list((driver.state_dir / "keys").glob("*"))


def test_the_host_key_is_read_from_cloud_inits_console_block() -> None:
    console = (
        "[  OK  ] Started cloud-init\n-----BEGIN SSH HOST KEY KEYS-----\n"
        "ecdsa-sha2-nistp256 AAAAE2VjZHNh root@fp-1\nssh-ed25519 AAAAC3NzaC1 root@fp-1\n"
        "-----END SSH HOST KEY KEYS-----\nlogin:"
    )
    assert console_host_keys(console) == ["ecdsa-sha2-nistp256 AAAAE2VjZHNh",
                                          "ssh-ed25519 AAAAC3NzaC1"]  # fmt: skip
    assert console_host_keys("no keys here") == []


def test_bad_settings_are_named_at_check(make_driver: Callable[..., AwsDriver], ec2: Any) -> None:
    with pytest.raises(DriverUnavailable, match=r"provider ec2: no AMI \[.ami-0000dead.\]"):
        make_driver(ami="ami-0000dead").check()
    with pytest.raises(DriverUnavailable, match="provider ec2: check: InvalidSubnetID"):
        make_driver(**{"subnet-id": "subnet-0bad"}).check()
    with pytest.raises(DriverUnavailable, match="provider ec2: check: EndpointConnectionError"):
        make_driver(**{"endpoint-url": f"http://127.0.0.1:{free_port()}",
                       "api-timeout": 2}).check()  # fmt: skip
    with pytest.raises(ValueError, match="driver aws needs an `aws:` section"):
        Provider.model_validate({"name": "ec2", "driver": "aws"})
    with pytest.raises(ValueError, match="give `ami`"):
        Provider.model_validate({"name": "ec2", "driver": "aws", "aws": {"region": REGION}})


def test_config_validate_asks_ec2(moto_url: str, ec2: Any, tmp_path: Path) -> None:
    ami = ec2.describe_images()["Images"][0]["ImageId"]

    def validate(image: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "freshpool.yaml"
        config.write_text(json.dumps({
            "state-dir": str(tmp_path / "state"),
            "providers": [{"name": "ec2", "driver": "aws", "aws": {
                "region": REGION, "endpoint-url": moto_url, "ami": image}}],
            "labels": [{"name": "debian", "image": "debian-bookworm"}],
            "images": [{"name": "debian-bookworm", "suite": "bookworm"}],
        }))  # fmt: skip
        return subprocess.run([sys.executable, "-m", "freshpool", "config", "validate", "-c",
                               str(config)], capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip

    good = validate(ami)
    assert good.returncode == 0, good.stderr
    assert "provider ec2: aws answers" in good.stdout
    bad = validate("ami-0000dead")
    assert bad.returncode != 0
    assert "provider ec2" in bad.stderr and "ami-0000dead" in bad.stderr, bad.stderr


def test_the_launchers_sweep_terminates_a_stray_of_ours(
    moto_url: str, ec2: Any, tmp_path: Path
) -> None:
    """The real launcher's leak sweep over the aws driver (min-ready 0: moto's
    instances never boot, so none is launched to be tested over SSH)."""
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    launcher = sim_launcher(tmp_path, f"""
  - name: ec2
    driver: aws
    aws: {{region: {REGION}, endpoint-url: "{moto_url}", ami: {ami}, host-key-checking: false}}
""", min_ready=0)  # fmt: skip
    cluster = launcher.store.cluster_id

    def run(tags: dict[str, str]) -> str:
        return run_tagged(ec2, ami, tags)

    stray = run({"freshpool-cluster": cluster, "freshpool-node": "41",
                 "freshpool-provider": "ec2", "freshpool-build": "img-1"})  # fmt: skip
    theirs = run({"Name": "not ours"})
    run_until(launcher, lambda: described(ec2, stray)["State"]["Name"] == "terminated",
              timeout=30)  # fmt: skip
    assert described(ec2, theirs)["State"]["Name"] == "running"
