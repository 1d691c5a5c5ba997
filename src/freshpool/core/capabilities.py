"""What root may do inside a node, and inside an image build.

Docker's default set, without CAP_MKNOD on a node: enough for sshd, apt and ordinary
builds. Neither has CAP_SYS_ADMIN (mounts, host disks), CAP_SYS_MODULE, CAP_SYS_TIME
or CAP_NET_ADMIN (the host's routes and firewall: a node cannot add itself a route
out of a host-only network). A build keeps CAP_MKNOD because dpkg creates devices.
"""

NODE_CAPABILITIES = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)
BUILD_CAPABILITIES = tuple(sorted((*NODE_CAPABILITIES, "CAP_MKNOD")))
