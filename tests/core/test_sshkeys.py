"""Which SSH public keys a job may bring."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from freshpool.core.sshkeys import check_public_key


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_keys_ssh_keygen_makes_are_accepted(tmp_path: Path, kind: str) -> None:
    key = tmp_path / kind
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "me@host", "-f", str(key)],
                   check=True)  # fmt: skip
    text = key.with_suffix(".pub").read_text()
    assert check_public_key(text) == text.strip()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected one public key line"),
        ("ssh-ed25519 AAAA\nssh-ed25519 AAAA", "expected one public key line"),
        ('from="10.0.0.1" ssh-ed25519 AAAA', "options are not accepted"),
        ("ssh-ed25519 @@@@", "bad base64"),
        ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==", "its data is a 'ssh-rsa' key"),
    ],
)
def test_what_is_not_a_key_says_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_public_key(text)
