"""boto3 clients for one `aws` provider, and what EC2's refusals mean to freshpool.

botocore's own retries are off: a failed call is one failed driver call, and the
launcher retries it with the one backoff (core/backoff.py), so a quota or an outage
is never hammered by two retry loops at once.
"""

from __future__ import annotations

import re
from typing import Any

from freshpool.config.clouds import AwsSettings
from freshpool.drivers.base import DriverError, DriverUnavailable, QuotaExceeded

# The account's limit on what it may run: more of the same call fails the same way.
QUOTA_CODES = frozenset({"VcpuLimitExceeded", "InstanceLimitExceeded",
                         "MaxSpotInstanceCountExceeded"})  # fmt: skip
# Spot refused for capacity or price: on-demand may still be there.
SPOT_REFUSED = frozenset({"InsufficientInstanceCapacity", "SpotMaxPriceTooLow",
                          "MaxSpotInstanceCountExceeded", "InsufficientCapacity",
                          "UnfulfillableCapacity"})  # fmt: skip
_INSTANCE_ID = re.compile(r"\bi-[0-9a-f]+\b")


def clients(settings: AwsSettings) -> tuple[Any, Any, Any]:
    """The EC2, Service Quotas and S3 clients (thread-safe; the session is not, so it
    is used here only)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise DriverUnavailable(
            'the aws driver needs boto3: pip install "freshpool[aws]"'
        ) from None
    config = Config(
        connect_timeout=settings.api_timeout, read_timeout=settings.api_timeout,
        retries={"total_max_attempts": 1}, max_pool_connections=32,
    )  # fmt: skip
    session = boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
    ec2 = session.client("ec2", endpoint_url=settings.endpoint_url, config=config)
    quotas = session.client("service-quotas", endpoint_url=settings.endpoint_url, config=config)
    s3 = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
    return ec2, quotas, s3


def code_of(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def driver_error(provider: str, what: str, exc: BaseException) -> DriverError:
    """`exc` from botocore as the DriverError freshpool acts on, naming the provider,
    the call and EC2's own code and words."""
    code = code_of(exc)
    if code:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
        text = f"provider {provider}: {what}: {code}: {message}"
        return QuotaExceeded(text) if code in QUOTA_CODES else DriverError(text)
    return DriverError(f"provider {provider}: {what}: {type(exc).__name__}: {exc}")


def instance_ids_in(message: str) -> set[str]:
    return set(_INSTANCE_ID.findall(message))


def tag_dict(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags") or []}
