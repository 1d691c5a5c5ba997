"""How a namespace node runs: sshd as its only service, under bubblewrap in the node's
network namespace, with a reduced set of capabilities."""

from __future__ import annotations

from freshpool.core.capabilities import NODE_CAPABILITIES
from freshpool.drivers.host.tools import tool

NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
SSHD = "/usr/sbin/sshd"
# Command-line options win over the image's sshd_config, so these hold whatever the
# image says. No PAM: there is no login session machinery in a node.
SSHD_OPTIONS = (
    "UsePAM=no",
    "PermitRootLogin=prohibit-password",
    "PasswordAuthentication=no",
    "KbdInteractiveAuthentication=no",
    "PubkeyAuthentication=yes",
    "AuthorizedKeysFile=.ssh/authorized_keys",
    "UseDNS=no",
    "PidFile=none",
    "PrintMotd=no",
    "PrintLastLog=no",
    # CI tools open many connections at once; the default (10:30:100) drops some.
    "MaxStartups=100:30:200",
)


def node_argv(netns_file: str, root: str, hostname: str) -> list[str]:
    """The command line of a node: bubblewrap over its root, in its netns, running sshd."""
    return [
        tool("nsenter"), f"--net={netns_file}", "--",
        tool("bwrap"),
        "--bind", root, "/",
        "--dev", "/dev",
        "--perms", "1777", "--tmpfs", "/dev/shm",
        "--proc", "/proc",
        # apt cannot create its temporary files in a /tmp without the sticky 1777.
        "--perms", "1777", "--tmpfs", "/tmp",
        "--unshare-pid", "--unshare-uts", "--unshare-ipc", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--chdir", "/",
        "--cap-drop", "ALL",
        *(arg for cap in NODE_CAPABILITIES for arg in ("--cap-add", cap)),
        "--",
        SSHD, "-D", "-e", "-h", HOST_KEY,
        *(arg for option in SSHD_OPTIONS for arg in ("-o", option)),
    ]  # fmt: skip
