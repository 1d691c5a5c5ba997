"""The SSH public keys a job brings for its nodes: what is accepted, and why not."""

from __future__ import annotations

import base64
import binascii
import re
import struct

# OpenSSH's public key types a client may give (no certificates: a node trusts keys).
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
MAX_KEYS = 16
MAX_KEY_LENGTH = 16_384


def _blob_start(kind: str) -> str:
    """How the base64 of every `kind` key begins: its type string, length-prefixed, and
    the zero bytes that start the next length field (padded to whole base64 groups)."""
    header = len(kind).to_bytes(4, "big") + kind.encode()
    return base64.b64encode(header + b"\0" * (-len(header) % 3)).decode()


def _literal(text: str) -> str:
    # Only what keys and their base64 hold; plain enough for JSON Schema's regexes too.
    return text.replace(".", "\\.").replace("+", "\\+")


# One authorized_keys line of a plain key: TYPE BASE64 [COMMENT]. Also the API schema's
# pattern, so what the schema allows is what the check accepts.
KEY_PATTERN = (
    "^(?:"
    + "|".join(f"{_literal(k)} {_literal(_blob_start(k))}" for k in sorted(KEY_TYPES))
    + ")(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?(?: [ -~]*)?$"
)
_KEY = re.compile(KEY_PATTERN)


def check_public_key(text: str) -> str:
    """The key as one authorized_keys line ("TYPE BASE64 [COMMENT]"); ValueError says
    what is wrong. Options (command=..., from=...) are refused: a job's key is a key."""
    line = text.strip()
    if not line or "\n" in line or "\r" in line or len(line) > MAX_KEY_LENGTH:
        raise ValueError("expected one public key line, like 'ssh-ed25519 AAAA... me@host'")
    kind, _, rest = line.partition(" ")
    if kind not in KEY_TYPES:
        raise ValueError(
            f"{kind[:40]!r} is not a public key type (known: {', '.join(sorted(KEY_TYPES))});"
            " authorized_keys options are not accepted"
        )
    blob, _, comment = rest.strip().partition(" ")
    try:
        data = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", data[:4])
        inner = data[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise ValueError(f"the {kind} key's data is not a valid OpenSSH key (bad base64)") from None
    if inner != kind:
        raise ValueError(f"the key says it is {kind} but its data is a {inner[:40]!r} key")
    key = f"{kind} {blob} {comment.strip()}".strip()
    if not _KEY.match(key):
        raise ValueError(f"the {kind} key is not a plain OpenSSH key (a comment may hold"
                         " printable ASCII only)")  # fmt: skip
    return key
