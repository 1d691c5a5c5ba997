"""The `aws` driver: nodes are EC2 instances, launched and found by our tags."""

from freshpool.drivers.aws.driver import AwsDriver

__all__ = ["AwsDriver"]
