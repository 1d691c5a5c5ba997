"""Writing into a node's root as host root, never following the image's symlinks out of it.

The driver writes into the node before it starts: an image whose /root/.ssh pointed
at /etc must not make it write into the host's /etc.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path

from freshpool.drivers.base import DriverError


def inside(root: Path, relative: str) -> Path:
    """`relative` under the node root, refusing image symlinks that lead out of it."""
    if not relative.strip("/"):
        return root
    target = root / relative.lstrip("/")
    parent = os.path.realpath(target.parent)
    if parent != str(root) and not parent.startswith(f"{root}/"):
        raise DriverError(f"the image's {target.parent.relative_to(root)} leads out of the node")
    return Path(parent) / target.name


def write_file(path: Path, data: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Replace the file at `path` (never following a symlink there) with `data`."""
    if os.path.lexists(path):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data.encode())
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def make_dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> None:
    if path.is_symlink():
        raise DriverError(f"{path.name} in the image is a symlink; expected a directory")
    if not path.is_dir():
        path.mkdir(mode=mode)
        os.chown(path, uid, gid)
        os.chmod(path, mode)


def clean_ssh_dir(root: Path) -> Path:
    """The image's /etc/ssh, made if missing, with no host key left in it."""
    etc_ssh = inside(root, "/etc/ssh/x").parent
    make_dir(etc_ssh, 0o755)
    # Baked host keys are shared by every node of the image: none may serve.
    for name in os.listdir(etc_ssh):
        if name.startswith("ssh_host_"):
            (etc_ssh / name).unlink()
    return etc_ssh


def lookup_user(root: Path, user: str) -> tuple[int, int, str]:
    """uid, gid and home of `user` from the image's /etc/passwd."""
    passwd = inside(root, "/etc/passwd")
    try:
        lines = passwd.read_text().splitlines()
    except OSError as exc:
        raise DriverError(f"cannot read the image's /etc/passwd: {exc}") from exc
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 6 and fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5] or "/"
    raise DriverError(f"user {user!r} does not exist in the image")


def authorize_key(root: Path, user: str, public_key: str) -> None:
    """Let `public_key` log in as `user`: its authorized_keys, and an account sshd accepts."""
    uid, gid, home = lookup_user(root, user)
    home_dir = inside(root, home)
    if not home_dir.is_dir():
        home_dir.mkdir(mode=0o755, parents=True)
        os.chown(home_dir, uid, gid)
    ssh_dir = inside(root, f"{home}/.ssh")
    make_dir(ssh_dir, 0o700, uid, gid)
    write_file(ssh_dir / "authorized_keys", public_key, 0o600, uid, gid)
    allow_key_login(root, user)


def allow_key_login(root: Path, user: str) -> None:
    """Turn a locked password ('!...', as useradd leaves it) into no password ('*').

    Without PAM, sshd refuses every login to a locked account, keys included; '*'
    still allows no password login, so key-only access is all this opens.
    """
    shadow = inside(root, "/etc/shadow")
    if shadow.is_symlink():
        return
    try:
        lines = shadow.read_text().splitlines(keepends=True)
        stat = shadow.stat()
    except OSError:
        return
    for i, line in enumerate(lines):
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == user and fields[1].startswith("!"):
            fields[1] = "*"
            lines[i] = ":".join(fields)
            write_file(shadow, "".join(lines), stat.st_mode & 0o7777, stat.st_uid, stat.st_gid)
            return


def write_identity(root: Path, hostname: str, ip: IPv4Address) -> None:
    """The node's /etc/hostname, and its name and address added to the image's /etc/hosts."""
    write_file(inside(root, "/etc/hostname"), f"{hostname}\n", 0o644)
    hosts = inside(root, "/etc/hosts")
    lines = hosts.read_text() if hosts.is_file() and not hosts.is_symlink() else ""
    if lines and not lines.endswith("\n"):
        lines += "\n"
    short = hostname.split(".")[0]
    names = hostname if short == hostname else f"{hostname} {short}"
    lines = lines or "127.0.0.1\tlocalhost\n"
    write_file(hosts, f"{lines}{ip}\t{names}\n", 0o644)
